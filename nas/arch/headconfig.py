"""What follows the backbone in a detector, as plain data: the command line, search experiments and latency
tables read it without importing torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nas.arch.spec import ACTIVATIONS
from nas.errors import ConfigError

NECKS = ("yolov8", "dw")


@dataclass(frozen=True)
class HeadConfig:
    """What follows the backbone in a Detector: the neck type, its width and depth multipliers, the number of
    classes, the DFL bins per box side and the activation. With the backbone's three feature channel counts and the
    input resolution it fixes the neck+head's latency (a latency table stores it as one op, see
    nas.latency.coverage.NeckHeadOp)."""

    neck: str = "dw"
    width: float = 0.25
    depth: float = 0.33
    num_classes: int = 10
    reg_max: int = 16
    act: str = "silu"

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
        if isinstance(self.reg_max, bool) or not isinstance(self.reg_max, int) or not 2 <= self.reg_max <= 64:
            raise ConfigError(src, "reg_max", f"must be in [2, 64], got {self.reg_max!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(src, "act", f"unknown activation {self.act!r}; valid: {', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (what a study records per trial; `HeadConfig(**d)` reads it back), reg_max and
        act only when not the defaults, so records stay as they were before those two were fields."""
        return {k: v for k, v in asdict(self).items() if k not in ("reg_max", "act") or v != getattr(HeadConfig, k)}


STRIDES = (8, 16, 32)
