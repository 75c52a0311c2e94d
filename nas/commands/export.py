"""`nas export RUN --pick best|knee|trial:N`: a searched architecture as arch YAML with its provenance and the
latency measured here now (+ the backbone as ONNX)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from nas.commands.common import add_run_args
from nas.errors import NasError


def cmd_export(args: argparse.Namespace) -> None:
    from nas.arch.backbone import build_backbone
    from nas.arch.spec import dumps_arch, load_arch, loads_arch, save_arch
    from nas.latency.environment import environment
    from nas.latency.onnx import check_onnx, export_onnx
    from nas.latency.profile import measure_network
    from nas.report.fronts import pick, score_name
    from nas.report.runs import open_run, trial_head

    r = open_run(args.run, args.storage, args.study)
    t, how = pick(r.study, args.pick)
    a = t.user_attrs
    arch = loads_arch(a["arch"], f"study {r.study.study_name} trial {t.number}")
    if not (a.get("evaluated") is True and all(v <= 0 for v in t.constraints.values())):
        print(f"nas: warning: trial {t.number} is infeasible (predicted {a.get('predicted_ms')} ms, budget "
              f"{a.get('budget_ms')} ms)", file=sys.stderr)
    head = trial_head(a)
    info: dict[str, Any] = {**arch.info, "study": r.study.study_name, "storage": r.url, "trial": t.number,
                            "pick": how, "table": a.get("table"), "scope": a.get("scope", "backbone"),
                            "budget_ms": a.get("budget_ms"), "predicted_ms": a.get("predicted_ms")}
    if head is not None:  # the latencies are of this detector: `nas train` needs the same neck to deploy it
        info.update(neck=head.neck, num_classes=head.num_classes)
    if isinstance(a.get("score"), (int, float)):
        info.update(score=a["score"], score_name=score_name(r.study))
    if not args.no_measure:
        table = r.table(args.table, "measuring the latency")
        now = round(table.predict(arch, head).total_ms, 4)
        if a.get("predicted_ms") is not None and not math.isclose(now, a["predicted_ms"], rel_tol=1e-3):
            print(f"nas: warning: {table.path} now predicts {now} ms for trial {t.number}; the search stored "
                  f"{a['predicted_ms']} ms (the table changed since)", file=sys.stderr)
        protocol = table.protocol
        m = measure_network(arch, protocol, head)
        info.update(measured_ms=round(m.value_us(protocol.statistic) / 1e3, 4),
                    measured_with=f"{protocol.backend} {protocol.dtype} batch {protocol.batch} "
                                  f"threads {protocol.threads} {protocol.statistic}",
                    measured_on=str(environment(protocol).get("cpu")))
        if table.reference_us and m.reference_us:
            # the same measurement on the table's scale (the speed of its reference workload): what the prediction
            # is comparable with when other load slows this machine down now
            normalised = m.normalised(table.reference_us).value_us(protocol.statistic)
            info["measured_normalised_ms"] = round(normalised / 1e3, 4)
    info["exported"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    arch = replace(arch, info={k: _flow_safe(v) for k, v in info.items()})
    out = Path(args.out) if args.out else (r.run_dir or Path(".")) / "export"
    path = save_arch(arch, out / f"trial-{t.number}.yaml")
    if dumps_arch(load_arch(path)) != path.read_text():  # what `nas train` reads must be exactly what we wrote
        raise NasError(f"{path}: the exported YAML does not round-trip; please report this")
    result: dict[str, Any] = {"arch": str(path), "trial": t.number, "pick": how,
                              "predicted_ms": info.get("predicted_ms"), "measured_ms": info.get("measured_ms")}
    if "measured_normalised_ms" in info:
        result["measured_normalised_ms"] = info["measured_normalised_ms"]
    if args.onnx:
        import torch

        with torch.random.fork_rng():  # untrained weights, seeded: the same file every time, globals untouched
            torch.manual_seed(0)
            model = build_backbone(arch).eval()
        strides = arch.stage_strides()
        onnx_path = export_onnx(model, arch.resolution, out / f"trial-{t.number}.backbone.onnx",
                                output_names=[f"stride{strides[f]}" for f in arch.features])
        result.update(onnx=str(onnx_path), onnx_max_diff=check_onnx(model, onnx_path, arch.resolution))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    measured = f", measured {result['measured_ms']:.3f} ms here" if result["measured_ms"] is not None else ""
    if "measured_normalised_ms" in result:
        measured += f" ({result['measured_normalised_ms']:.3f} ms at the table's reference speed)"
    print(f"trial {t.number} ({how}): predicted {result['predicted_ms']:.3f} ms{measured}")
    print(f"wrote {path}")
    if args.onnx:
        print(f"wrote {result['onnx']} (ONNX Runtime matches torch, max |diff| {result['onnx_max_diff']:.2g})")
    neck = f" --neck {head.neck}" if head is not None else ""
    print(f"train it: nas train {path}{neck}  (DigitsDet by default; --data DATA.yaml for yours)")


def _flow_safe(v: Any) -> Any:
    """nas/arch@1 writes info as a one-line flow mapping, and its dumper does not quote a string holding a comma
    or a bracket there (it would not load back): provenance text is display only, so swap those characters."""
    if not isinstance(v, str):
        return v
    return v.translate(str.maketrans({",": ";", "{": "(", "}": ")", "[": "(", "]": ")"}))


def _flow_safe(v: Any) -> Any:
    """nas/arch@1 writes info as a one-line flow mapping, and its dumper does not quote a string holding a comma
    or a bracket there (it would not load back): provenance text is display only, so swap those characters."""
    if not isinstance(v, str):
        return v
    return v.translate(str.maketrans({",": ";", "{": "(", "}": ")", "[": "(", "]": ")"}))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a searched architecture as arch YAML with provenance (+ backbone ONNX)",
                       description="Export one trial of a search as an arch YAML `nas train` reads, with its study, "
                                   "trial, table, predicted latency and the latency measured on this machine now.")
    add_run_args(p, "output folder (default: RUN/export)")
    p.add_argument("--pick", default="knee", help="best | knee | trial:N (default knee)")
    p.add_argument("--onnx", action="store_true",
                   help="also the backbone as ONNX (untrained, weights seeded with 0), checked against torch with "
                        "ONNX Runtime")
    p.add_argument("--no-measure", action="store_true", help="skip measuring the latency on this machine")
    p.set_defaults(func=cmd_export)
