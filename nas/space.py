"""Search spaces (format `nas/space@1`): MnasNet-style factorised choices per stage, sampled into ArchSpecs.

Every trial draws the same fixed set of parameters (names and choices never change between trials), so
TPE and NSGA-II can learn from them; parameters a sampled architecture does not use are simply ignored.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from nas.arch.spec import ACTIVATIONS, ArchSpec, BlockSpec, StageSpec, check_shapes, make_divisible
from nas.config import check_keys, join, load_yaml, read, require_mapping, suggest
from nas.errors import ConfigError

FORMAT = "nas/space@1"
SEARCH_OPS = ("ib", "convnext", "extra_dw", "ffn", "fused_ib")
MAX_DEPTH = 12
MAX_OPS = 200_000  # ops a latency table must measure (the shipped space: ~14k); beyond this, a build takes days


class Chooser(Protocol):
    def __call__(self, name: str, choices: Sequence[Any]) -> Any: ...


def trial_chooser(trial) -> Chooser:
    """Draw through an Optuna trial: one categorical parameter per name, fixed choices."""
    return lambda name, choices: trial.suggest_categorical(name, list(choices))


def rng_chooser(rng: random.Random) -> Chooser:
    return lambda name, choices: choices[rng.randrange(len(choices))]


@dataclass(frozen=True)
class StageChoices:
    name: str
    stride: int                    # stride of the stage's first block
    depth: tuple[int, ...]
    out: tuple[int, ...]
    ops: tuple[str, ...]
    kernels: tuple[int, ...]       # depthwise (and fused) kernel sizes, start and middle alike
    expand: tuple[float, ...]
    se: tuple[bool, ...]
    act: tuple[str, ...]

    def block_ops(self, index: int) -> tuple[str, ...]:
        """An FFN has no depthwise conv to carry a stride, so a striding first block cannot be one."""
        if index == 0 and self.stride == 2:
            return tuple(o for o in self.ops if o != "ffn")
        return self.ops

    def kernel_configs(self, op: str) -> list[tuple[int, int]]:
        """(start, middle) depthwise kernels an op can take; fused_ib's full conv uses the middle slot."""
        ks = self.kernels
        return {"ib": [(0, k) for k in ks], "convnext": [(k, 0) for k in ks],
                "extra_dw": [(a, k) for a in ks for k in ks], "ffn": [(0, 0)],
                "fused_ib": [(0, k) for k in ks]}[op]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    resolution: tuple[int, ...]
    stem_out: tuple[int, ...]
    stem_act: tuple[str, ...]
    stages: tuple[StageChoices, ...]
    features: tuple[str, ...]
    per_block: bool = True         # op, kernels and expansion drawn per block (else once per stage)
    se_ratio: float = 0.25
    source: str = "<space>"

    # ------------------------------------------------------------ parameters and sampling
    def parameters(self) -> dict[str, tuple]:
        """Every parameter a trial draws, in order, with its fixed choices."""
        p: dict[str, tuple] = {"resolution": self.resolution, "stem.out": self.stem_out, "stem.act": self.stem_act}
        for st in self.stages:
            n = st.name
            p[f"{n}.depth"], p[f"{n}.out"], p[f"{n}.se"], p[f"{n}.act"] = st.depth, st.out, st.se, st.act
            slots = [f"{n}.b{i}" for i in range(max(st.depth))] if self.per_block else [n]
            for i, slot in enumerate(slots):
                p[f"{slot}.op"] = st.block_ops(i)
                p[f"{slot}.k_start"] = st.kernels
                p[f"{slot}.k_mid"] = st.kernels
                p[f"{slot}.expand"] = st.expand
        return p

    def sample(self, chooser: Chooser, name: str = "sample") -> ArchSpec:
        """Draw an ArchSpec; pass `trial_chooser(trial)` for Optuna or `rng_chooser(random.Random(seed))`."""
        v = {k: chooser(k, c) for k, c in self.parameters().items()}
        stem = BlockSpec("conv", out=v["stem.out"], stride=2, kernel=3, act=v["stem.act"])
        stages = []
        for st in self.stages:
            n = st.name
            blocks = []
            for i in range(v[f"{n}.depth"]):
                slot = f"{n}.b{i}" if self.per_block else n
                op = v[f"{slot}.op"]
                if op not in st.block_ops(i):  # per-stage draw of an op the first block cannot use
                    op = "ib"
                blocks.append(self._block(op, v[f"{slot}.k_start"], v[f"{slot}.k_mid"], v[f"{slot}.expand"],
                                          v[f"{n}.out"], st.stride if i == 0 else 1, v[f"{n}.se"], v[f"{n}.act"]))
            stages.append(StageSpec(n, tuple(blocks)))
        return ArchSpec(name=name, stem=stem, stages=tuple(stages), features=self.features,
                        resolution=v["resolution"])

    def _block(self, op: str, k_start: int, k_mid: int, expand: float, out: int, stride: int, se: bool,
               act: str) -> BlockSpec:
        se_r = self.se_ratio if se else 0.0
        if op == "ib":
            return BlockSpec("ib", out=out, stride=stride, kernel=k_mid, expand=expand, se=se_r, act=act)
        if op == "convnext":
            return BlockSpec("convnext", out=out, stride=stride, kernel=k_start, expand=expand, se=se_r, act=act)
        if op == "extra_dw":
            return BlockSpec("extra_dw", out=out, stride=stride, kernels=(k_start, k_mid), expand=expand, se=se_r,
                             act=act)
        if op == "ffn":
            return BlockSpec("ffn", out=out, stride=stride, expand=expand, se=se_r, act=act)
        return BlockSpec("fused_ib", out=out, stride=stride, kernel=k_mid, expand=expand, se=se_r, act=act)

    def random(self, seed: int, name: str | None = None) -> ArchSpec:
        return self.sample(rng_chooser(random.Random(seed)), name or f"random-{seed}")

    # ------------------------------------------------------------ size and coverage
    def _block_configs(self, st: StageChoices, index: int) -> list[tuple[str, int, int, float]]:
        return [(op, a, k, e) for op in st.block_ops(index) for a, k in st.kernel_configs(op) for e in st.expand]

    def log10_size(self) -> float:
        """log10 of the number of distinct architectures."""
        total = math.log10(len(self.resolution) * len(self.stem_out) * len(self.stem_act))
        for st in self.stages:
            c0, c = len(self._block_configs(st, 0)), len(self._block_configs(st, 1))
            if self.per_block:
                seqs = sum(c0 * c ** (d - 1) for d in st.depth)
            else:
                seqs = len(st.depth) * c0
            total += math.log10(len(st.out) * len(st.se) * len(st.act) * seqs)
        return total

    def ops(self) -> Iterator[tuple[BlockSpec, tuple[int, int, int]]]:
        """Every distinct (block, input C×H×W) any architecture of the space contains: what a latency table covers."""
        seen = set()
        for res in self.resolution:
            h = (res + 1) // 2
            for out in self.stem_out:
                for act in self.stem_act:
                    yield BlockSpec("conv", out=out, stride=2, kernel=3, act=act), (3, res, res)
            cins = self.stem_out
            for st in self.stages:
                h_out = (h + 1) // 2 if st.stride == 2 else h
                for i in (0, 1) if max(st.depth) > 1 else (0,):
                    for cin in (cins if i == 0 else st.out):
                        for out in st.out:
                            if i == 1 and cin != out:
                                continue
                            for op, a, k, e in self._block_configs(st, i):
                                for se in st.se:
                                    for act in st.act:
                                        b = self._block(op, a, k, e, out, st.stride if i == 0 else 1, se, act)
                                        shape = (cin, h if i == 0 else h_out, h if i == 0 else h_out)
                                        if (b, shape) not in seen:
                                            seen.add((b, shape))
                                            yield b, shape
                cins, h = st.out, h_out

    def feature_strides(self) -> tuple[int, ...]:
        """Output stride of each feature stage (the stem halves the input)."""
        stride, out = 2, {}
        for st in self.stages:
            stride *= st.stride
            out[st.name] = stride
        return tuple(out[f] for f in self.features)

    def op_bounds(self) -> dict[str, int]:
        """Upper bound of the distinct ops per stage ('stem' included), counted without enumerating `ops()`."""
        n_res = len(self.resolution)
        out, cins = {"stem": n_res * len(self.stem_out) * len(self.stem_act)}, len(self.stem_out)
        for st in self.stages:
            variants = len(st.se) * len(st.act)
            n = cins * len(st.out) * len(self._block_configs(st, 0)) * variants
            if max(st.depth) > 1:
                n += len(st.out) * len(self._block_configs(st, 1)) * variants
            out[st.name], cins = n * n_res, len(st.out)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "log10_size": round(self.log10_size(), 2), "num_ops": sum(1 for _ in self.ops()),
                "parameters": {k: list(v) for k, v in self.parameters().items()}}


# ---------------------------------------------------------------- loading

def _choices(d: dict, key: str, kind: type, source: str, where: str, check=None, default=None) -> tuple:
    if key not in d and default is not None:
        return tuple(default)
    raw = read(d, key, list, source, where, check=lambda v: None if v else "needs at least one choice")
    out = []
    for i, x in enumerate(raw):
        out.append(read({i: x}, i, kind, source, join(where, key), check=check))
    if len(set(out)) != len(out):
        raise ConfigError(source, join(where, key), f"duplicate choices in {raw!r}")
    return tuple(out)


def _check_channels(v: int) -> str | None:
    if v <= 0 or v > 4096:
        return "channels must be between 1 and 4096"
    return None if v % 8 == 0 else f"channels must be multiples of 8 (rounded in the space, e.g. {make_divisible(v)})"


def space_from_dict(d: Any, source: str = "<dict>") -> SearchSpace:
    d = require_mapping(d, source, None)
    if d.get("format") != FORMAT:
        raise ConfigError(source, "format", f"expected {FORMAT!r}, got {d.get('format')!r}; is this a search space?")
    check_keys(d, ("format", "name", "resolution", "stem", "stages", "features", "per_block", "se_ratio"), source, None)
    odd = lambda k: None if k % 2 == 1 and 1 <= k <= 31 else "kernel must be odd, between 1 and 31"  # noqa: E731
    act_ok = lambda a: None if a in ACTIVATIONS else f"unknown activation{suggest(a, ACTIVATIONS)}"  # noqa: E731
    res = _choices(d, "resolution", int, source, "",
                   check=lambda r: None if 32 <= r <= 4096 and r % 32 == 0 else "must be a multiple of 32 in [32, 4096]")
    stem = require_mapping(read(d, "stem", dict, source, None), source, "stem")
    check_keys(stem, ("out", "act"), source, "stem")
    stem_out = _choices(stem, "out", int, source, "stem", check=_check_channels)
    stem_act = _choices(stem, "act", str, source, "stem", check=act_ok)
    stages, names = [], []
    for si, st in enumerate(read(d, "stages", list, source, None, check=lambda v: None if v else "needs at least one stage")):
        w = join("stages", si)
        st = require_mapping(st, source, w)
        check_keys(st, ("name", "stride", "depth", "out", "ops", "kernels", "expand", "se", "act"), source, w)
        name = read(st, "name", str, source, w)
        if name in names:
            raise ConfigError(source, join(w, "name"), f"duplicate stage name {name!r}")
        w = f"stages.{name}"
        stages.append(StageChoices(
            name=name,
            stride=read(st, "stride", int, source, w, check=lambda s: None if s in (1, 2) else "stride must be 1 or 2"),
            depth=_choices(st, "depth", int, source, w,
                           check=lambda n: None if 1 <= n <= MAX_DEPTH else f"depth must be between 1 and {MAX_DEPTH}"),
            out=_choices(st, "out", int, source, w, check=_check_channels),
            ops=_choices(st, "ops", str, source, w, check=lambda o: None if o in SEARCH_OPS else
                         f"unknown op{suggest(o, SEARCH_OPS)}; searchable ops: {', '.join(SEARCH_OPS)}"),
            kernels=_choices(st, "kernels", int, source, w, check=odd),
            expand=_choices(st, "expand", float, source, w,
                            check=lambda e: None if 1 <= e <= 16 else "expansion must be between 1 and 16"),
            se=_choices(st, "se", bool, source, w, default=(False,)),
            act=_choices(st, "act", str, source, w, check=act_ok),
        ))
        names.append(name)
        if stages[-1].stride == 2 and set(stages[-1].ops) == {"ffn"}:
            raise ConfigError(source, join(w, "ops"), "a striding stage needs an op with a depthwise conv, not only ffn")
    feats = _choices(d, "features", str, source, "",
                     check=lambda f: None if f in names else
                     f"no stage named that{suggest(f, names)}; stages: {', '.join(names)}")
    space = SearchSpace(name=read(d, "name", str, source, None), resolution=res, stem_out=stem_out, stem_act=stem_act,
                        stages=tuple(stages), features=feats, per_block=read(d, "per_block", bool, source, None, default=True),
                        se_ratio=read(d, "se_ratio", float, source, None, default=0.25,
                                      check=lambda r: None if 0 < r <= 1 else "must be in (0, 1]"),
                        source=source)
    bounds = space.op_bounds()
    if sum(bounds.values()) > MAX_OPS:  # `nas space info` and `nas lut build` would enumerate them all
        worst = max(bounds, key=bounds.get)
        raise ConfigError(source, worst if worst == "stem" else f"stages.{worst}",
                          f"the space has up to {sum(bounds.values()):,} ops to measure (limit {MAX_OPS:,}), "
                          f"{bounds[worst]:,} from here; use fewer choices of out, ops, kernels or expand")
    check_shapes(space.random(0).with_resolution(min(res)), source)
    return space


def load_space(path: str | Path) -> SearchSpace:
    return space_from_dict(load_yaml(path), str(path))
