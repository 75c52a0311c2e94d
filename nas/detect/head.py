"""What follows the backbone in a detector (neck type, width, depth, classes), as plain data: the command line and
the latency tables read it without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from nas.errors import ConfigError

NECKS = ("yolov8", "dw")


@dataclass(frozen=True)
class HeadConfig:
    """What follows the backbone in a Detector: the neck type, its width and depth multipliers, and the number of
    classes. With the backbone's three feature channel counts and the input resolution it fixes the neck+head's
    latency (a latency table stores it as one op, see nas.latency.table.NeckHeadOp)."""

    neck: str = "dw"
    width: float = 0.25
    depth: float = 0.33
    num_classes: int = 10

    def __post_init__(self) -> None:
        src = "detector head"
        if self.neck not in NECKS:
            raise ConfigError(src, "neck", f"unknown neck {self.neck!r}; choose one of {', '.join(NECKS)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(src, "num_classes", f"must be a positive integer, got {self.num_classes!r}")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 4:
                raise ConfigError(src, name, f"must be a number in (0, 4], got {v!r}")
