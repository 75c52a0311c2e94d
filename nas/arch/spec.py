"""Architecture specs (format `nas/arch@1`): typed, validated, with an exact YAML round trip.

An ArchSpec is fully concrete (no multipliers, no choices). Channel rounding happens where specs are
made (zoo, search space); the only derived width is the expansion width, computed in `BlockSpec.mid`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from nas.config import check_keys, join, load_yaml, parse_yaml, read, require_mapping, suggest
from nas.errors import ConfigError

FORMAT = "nas/arch@1"

ACTIVATIONS = ("relu", "relu6", "hswish", "swish", "silu", "gelu")

# Fields each op takes, in the order they are written. UIB family: start/middle depthwise kernels
# are implied by the op name (IB: middle, ConvNext: start, ExtraDW: both, FFN: neither).
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "conv": ("kernel", "out", "stride", "act"),
    "dsconv": ("kernel", "out", "stride", "act"),
    "ib": ("kernel", "expand", "out", "stride", "se", "act", "layer_scale"),
    "convnext": ("kernel", "expand", "out", "stride", "se", "act", "layer_scale"),
    "extra_dw": ("kernels", "expand", "out", "stride", "se", "act", "layer_scale"),
    "ffn": ("expand", "out", "stride", "se", "act", "layer_scale"),
    "fused_ib": ("kernel", "expand", "out", "stride", "se", "act"),
    "mqa": ("heads", "key_dim", "value_dim", "kv_stride", "kernel", "out", "stride", "layer_scale"),
    "c2f": ("repeats", "shortcut", "out", "stride", "act"),   # YOLOv8 CSP block (hidden width out/2)
    "sppf": ("kernel", "out", "stride", "act"),               # YOLOv8 spatial pyramid pooling, fast
}
OPS = tuple(OP_FIELDS)
UIB_OPS = ("ib", "convnext", "extra_dw", "ffn")
OPTIONAL_FIELDS = {"se": 0.0, "layer_scale": None, "stride": 1}
MAX_CHANNELS = 1 << 16
MAX_KERNEL = 31


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% below `v` (MobileNet rule)."""
    min_value = min_value or divisor
    new = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


@dataclass(frozen=True)
class BlockSpec:
    """One block. Which fields apply depends on `op` (see OP_FIELDS); the rest stay None."""

    op: str
    out: int
    stride: int = 1
    kernel: int | None = None            # conv, dsconv, ib (middle dw), convnext (start dw), fused_ib, mqa (kv dw)
    kernels: tuple[int, int] | None = None  # extra_dw: (start dw, middle dw)
    expand: float | None = None          # expansion ratio; mid width = make_divisible(in * expand), or in if 1
    se: float | None = None              # squeeze-excite ratio of the expanded width; 0 = none
    act: str | None = None
    layer_scale: float | None = None     # init value of a per-channel scale on the residual branch
    heads: int | None = None             # mqa
    key_dim: int | None = None
    value_dim: int | None = None
    kv_stride: int | None = None
    repeats: int | None = None           # c2f: number of bottlenecks
    shortcut: bool | None = None         # c2f: residual bottlenecks

    @property
    def start_kernel(self) -> int:
        """Kernel of the depthwise conv before expansion (0 = none)."""
        if self.op == "convnext":
            return self.kernel or 0
        if self.op == "extra_dw":
            return self.kernels[0]
        return 0

    @property
    def mid_kernel(self) -> int:
        """Kernel of the depthwise conv after expansion (0 = none)."""
        if self.op == "ib":
            return self.kernel or 0
        if self.op == "extra_dw":
            return self.kernels[1]
        return 0

    def mid(self, cin: int) -> int:
        """Expanded width for input width `cin`: one rounding rule for every block."""
        if self.expand is None or self.expand == 1.0:
            return cin
        return make_divisible(cin * self.expand)

    def se_width(self, cin: int) -> int:
        """SE reduced width: a quarter (se ratio) of the expanded width, rounded to 8 (MobileNetV3)."""
        return make_divisible(self.mid(cin) * self.se) if self.se else 0

    def residual(self, cin: int) -> bool:
        """Identity shortcut iff stride 1 and in == out (never for plain conv / MobileNetV1 dsconv)."""
        return self.op not in ("conv", "dsconv", "c2f", "sppf") and self.stride == 1 and cin == self.out


@dataclass(frozen=True)
class StageSpec:
    name: str
    blocks: tuple[BlockSpec, ...]


@dataclass(frozen=True)
class HeadSpec:
    """ImageNet-style classifier head, for zoo checks: [1x1 conv + BN + act] -> pool -> [1x1 hidden] -> FC."""

    conv: int = 0            # 1x1 conv before pooling (BN + act); 0 = none
    hidden: int = 0          # 1x1 conv after pooling; 0 = none
    hidden_norm: bool = False  # MobileNetV4: BN and no bias; MobileNetV3: bias and no BN
    act: str = "relu"
    dropout: float = 0.2
    classes: int = 1000


@dataclass(frozen=True)
class ArchSpec:
    name: str
    stem: BlockSpec
    stages: tuple[StageSpec, ...]
    features: tuple[str, ...]
    channels: int = 3
    resolution: int = 224
    head: HeadSpec | None = None
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)  # provenance: latency, study, trial

    def blocks(self) -> list[tuple[str, int, BlockSpec, int]]:
        """(stage name, index in stage, block, input channels) for every block after the stem."""
        rows, cin = [], self.stem.out
        for st in self.stages:
            for i, b in enumerate(st.blocks):
                rows.append((st.name, i, b, cin))
                cin = b.out
        return rows

    def stage_strides(self) -> dict[str, int]:
        """Output stride of each stage relative to the input."""
        s, out = self.stem.stride, {}
        for st in self.stages:
            for b in st.blocks:
                s *= b.stride
            out[st.name] = s
        return out

    def stage_channels(self) -> dict[str, int]:
        return {st.name: st.blocks[-1].out for st in self.stages}

    def feature_channels(self) -> list[int]:
        ch = self.stage_channels()
        return [ch[f] for f in self.features]

    def with_resolution(self, resolution: int) -> "ArchSpec":
        return replace(self, resolution=resolution)


# ---------------------------------------------------------------- parsing and validation

def _check_positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def _check_channels(v: int) -> str | None:
    if v <= 0:
        return "channels must be positive"
    return None if v <= MAX_CHANNELS else f"channels must be at most {MAX_CHANNELS}"


def _check_kernel(v: int) -> str | None:
    if v <= 0 or v % 2 == 0:
        return "kernel must be odd and positive (1, 3, 5, 7, ...)"
    return None if v <= MAX_KERNEL else f"kernel must be at most {MAX_KERNEL}"


def _check_stride(v: int) -> str | None:
    return None if v in (1, 2) else "stride must be 1 or 2"


def _check_act(v: str) -> str | None:
    return None if v in ACTIVATIONS else f"unknown activation{suggest(v, ACTIVATIONS)}; valid: {', '.join(ACTIVATIONS)}"


def _check_unit(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _check_expand(v: float) -> str | None:
    return None if 1.0 <= v <= 64.0 else "expansion ratio must be between 1 and 64"


def parse_block(d: Any, source: str, where: str, *, stem: bool = False) -> BlockSpec:
    d = require_mapping(d, source, where)
    op = read(d, "op", str, source, where)
    if op not in OP_FIELDS:
        raise ConfigError(source, join(where, "op"),
                          f"unknown op {op!r}{suggest(op, OPS)}; valid ops: {', '.join(OPS)}")
    if stem and op != "conv":
        raise ConfigError(source, join(where, "op"), f"the stem must be op 'conv', got {op!r}")
    fields = OP_FIELDS[op]
    check_keys(d, ("op",) + fields, source, where)
    kw: dict[str, Any] = {"op": op}
    for f in fields:
        default = OPTIONAL_FIELDS.get(f, ...)
        opt = {} if default is ... else {"default": default}
        if f == "kernel":
            kw[f] = read(d, f, int, source, where, check=_check_kernel, **opt)
        elif f == "kernels":
            ks = read(d, f, list, source, where)
            if len(ks) != 2:
                raise ConfigError(source, join(where, f), f"expected [start, middle] kernel sizes, got {ks!r}")
            for i in range(2):
                read({i: ks[i]}, i, int, source, join(where, f), check=_check_kernel)
            kw[f] = (ks[0], ks[1])
        elif f == "expand":
            kw[f] = read(d, f, float, source, where, check=_check_expand)
        elif f == "out":
            kw[f] = read(d, f, int, source, where, check=_check_channels)
        elif f in ("stride", "kv_stride"):
            kw[f] = read(d, f, int, source, where, check=_check_stride, **({"default": 1} if f == "stride" else {}))
        elif f == "se":
            kw[f] = read(d, f, float, source, where, check=_check_unit, **opt)
        elif f == "act":
            kw[f] = read(d, f, str, source, where, check=_check_act)
        elif f == "layer_scale":
            kw[f] = read(d, f, (float, type(None)), source, where,
                         check=lambda v: None if v is None or v > 0 else "must be positive or null", **opt)
        elif f in ("heads", "key_dim", "value_dim"):
            kw[f] = read(d, f, int, source, where, check=_check_channels)
        elif f == "repeats":
            kw[f] = read(d, f, int, source, where, check=lambda v: None if 1 <= v <= 64 else "must be between 1 and 64")
        elif f == "shortcut":
            kw[f] = read(d, f, bool, source, where)
    block = BlockSpec(**kw)
    if op == "ffn" and block.stride != 1:
        raise ConfigError(source, join(where, "stride"),
                          "an ffn block has no depthwise conv to carry a stride: use stride 1, or ib/convnext/extra_dw to downsample")
    if op in ("mqa", "c2f", "sppf") and block.stride != 1:
        raise ConfigError(source, join(where, "stride"),
                          f"{op} blocks keep the resolution: use stride 1 (downsample with a conv block before it)")
    return block


def parse_head(d: Any, source: str, where: str) -> HeadSpec:
    d = require_mapping(d, source, where)
    keys = ("conv", "hidden", "hidden_norm", "act", "dropout", "classes")
    check_keys(d, keys, source, where)
    nonneg = lambda v: None if 0 <= v <= MAX_CHANNELS else f"must be between 0 and {MAX_CHANNELS}"  # noqa: E731
    return HeadSpec(
        conv=read(d, "conv", int, source, where, default=0, check=nonneg),
        hidden=read(d, "hidden", int, source, where, default=0, check=nonneg),
        hidden_norm=read(d, "hidden_norm", bool, source, where, default=False),
        act=read(d, "act", str, source, where, default="relu", check=_check_act),
        dropout=read(d, "dropout", float, source, where, default=0.2,
                     check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        classes=read(d, "classes", int, source, where, default=1000, check=_check_channels),
    )


def arch_from_dict(d: Any, source: str = "<dict>") -> ArchSpec:
    """Validate a plain dict (as loaded from YAML) into an ArchSpec; errors name the file and field."""
    d = require_mapping(d, source, None)
    if "format" not in d:
        raise ConfigError(source, "format", f"missing format tag; the first line should be 'format: {FORMAT}'")
    if d["format"] != FORMAT:
        raise ConfigError(source, "format", f"expected {FORMAT!r}, got {d['format']!r}; is this an arch config?")
    check_keys(d, ("format", "name", "input", "stem", "stages", "features", "head", "info"), source, None)
    name = read(d, "name", str, source, None)
    inp = require_mapping(read(d, "input", dict, source, None), source, "input")
    check_keys(inp, ("channels", "resolution"), source, "input")
    channels = read(inp, "channels", int, source, "input", default=3, check=_check_channels)
    resolution = read(inp, "resolution", int, source, "input",
                      check=lambda v: None if 8 <= v <= 8192 else "resolution must be between 8 and 8192")
    stem = parse_block(read(d, "stem", dict, source, None), source, "stem", stem=True)
    stages_raw = read(d, "stages", list, source, None, check=lambda v: None if v else "needs at least one stage")
    stages, seen = [], set()
    for si, st in enumerate(stages_raw):
        w = join("stages", si)
        st = require_mapping(st, source, w)
        check_keys(st, ("name", "blocks"), source, w)
        sname = read(st, "name", str, source, w, check=lambda v: None if v.strip() else "must not be empty")
        if sname in seen:
            raise ConfigError(source, join(w, "name"), f"duplicate stage name {sname!r}")
        seen.add(sname)
        raw_blocks = read(st, "blocks", list, source, w, check=lambda v: None if v else "a stage needs at least one block")
        blocks = tuple(parse_block(b, source, f"stages.{sname}.blocks[{bi}]")
                       for bi, b in enumerate(raw_blocks))
        stages.append(StageSpec(sname, blocks))
    feats = read(d, "features", list, source, None)
    for fi, f in enumerate(feats):
        if not isinstance(f, str) or f not in seen:
            raise ConfigError(source, join("features", fi),
                              f"no stage named {f!r}{suggest(str(f), seen)}; stages: {', '.join(s.name for s in stages)}")
    head = parse_head(d["head"], source, "head") if d.get("head") is not None else None
    info = read(d, "info", dict, source, None, default={})
    arch = ArchSpec(name=name, stem=stem, stages=tuple(stages), features=tuple(feats), channels=channels,
                    resolution=resolution, head=head, info=info)
    check_shapes(arch, source)
    return arch


def check_shapes(arch: ArchSpec, source: str) -> None:
    """Cross-block rules: the input must survive every stride, MQA heads need matching widths."""
    total = arch.stem.stride * math.prod(b.stride for _, _, b, _ in arch.blocks())
    if arch.resolution < total:
        raise ConfigError(source, "input.resolution",
                          f"{arch.resolution} px is smaller than the network's total stride {total}")
    for sname, i, b, cin in arch.blocks():
        if b.op == "mqa" and b.out != cin:
            raise ConfigError(source, f"stages.{sname}.blocks[{i}].out",
                              f"an mqa block keeps its width: out must equal its input width {cin}")


def load_arch(path: str | Path) -> ArchSpec:
    return arch_from_dict(load_yaml(path), str(path))


def loads_arch(text: str, source: str = "<string>") -> ArchSpec:
    return arch_from_dict(parse_yaml(text, source), source)


# ---------------------------------------------------------------- dumping

def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return yaml.safe_dump(v).split("\n")[0]
    if isinstance(v, float):
        r = repr(v)  # YAML 1.1 reads "1e-05" as a string: the mantissa needs a dot
        return r.replace("e", ".0e") if "e" in r and "." not in r else r
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(x)}" for k, x in v.items()) + "}"
    # dumped inside a flow list, so that PyYAML quotes what a flow context would misread (",", "]", "{", ...)
    return yaml.safe_dump([str(v)], default_flow_style=True, width=1 << 30).strip()[1:-1]


def block_to_dict(b: BlockSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"op": b.op}
    for f in OP_FIELDS[b.op]:
        v = getattr(b, f)
        if f == "layer_scale" and v is None:
            continue
        d[f] = list(v) if isinstance(v, tuple) else v
    return d


def arch_to_dict(arch: ArchSpec) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": FORMAT, "name": arch.name,
        "input": {"channels": arch.channels, "resolution": arch.resolution},
        "stem": block_to_dict(arch.stem),
        "stages": [{"name": s.name, "blocks": [block_to_dict(b) for b in s.blocks]} for s in arch.stages],
        "features": list(arch.features),
    }
    if arch.head is not None:
        h = arch.head
        d["head"] = {"conv": h.conv, "hidden": h.hidden, "hidden_norm": h.hidden_norm, "act": h.act,
                     "dropout": h.dropout, "classes": h.classes}
    if arch.info:
        d["info"] = dict(arch.info)
    return d


def dumps_arch(arch: ArchSpec) -> str:
    """Stable text: one line per block, fields in a fixed order, a comment with each stage's stride."""
    d = arch_to_dict(arch)
    strides = arch.stage_strides()
    lines = [f"format: {FORMAT}", f"name: {_scalar(arch.name)}",
             f"input: {_scalar(d['input'])}", f"stem: {_scalar(d['stem'])}", "stages:"]
    for st in d["stages"]:
        lines.append(f"  - name: {_scalar(st['name'])}  # stride {strides[st['name']]}")
        lines.append("    blocks:")
        lines.extend(f"      - {_scalar(b)}" for b in st["blocks"])
    lines.append(f"features: {_scalar(d['features'])}")
    if "head" in d:
        lines.append(f"head: {_scalar(d['head'])}")
    if "info" in d:
        lines.append(f"info: {_scalar(d['info'])}")
    return "\n".join(lines) + "\n"


def save_arch(arch: ArchSpec, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps_arch(arch))
    return p
