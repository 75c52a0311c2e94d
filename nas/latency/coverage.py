"""What a latency table covers: the ops (block, input shape) a backbone runs, a detector's neck+head op, the ops
of a whole search space, and the canonical key of each."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Union

from torch import nn

from nas.arch.detector import NeckHead, check_detector
from nas.arch.headconfig import STRIDES, HeadConfig
from nas.arch.spec import ArchSpec, BlockSpec, block_to_dict
from nas.errors import ConfigError
from nas.space import SearchSpace

Shape = tuple[int, int, int]


def op_key(block: BlockSpec, shape: Shape) -> str:
    """Canonical text of one op at one input shape, e.g. 'ib kernel=3 expand=4.0 out=48 stride=2 se=0.0 act=relu in=32x80x80'."""
    d = block_to_dict(block)
    parts = [d.pop("op")]
    for k, v in d.items():
        if isinstance(v, list):
            v = "/".join(map(str, v))
        parts.append(f"{k}={v}")
    parts.append("in=" + "x".join(map(str, shape)))
    return " ".join(parts)


def arch_ops(arch: ArchSpec) -> list[tuple[str, BlockSpec, Shape]]:
    """(block name, block, input C×H×W) for every op the backbone runs, stem included."""
    h = w = arch.resolution
    rows = [("stem", arch.stem, (arch.channels, h, w))]
    h, w = (h + 1) // 2 if arch.stem.stride == 2 else h, (w + 1) // 2 if arch.stem.stride == 2 else w
    last = max(i for i, s in enumerate(arch.stages) if s.name in arch.features) if arch.features else len(arch.stages) - 1
    for sname, i, b, cin in arch.blocks():
        if [s.name for s in arch.stages].index(sname) > last:
            break
        rows.append((f"{sname}.{i}", b, (cin, h, w)))
        if b.stride == 2:
            h, w = (h + 1) // 2, (w + 1) // 2
    return rows


@dataclass(frozen=True)
class NeckHeadOp:
    """A detector's neck + head + box decoding behind three feature maps (strides 8/16/32), timed as one module
    taking the three maps: one table op per (head config, feature channels, resolution)."""

    head: HeadConfig
    in_channels: tuple[int, int, int]
    resolution: int

    @property
    def key(self) -> str:
        """e.g. 'neckhead neck=dw width=0.25 depth=0.33 classes=10 in=32/96/160 res=256'; reg_max and act only when
        not the defaults, so the keys of existing tables stay valid."""
        h, d = self.head, HeadConfig()
        extra = "".join(f" {k}={getattr(h, k)}" for k in ("reg_max", "act") if getattr(h, k) != getattr(d, k))
        return (f"neckhead neck={h.neck} width={float(h.width)} depth={float(h.depth)} classes={h.num_classes}"
                f"{extra} in={'/'.join(map(str, self.in_channels))} res={self.resolution}")

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple((c, self.resolution // s, self.resolution // s) for c, s in zip(self.in_channels, STRIDES))

    def build(self) -> nn.Module:
        return NeckHead(self.in_channels, self.head)


# What a table measures: a backbone op (block, input C×H×W) or a detector's neck+head.
TableOp = Union[tuple[BlockSpec, Shape], NeckHeadOp]


def neckhead_op(arch: ArchSpec, head: HeadConfig) -> NeckHeadOp:
    """The neck+head op of `arch` as a detector; ConfigError unless its features are at strides 8/16/32."""
    check_detector(arch, head)
    return NeckHeadOp(head, tuple(arch.feature_channels()), arch.resolution)


def extend_command(table: str, head: HeadConfig, what: str = "--space SPACE.yaml") -> str:
    """The `nas lut extend` line that adds the neck+head ops of `head` (default flags left out)."""
    d = HeadConfig()
    flags = [f"--neck {head.neck}"] + [f"--{k} {getattr(head, k)}" for k in ("width", "depth")
                                       if getattr(head, k) != getattr(d, k)] + [f"--classes {head.num_classes}"]
    return f"nas lut extend {table} {what} --detector {' '.join(flags)}"


def key_of(op: TableOp) -> str:
    """The table key of either kind of op."""
    return op.key if isinstance(op, NeckHeadOp) else op_key(*op)


def space_neckhead_ops(space: SearchSpace, head: HeadConfig) -> Iterator[NeckHeadOp]:
    """The detector's neck+head op for every combination of the feature stages' output channels and every
    resolution of `space`: what a table needs for budgets on the whole detector."""
    if space.feature_strides() != STRIDES:
        raise ConfigError(space.source, "features",
                          f"a detector needs three feature stages at strides {', '.join(map(str, STRIDES))}; "
                          f"{list(space.features)} are at strides {list(space.feature_strides())}")
    by_name = {st.name: st for st in space.stages}
    for res in space.resolution:
        for chans in itertools.product(*(by_name[f].out for f in space.features)):
            yield NeckHeadOp(head, tuple(chans), res)
