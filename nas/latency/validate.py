"""How good is a latency table? Predicted vs measured end-to-end latency on sampled architectures, beside a
FLOPs-based predictor; the table's calibration (fitted on other sampled networks) and the plain sum reported apart."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from nas.arch.cost import arch_cost
from nas.arch.detector import detector_cost
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.latency.header import SCALE_RANGE
from nas.latency.measurer import LOCAL, Measurer, measure_all, network_job
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable, LatencyTableError
from nas.space import SearchSpace


@dataclass(frozen=True)
class Accuracy:
    """Agreement of a predictor with measurement."""

    mape: float          # mean absolute percentage error, %
    within_5: float      # fraction of architectures within ±5 %
    within_10: float
    kendall_tau: float
    spearman_rho: float
    bias: float          # median of predicted / measured - 1, %

    def to_json(self) -> dict[str, float | int]:
        """The keys `nas lut validate --json` promises."""
        return {"mape": self.mape, "within_5pct": self.within_5, "within_10pct": self.within_10,
                "kendall_tau": self.kendall_tau, "spearman": self.spearman_rho, "bias_pct": self.bias}


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> Accuracy:
    from scipy.stats import kendalltau, spearmanr

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = p / m - 1
    tau = kendalltau(p, m).statistic if len(p) > 1 else float("nan")
    rho = spearmanr(p, m).statistic if len(p) > 1 else float("nan")
    return Accuracy(float(100 * np.mean(np.abs(rel))), float(np.mean(np.abs(rel) <= 0.05)),
                    float(np.mean(np.abs(rel) <= 0.10)), float(tau), float(rho), float(100 * np.median(rel)))


def flops_baseline(macs: Sequence[float], params: Sequence[float], measured: Sequence[float], folds: int = 5) -> np.ndarray:
    """Cross-validated predictions of a linear fit latency ~ a·MACs + b·params + c (each arch predicted by a
    model that never saw it): the usual proxy a lookup table has to beat."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_predict

    x = np.column_stack([macs, params]).astype(float)
    y = np.asarray(measured, float)
    if len(y) < 3:  # nothing to cross-validate on: predict the mean of the others (or the value itself)
        return np.full_like(y, y.mean())
    k = min(folds, len(y))
    return cross_val_predict(LinearRegression(), x, y, cv=KFold(k, shuffle=True, random_state=0))


CALIBRATION_SEED = 10**9  # sampling stream of the calibration networks: disjoint from `nas lut validate --seed S`


def measure_archs(table: LatencyTable, archs: Sequence[ArchSpec], protocol: Protocol, head: HeadConfig | None = None,
                  progress: bool = True, desc: str = "measuring architectures",
                  measurer: Measurer = LOCAL) -> list[dict]:
    """Each architecture's backbone (with `head`: the whole detector) predicted by `table` and measured end to end
    under `protocol` on `measurer`'s device, normalised to the table's machine speed exactly as its entries were;
    raw figures beside."""
    from tqdm import tqdm

    table.check_compatible(protocol, measurer=measurer)
    rows = []
    preds = [table.predict(arch, head) for arch in archs]  # a missing entry fails before anything is measured
    measured = measure_all(measurer, (network_job(a, head) for a in archs), protocol)
    for arch, pred, raw in zip(tqdm(archs, desc=desc, disable=not progress, unit="arch"), preds, measured):
        if head is None:
            cost = arch_cost(arch)
            params, macs = cost.params, cost.macs
        else:
            params, macs = detector_cost(arch, head, arch.resolution)
        m = raw.normalised(table.reference_us)
        rows.append({"arch": arch.name, "resolution": arch.resolution, "predicted_us": round(pred.total_us, 1),
                     "sum_us": round(pred.sum_us, 1), "measured_us": round(m.value_us(protocol.statistic), 1),
                     "measured_median_us": round(m.median_us, 1), "measured_p90_us": round(m.p90_us, 1),
                     "raw_measured_us": round(raw.value_us(protocol.statistic), 1),
                     "reference_us": raw.reference_us and round(raw.reference_us, 1),
                     "macs": macs, "params": params, "blocks": len(pred.blocks)})
    return rows


def calibrate(table: LatencyTable, archs: Sequence[ArchSpec], protocol: Protocol | None = None,
              progress: bool = True, measurer: Measurer = LOCAL) -> float:
    """Fit the table's calibration: scale = median over `archs` of measured / summed latency, stored in the header.

    Why: a block timed on its own is not a block inside a network (caches warm from the previous block, a
    different allocation pattern, per-call overhead); on this machine torch backbones ran 7-11% slower end to end
    than the sum of their blocks, consistently. One scale, from networks the validation never samples
    (`CALIBRATION_SEED`), removes that bias; `nas lut validate` reports the plain sum beside it."""
    protocol = protocol or table.protocol
    return fit_calibration(table, measure_archs(table, archs, protocol, progress=progress, desc="calibrating",
                                                measurer=measurer))


def fit_calibration(table: LatencyTable, rows: Sequence[dict]) -> float:
    """The calibration of `measure_archs` rows (median of measured / sum), checked and stored in the header."""
    scale = float(np.median([r["measured_us"] / r["sum_us"] for r in rows]))
    lo, hi = SCALE_RANGE
    if not lo <= scale <= hi:
        raise LatencyTableError(
            f"{table.path or table.name}: networks measured {scale:.2f}x the sum of their table entries (allowed "
            f"{lo}-{hi}); the table was measured under other conditions than this machine now: rebuild it with "
            f"`nas lut build`")
    table.header["calibration"] = {"scale": round(scale, 4), "archs": len(rows), "seed": CALIBRATION_SEED,
                                   "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return scale


def end_to_end(protocol: Protocol, repeats: int = 30, min_time: float = 0.3) -> Protocol:
    """End-to-end runs are few and long: time more of them than a table entry (binding fields unchanged)."""
    return replace(protocol, repeats=repeats, min_time_s=min_time)


def calibration_archs(space: SearchSpace, n: int) -> list[ArchSpec]:
    return [space.random(CALIBRATION_SEED + i, name=f"calibration-{i}") for i in range(n)]


def validation_archs(space: SearchSpace, n: int, seed: int) -> list[ArchSpec]:
    """The `nas lut validate --seed` sample: seeds below 10^4 never reach the calibration stream."""
    return [space.random(seed * 100_003 + i, name=f"sample-{i}") for i in range(n)]


@dataclass
class ValidationReport:
    table: str
    protocol: str
    n: int
    lut: Accuracy                      # what `predict` returns: the sum times the table's calibration scale
    flops: Accuracy
    plain_sum: Accuracy | None         # the uncalibrated sum (None when the table has no calibration)
    calibration: dict | None           # the table's header.calibration
    raw: Accuracy | None               # against measurements not normalised for machine-speed drift
    rows: list[dict]
    adapted_from: dict | None = None   # the table's header.adapted_from (None: measured here, not adapted)
    n_adapt: int | None = None         # networks measured end to end for the adaptation

    def summary(self) -> dict:
        """n and the lookup table's figures at the top level, the FLOPs predictor's under `baseline`."""
        d = {"n": self.n, **self.lut.to_json(), "baseline": self.flops.to_json(), "table": self.table,
             "protocol": self.protocol, "calibration": self.calibration, "adapted_from": self.adapted_from,
             "n_adapt": self.n_adapt}
        if self.plain_sum is not None:
            d["sum"] = self.plain_sum.to_json()
        if self.raw is not None:
            d["raw"] = self.raw.to_json()
        return d


def validate(table: LatencyTable, archs: Sequence[ArchSpec], protocol: Protocol | None = None,
             progress: bool = True, head: HeadConfig | None = None, measurer: Measurer = LOCAL) -> ValidationReport:
    """Measure each architecture's backbone (with `head`: the whole detector, against backbone + neck+head op)
    end to end under the table's own protocol and compare with the table's predictions, the plain sum of its
    entries and a FLOPs predictor."""
    protocol = protocol or table.protocol
    rows = measure_archs(table, archs, protocol, head, progress, measurer=measurer)
    pred = [r["predicted_us"] for r in rows]
    meas = [r["measured_us"] for r in rows]
    flops_pred = flops_baseline([r["macs"] for r in rows], [r["params"] for r in rows], meas)
    for r, f in zip(rows, flops_pred):
        r["flops_predicted_us"] = round(float(f), 1)
    calibration = table.header.get("calibration")
    plain = accuracy([r["sum_us"] for r in rows], meas) if calibration else None
    raw = accuracy(pred, [r["raw_measured_us"] for r in rows]) if table.reference_us else None
    adaptation = table.header.get("adaptation") or {}
    return ValidationReport(str(table.path or table.name), protocol.describe(), len(rows), accuracy(pred, meas),
                            accuracy(flops_pred, meas), plain, calibration, raw, rows,
                            table.header.get("adapted_from"), adaptation.get("networks"))


def write_report(report: ValidationReport, out_dir: str | Path, tensorboard: bool = True) -> dict[str, Path]:
    """CSV of every architecture, JSON summary, predicted-vs-measured scatter (PNG and TensorBoard)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "validation.csv", "json": out / "validation.json", "png": out / "predicted_vs_measured.png"}
    cols = list(report.rows[0])
    for r in report.rows:
        cols += [c for c in r if c not in cols]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(report.rows)
    paths["json"].write_text(json.dumps(report.summary(), indent=2))
    fig = scatter_figure(report)
    fig.savefig(paths["png"], dpi=120)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tb")) as tb:
            tb.add_figure("latency/predicted_vs_measured", fig)
            for name, acc in (("lut", report.lut), ("flops", report.flops), ("sum", report.plain_sum),
                              ("raw", report.raw)):
                if acc is not None:
                    for k, v in asdict(acc).items():
                        tb.add_scalar(f"latency_validation/{name}/{k}", v)
        paths["tensorboard"] = out / "tb"
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def scatter_figure(report: ValidationReport):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = np.array([r["measured_us"] for r in report.rows]) / 1e3
    scaled = f" x {report.calibration['scale']} (calibration)" if report.calibration else ""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(meas, np.array([r["predicted_us"] for r in report.rows]) / 1e3, s=14,
               label=f"lookup table{scaled} (MAPE {report.lut.mape:.1f}%, τ {report.lut.kendall_tau:.2f})")
    ax.scatter(meas, np.array([r["flops_predicted_us"] for r in report.rows]) / 1e3, s=14, marker="x",
               label=f"linear in MACs+params (MAPE {report.flops.mape:.1f}%, τ {report.flops.kendall_tau:.2f})")
    lo, hi = float(meas.min()) * 0.8, float(meas.max()) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for f in (0.9, 1.1):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.5, label="±10%" if f > 1 else None)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{Path(report.table).name}: {report.n} architectures", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
