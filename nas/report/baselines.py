"""Zoo baselines on a search's axes: predicted by the same table and scored by the same evaluator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:

    from nas.arch.headconfig import HeadConfig
    from nas.arch.spec import ArchSpec
    from nas.latency.table import LatencyTable


# The reference points the issue asks for (MobileNetV2/V3/V4): the models a user would otherwise pick.
ZOO_BASELINES = ("mobilenet_v2_100", "mobilenet_v3_small_100", "mobilenet_v3_large_100", "mobilenet_v4_conv_small")


BASELINES_ATTR = "baselines"  # study user attr: the zoo baselines the search logged, for `nas pareto`


@dataclass(frozen=True)
class Baseline:
    """A reference architecture (a zoo model) predicted by the same table and scored by the same evaluator."""

    name: str
    predicted_ms: float
    score: float


# ---------------------------------------------------------------- zoo baselines

def zoo_baselines(table: LatencyTable, resolutions: Iterable[int], score_fn: Callable[[ArchSpec], float],
                  names: Iterable[str] = ZOO_BASELINES, head: HeadConfig | None = None
                  ) -> tuple[list[Baseline], list[str]]:
    """Zoo models at each search resolution the table fully covers, predicted by it (with `head`: as whole
    detectors, like detector-scope trials) and scored by `score_fn`. Returns the baselines and one note per model
    skipped (the table lacks its ops, or scoring failed)."""
    from nas.arch.zoo import get_arch
    from nas.errors import ConfigError
    from nas.latency.coverage import arch_ops, extend_command, neckhead_op

    res = sorted(set(resolutions))
    out, notes = [], []
    for name in names:
        for r in res:
            arch = get_arch(name).with_resolution(r)
            label = name if len(res) == 1 else f"{name}@{r}"
            ops: list = [(b, s) for _, b, s in arch_ops(arch)]
            try:
                ops += [neckhead_op(arch, head)] if head is not None else []
            except ConfigError as e:
                notes.append(f"baseline {label} skipped: not usable as a detector ({e.message})"[:300])
                continue
            missing = table.missing(ops)
            if missing:
                what = f"--arch zoo:{name} --resolution {r}"
                fix = extend_command("TABLE", head, what) if head is not None else f"nas lut extend TABLE {what}"
                notes.append(f"baseline {label} skipped: latency table {table.name} has no entry for {len(missing)} "
                             f"of its ops (add them with `{fix}`)")
                continue
            try:
                out.append(Baseline(label, table.predict(arch, head).total_ms, float(score_fn(arch))))
            except Exception as e:  # noqa: BLE001 - a baseline is decoration: never fail the search for it
                notes.append(f"baseline {label} skipped: scoring failed ({type(e).__name__}: {e})"[:300])
    return out, notes
