"""Export one trial of a search: its arch YAML with provenance, the latency measured here now, and optionally the
backbone as ONNX. The work behind `nas export` and the quickstart's export step."""
from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.arch.spec import ArchSpec, dumps_arch, load_arch, loads_arch, save_arch
from nas.errors import NasError
from nas.report.fronts import pick, score_name
from nas.report.runs import Run, trial_head

if TYPE_CHECKING:
    from nas.arch.headconfig import HeadConfig
    from nas.latency.table import LatencyTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    """What `export_trial` wrote and measured."""

    path: Path                     # the arch YAML
    arch: ArchSpec                 # as written, provenance in arch.info
    trial: int
    pick: str                      # knee | best | trial N
    head: HeadConfig | None        # the neck+head the latencies include (detector-scope searches), else None
    predicted_ms: float | None
    measured_ms: float | None = None
    measured_normalised_ms: float | None = None  # the measurement at the table's reference speed
    onnx: Path | None = None
    onnx_max_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `nas export --json` object."""
        d: dict[str, Any] = {"arch": str(self.path), "trial": self.trial, "pick": self.pick,
                             "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms}
        if self.measured_normalised_ms is not None:
            d["measured_normalised_ms"] = self.measured_normalised_ms
        if self.onnx is not None:
            d.update(onnx=str(self.onnx), onnx_max_diff=self.onnx_max_diff)
        return d


def export_trial(run: Run, choice: str = "knee", out: str | Path | None = None, *, table: str | None = None,
                 measure: bool = True, onnx: bool = False) -> Exported:
    """Write the trial `choice` picks ('best', 'knee' or 'trial:N') as OUT/trial-N.yaml (default RUN/export) with
    its study, trial, table, predicted latency and, with `measure`, the latency measured on this machine now
    (`table` overrides the run's latency table); with `onnx`, also the untrained backbone as trial-N.backbone.onnx."""
    t, how = pick(run.study, choice)
    a = t.user_attrs
    arch = loads_arch(a["arch"], f"study {run.study.study_name} trial {t.number}")
    if not (a.get("evaluated") is True and all(v <= 0 for v in t.constraints.values())):
        log.warning("trial %d is infeasible (predicted %s ms, budget %s ms)", t.number, a.get("predicted_ms"),
                    a.get("budget_ms"))
    head = trial_head(a)
    info: dict[str, Any] = {**arch.info, "study": run.study.study_name, "storage": run.url, "trial": t.number,
                            "pick": how, "table": a.get("table"), "scope": a.get("scope", "backbone"),
                            "budget_ms": a.get("budget_ms"), "predicted_ms": a.get("predicted_ms")}
    if head is not None:  # the latencies are of this detector: `nas train` needs the same neck to deploy it
        info.update(neck=head.neck, num_classes=head.num_classes)
    if isinstance(a.get("score"), (int, float)):
        info.update(score=a["score"], score_name=score_name(run.study))
    if measure:
        latency_table = run.table(table, "measuring the latency")
        info.update(_measured(arch, head, latency_table, t.number, a.get("predicted_ms")))
    info["exported"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    arch = replace(arch, info={k: _flow_safe(v) for k, v in info.items()})
    folder = Path(out) if out else (run.run_dir or Path(".")) / "export"
    path = save_arch(arch, folder / f"trial-{t.number}.yaml")
    if dumps_arch(load_arch(path)) != path.read_text():  # what `nas train` reads must be exactly what we wrote
        raise NasError(f"{path}: the exported YAML does not round-trip; please report this")
    onnx_path, diff = _backbone_onnx(arch, folder / f"trial-{t.number}.backbone.onnx") if onnx else (None, None)
    return Exported(path, arch, t.number, how, head, info.get("predicted_ms"), info.get("measured_ms"),
                    info.get("measured_normalised_ms"), onnx_path, diff)


def _measured(arch: ArchSpec, head: HeadConfig | None, table: LatencyTable, trial: int,
              stored_ms: float | None) -> dict[str, Any]:
    """The provenance fields of a measurement of `arch` (with `head`) here now, under the table's protocol."""
    from nas.latency.environment import environment
    from nas.latency.profile import measure_network

    now = round(table.predict(arch, head).total_ms, 4)
    if stored_ms is not None and not math.isclose(now, stored_ms, rel_tol=1e-3):
        log.warning("%s now predicts %s ms for trial %d; the search stored %s ms (the table changed since)",
                    table.path, now, trial, stored_ms)
    protocol = table.protocol
    m = measure_network(arch, protocol, head)
    info: dict[str, Any] = {
        "measured_ms": round(m.value_us(protocol.statistic) / 1e3, 4),
        "measured_with": f"{protocol.backend} {protocol.dtype} batch {protocol.batch} threads {protocol.threads} "
                         f"{protocol.statistic}",
        "measured_on": str(environment(protocol).get("cpu"))}
    if table.reference_us and m.reference_us:
        # the same measurement on the table's scale (the speed of its reference workload): what the prediction is
        # comparable with when other load slows this machine down now
        normalised = m.normalised(table.reference_us).value_us(protocol.statistic)
        info["measured_normalised_ms"] = round(normalised / 1e3, 4)
    elsewhere = table.measured_elsewhere()
    if elsewhere:
        log.warning("trial %d: predicted %.2f ms by %s, measured on another CPU (%s); %.2f ms measured here now "
                    "(%+.0f%%): for budgets that mean this machine, search with `nas search EXPERIMENT --adapt`",
                    trial, now, table.path or table.name, elsewhere, info["measured_ms"],
                    100 * (info["measured_ms"] / now - 1))
    return info


def _backbone_onnx(arch: ArchSpec, path: Path) -> tuple[Path, float]:
    """The untrained backbone as ONNX, outputs named by stride, and its max difference from torch in ONNX Runtime."""
    import torch

    from nas.arch.backbone import build_backbone
    from nas.latency.onnx import check_onnx, export_onnx

    with torch.random.fork_rng():  # untrained weights, seeded: the same file every time, globals untouched
        torch.manual_seed(0)
        model = build_backbone(arch).eval()
    strides = arch.stage_strides()
    onnx_path = export_onnx(model, arch.resolution, path, output_names=[f"stride{strides[f]}" for f in arch.features])
    return onnx_path, check_onnx(model, onnx_path, arch.resolution)


def _flow_safe(v: Any) -> Any:
    """nas/arch@1 writes info as a one-line flow mapping, and its dumper does not quote a string holding a comma
    or a bracket there (it would not load back): provenance text is display only, so swap those characters."""
    if not isinstance(v, str):
        return v
    return v.translate(str.maketrans({",": ";", "{": "(", "}": ")", "[": "(", "]": ")"}))
