"""Few-shot transfer of a latency table to this machine and protocol: a few hundred single ops and a few dozen
networks measured here, a fitted per-op transfer from the source table's entries (`nas.latency.transfer`), and a
full table for the target, normalised and calibrated like one built here."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.errors import ConfigError
from nas.latency.coverage import TableOp, arch_ops, key_of, space_neckhead_ops
from nas.latency.measurer import LOCAL, Measurer, measure_all, network_job
from nas.latency.protocol import ONNX_BACKENDS, Protocol, check_int
from nas.latency.table import Entry, LatencyTable
from nas.latency.transfer import Transfer, fit_transfer, sample_ops
from nas.latency.validate import accuracy, calibration_archs, end_to_end, fit_calibration, validation_archs
from nas.space import SearchSpace

log = logging.getLogger(__name__)
FIXED = {"batch": "batch sizes", "dtype": "dtypes", "statistic": "statistics"}  # what no per-op factor carries over
DEFAULT_OPS = 400
METHOD = "ridge-log-ratio"
HELD_OUT_SEED = 7  # the `nas lut validate --seed 7` stream: never among the fit's networks (calibration stream)


def check_transferable(source: LatencyTable, protocol: Protocol) -> None:
    """ConfigError naming the protocol field when `source` cannot be transferred to `protocol` (batch, dtype or
    statistic differ); backend and thread count may differ."""
    mine = source.protocol
    for field, what in FIXED.items():
        if getattr(mine, field) != getattr(protocol, field):
            raise ConfigError(str(source.path or source.name), f"header.protocol.{field}",
                              f"the table holds {field} {getattr(mine, field)!r}, the target asks "
                              f"{getattr(protocol, field)!r}: latency does not transfer across {what}; build a table "
                              f"for it with `nas lut build --{field} {getattr(protocol, field)}`")


def target_protocol(source: Protocol, backend: str | None = None, threads: int | None = None,
                    reference: bool | None = None) -> Protocol:
    """The source's protocol with another backend or thread count. The reference workload follows the source on
    the same backend, else the shipped tables' choice: on for torch, off for the ONNX runtimes (after an ORT call the
    reference's time depends on what ran before it; OpenVINO single ops tracked networks without it)."""
    backend = backend or source.backend
    if reference is None:
        reference = source.reference if backend == source.backend else backend not in ONNX_BACKENDS
    return dataclasses.replace(source, backend=backend, threads=threads or source.threads, reference=reference)


def _space_ops(space: SearchSpace, head: HeadConfig | None) -> list[TableOp]:
    ops: list[TableOp] = list(space.ops())
    if head is not None:
        ops += list(space_neckhead_ops(space, head))
    return ops


def _transfer_entries(source: LatencyTable, target: LatencyTable, transfer: Transfer) -> None:
    """Every source entry times its fitted ratio (all three statistics alike), the sampled ops too: one timing of
    an op on a shared machine is noisier than the fit through it (docs/LATENCY.md)."""
    column = source.column
    for k, e in source.entries.items():
        r = transfer.ratio(k, getattr(e, column))
        target.entries[k] = Entry(*(max(0.01, round(v * r, 2)) for v in (e.median_us, e.p10_us, e.p90_us)), e.n)


def _note_unmeasured_kinds(source: LatencyTable, measured: Sequence[str], head: HeadConfig | None) -> None:
    kinds = Counter(k.split()[0] for k in source.entries)
    seen = {k.split()[0] for k in measured}
    unseen = {kind: n for kind, n in kinds.items() if kind not in seen}
    if unseen:
        hint = "; pass a head (`--detector`) to measure some neck+head ops" if "neckhead" in unseen and head is None else ""
        log.warning("%s: %s entries transferred with the factors of other op kinds (none of theirs measured)%s",
                    source.path or source.name, ", ".join(f"{n} {kind}" for kind, n in sorted(unseen.items())), hint)


def _measure_networks(target: LatencyTable, archs: Sequence[ArchSpec], protocol: Protocol,
                      progress: bool, measurer: Measurer = LOCAL) -> list[float]:
    """Each backbone's latency end to end, normalised to the target's reference speed. Called first, in a process
    that has timed nothing else yet, as `nas lut calibrate` does: measured after the ops, the networks gave a scale
    above what held-out networks needed (docs/LATENCY.md)."""
    from tqdm import tqdm

    measured = measure_all(measurer, (network_job(a) for a in archs), protocol)
    bar = tqdm(measured, total=len(archs), desc="measuring networks", disable=not progress, unit="arch")
    return [m.normalised(target.reference_us).value_us(protocol.statistic) for m in bar]


def _residuals(transfer: Transfer, rows: Sequence[dict], source: LatencyTable, target: LatencyTable,
               archs: Sequence[ArchSpec]) -> dict[str, float | None]:
    """The fit's errors: cross-validated on the measured ops, on the networks after calibration, and the source
    table's own prediction of those networks (before adaptation; only where the protocols match)."""
    cv = np.abs(np.asarray(transfer.cv_errors))
    out: dict[str, float | None] = {"ops_cv_mape": round(100 * float(cv.mean()), 2),
                                    "ops_cv_within_10pct": round(float(np.mean(cv <= 0.10)), 3)}
    if not rows:
        return out
    meas = [r["measured_us"] for r in rows]
    after = accuracy([r["sum_us"] * target.scale for r in rows], meas)
    out.update(networks_mape=round(after.mape, 2), networks_within_10pct=round(after.within_10, 3),
               networks_kendall_tau=round(after.kendall_tau, 3) if len(rows) > 1 else None)
    if source.protocol == target.protocol and not source.missing(op for a in archs for op in
                                                                  ((b, s) for _, b, s in arch_ops(a))):
        to_source = (source.reference_us / target.reference_us) if source.reference_us and target.reference_us else 1
        before = accuracy([source.predict(a).total_us for a in archs], [m * to_source for m in meas])
        out["source_within_10pct"] = round(before.within_10, 3)
    return out


def adapt(source: LatencyTable, space: SearchSpace, protocol: Protocol, n_networks: int = 50,
          head: HeadConfig | None = None, *, n_ops: int = DEFAULT_OPS, seed: int = 0, name: str | None = None,
          network_protocol: Protocol | None = None, progress: bool = True, measurer: Measurer = LOCAL) -> LatencyTable:
    """A full table for this machine and `protocol` from `source`'s entries: `n_networks` backbones of the
    calibration stream measured end to end, `n_ops` single ops of `space` (with `head`, neck+head ops among them)
    measured, a ridge fit of log(target / source) per op (shrunk toward one global factor), every entry written as
    source x fitted ratio, and the calibration scale fitted on the networks. The header records `adapted_from` and
    `adaptation` (ops, networks, residuals, minutes, seed, method, factors). `measurer`: the device measured (this
    machine by default, another through its agent)."""
    check_transferable(source, protocol)
    check_int("n_ops", n_ops, 2, source="adapt")
    check_int("n_networks", n_networks, 0, source="adapt")
    start = time.monotonic()
    target = LatencyTable.new(protocol, name or f"{source.name}-adapted", space=space.source, measurer=measurer)
    archs = calibration_archs(space, n_networks)
    networks = _measure_networks(target, archs, network_protocol or end_to_end(protocol), progress, measurer)
    ops = _space_ops(space, head)
    candidates = [op for op in ops if key_of(op) in source.entries]
    if len(candidates) < len(ops):
        log.warning("%s: %d of the %d ops of %s are not in the table and not transferred; add them with "
                    "`nas lut extend NEW_TABLE --space %s`", source.path or source.name, len(ops) - len(candidates),
                    len(ops), space.source, space.source)
    n_measured = target.extend(sample_ops(candidates, n_ops, seed), progress=progress, measurer=measurer)
    measured = list(target.entries)
    column = source.column
    transfer = fit_transfer({k: getattr(e, column) for k, e in source.entries.items()},
                            {k: getattr(e, column) for k, e in target.entries.items()}, seed=seed)
    _transfer_entries(source, target, transfer)
    _note_unmeasured_kinds(source, measured, head)
    n_measured += target.extend([(b, s) for a in archs for _, b, s in arch_ops(a)], progress=False,  # not in source
                                measurer=measurer)
    rows = [{"arch": a.name, "sum_us": target.predict(a).sum_us, "measured_us": m} for a, m in zip(archs, networks)]
    if rows:
        fit_calibration(target, rows)
    target.header["adapted_from"] = {"table": str(source.path or source.name),
                                     "cpu_id": source.header.get("device", {}).get("cpu_id"),
                                     "backend": source.protocol.backend, "threads": source.protocol.threads}
    target.header["adaptation"] = _record(transfer, rows, source, target, archs, start, seed, n_measured)
    log.info("adapted %s to %s: %d ops and %d networks measured in %.1f min", source.name,
             target.header["device"].get("cpu_id") or "this CPU",
             target.header["adaptation"]["ops"], len(rows), target.header["adaptation"]["minutes"])
    return target


def _record(transfer: Transfer, rows: Sequence[dict], source: LatencyTable, target: LatencyTable,
            archs: Sequence[ArchSpec], start: float, seed: int, n_ops: int) -> dict[str, Any]:
    col = source.column
    return {"ops": n_ops, "networks": len(rows),
            "residuals": _residuals(transfer, rows, source, target, archs),
            "minutes": round((time.monotonic() - start) / 60, 2), "seed": seed,
            "method": f"{METHOD}: ridge on log(target/source) per op over op-kind groups and log latency, alpha "
                      f"{transfer.alpha:g} by 5-fold CV, {transfer.outliers} outlier op(s) left out; calibration "
                      f"on {len(rows)} networks",
            "factors": transfer.kind_factors({k: getattr(e, col) for k, e in source.entries.items()})}


def held_out_check(source: LatencyTable, target: LatencyTable, space: SearchSpace, n: int,
                   head: HeadConfig | None = None, *, seed: int = HELD_OUT_SEED, progress: bool = True,
                   measurer: Measurer = LOCAL) -> dict[str, float]:
    """The source and the adapted table scored on `n` networks neither fit saw (with `head`: whole detectors),
    measured once here under the target's protocol, each on its own reference speed as `nas lut validate` scores a
    table; stored as the header's `adaptation.held_out`."""
    from tqdm import tqdm

    check_int("n", n, 2, source="held-out check")
    protocol = end_to_end(target.protocol)
    archs = validation_archs(space, n, seed)
    raws = list(tqdm(measure_all(measurer, (network_job(a, head) for a in archs), protocol), total=len(archs),
                     desc="checking on held-out networks", disable=not progress, unit="arch"))
    out: dict[str, float] = {"networks": n, "seed": seed}
    for prefix, table in (("source_", source), ("", target)):
        acc = accuracy([table.predict(a, head).total_us for a in archs],
                       [r.normalised(table.reference_us).value_us(protocol.statistic) for r in raws])
        out.update({f"{prefix}within_10pct": round(acc.within_10, 3), f"{prefix}kendall_tau": round(acc.kendall_tau, 3),
                    f"{prefix}bias_pct": round(acc.bias, 2)})
    target.header["adaptation"]["held_out"] = out
    return out
