"""`nas pareto RUN` (front table, CSV, PNG, hypervolume) and `nas export RUN --pick ...` (arch YAML with provenance,
backbone ONNX): read a search back from its run folder or from any storage, without the process that ran it."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.errors import ConfigError, NasError

if TYPE_CHECKING:  # optuna is imported where it is used: `nas --help` should not pay for it
    import optuna


@dataclass
class Run:
    study: optuna.Study
    url: str                   # storage URL, password masked
    run_dir: Path | None
    exp: Any                   # the resolved Experiment from config.yaml, or None (--storage/--study only)
    origin: Path               # folder the relative paths in config.yaml are relative to

    @property
    def budget_ms(self) -> float | None:
        if self.exp is not None:
            return self.exp.budget_ms
        from optuna.trial import TrialState

        t = next(iter(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), None)
        return t.user_attrs.get("budget_ms") if t else None

    def table(self, override: str | None, needed_for: str):
        """The latency table the search used (or --table): its entries and its measurement protocol."""
        from nas.latency.table import LatencyTable

        if override:
            return LatencyTable.load(override)
        if self.exp is None:
            raise ConfigError(None, "--table", f"{needed_for} needs the latency table the search used; "
                                               f"pass --table PATH")
        path = _resolve(self.exp.table, self.origin)
        if not path.is_file():
            raise ConfigError(str(self.run_dir / "config.yaml"), "table",
                              f"{path} not found ({needed_for} needs it); pass --table PATH")
        return LatencyTable.load(path)


def _origin(run_dir: Path, exp) -> Path:
    """config.yaml keeps paths as given on the command line, relative to the folder `nas search` ran in; recover
    that folder from where the run folder is now (RUN = ORIGIN/output/name), so `nas pareto` works from anywhere."""
    rel = Path(os.path.normpath(Path(exp.output) / exp.name))
    parts = run_dir.resolve().parts
    if rel.is_absolute() or ".." in rel.parts or tuple(parts[-len(rel.parts):]) != rel.parts:
        return Path.cwd()
    return Path(*parts[:-len(rel.parts)])


def _resolve(path: str, origin: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else origin / p


def _run_storage(run_dir: Path, exp, origin: Path) -> str:
    cfg = run_dir / "config.yaml"
    if exp.storage:
        if "***" in exp.storage:
            raise ConfigError(str(cfg), "storage", "the password is masked in config.yaml; pass --storage with the "
                                                   "full URL (and --study if needed)")
        for scheme in ("sqlite:///", "journal://"):  # file storages given relative to the search's folder
            if exp.storage.startswith(scheme) and not Path(exp.storage.removeprefix(scheme)).is_absolute():
                return scheme + str(origin / exp.storage.removeprefix(scheme))
        return exp.storage
    for name, scheme in (("study.db", "sqlite:///"), ("study.journal", "journal://")):
        if (run_dir / name).is_file():
            return scheme + str((run_dir / name).resolve())
    raise ConfigError(str(run_dir), None, "no study.db or study.journal in this run folder; pass --storage URL")


def open_run(run: str | None, storage: str | None = None, study_name: str | None = None) -> Run:
    """A run folder (config.yaml + storage), or --storage URL --study NAME; either may override the other."""
    from nas.config import load_yaml
    from nas.search.experiment import experiment_from_dict
    from nas.search.study import make_storage, mask_url

    exp, run_dir, origin = None, None, Path.cwd()
    if run is None and not (storage and study_name):
        raise ConfigError(None, "RUN", "give a run folder (e.g. runs/NAME), or --storage URL and --study NAME")
    if run is not None:
        run_dir = Path(run)
        cfg = run_dir / "config.yaml"
        if not run_dir.is_dir():
            raise ConfigError(run, None, "no such run folder; `nas search` writes them under runs/NAME")
        if not cfg.is_file():
            raise ConfigError(run, None, "not a run folder (no config.yaml); pass the folder `nas search` wrote, "
                                         "or --storage URL --study NAME")
        exp = experiment_from_dict(load_yaml(cfg), str(cfg))
        origin = _origin(run_dir, exp)
    url = storage or _run_storage(run_dir, exp, origin)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(None, "--storage", f"{mask_url(url)}: no such SQLite file")  # else SQLite makes an empty one
    import optuna

    name = study_name or exp.study_name
    store = make_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise NasError(f"no study {name!r} in {mask_url(url)}; studies there: {', '.join(names) or 'none'} "
                       f"(choose one with --study)") from None
    return Run(study, mask_url(url), run_dir, exp, origin)


def _scope(study) -> str | None:
    """What the study's latencies cover, from its first finished trial ("detector" or "backbone")."""
    t = next((t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and "scope" in t.user_attrs), None)
    return t.user_attrs["scope"] if t else None


def trial_head(attrs: dict[str, Any]):
    """The detector head a detector-scope trial was budgeted with (None: a backbone-scope trial)."""
    from nas.detect.model import HeadConfig

    d = attrs.get("detector")
    return HeadConfig(**d) if attrs.get("scope") == "detector" and isinstance(d, dict) else None


def measurement(arch, protocol, head=None):
    """The backbone measured on this machine now under the table's protocol; with `head` (a HeadConfig) the whole
    detector (eval forward: backbone, neck, head, box decoding)."""
    from nas.arch.backbone import build_backbone
    from nas.latency.profile import measure

    if head is None:
        model = build_backbone(arch)
    else:
        from nas.detect.model import Detector

        model = Detector(arch, head.num_classes, neck=head.neck, width=head.width, depth=head.depth)
    return measure(model, (arch.channels, arch.resolution, arch.resolution), protocol)


def measure_ms(arch, protocol, head=None) -> float:
    """`measurement` in ms, the statistic the protocol names."""
    return measurement(arch, protocol, head).value_us(protocol.statistic) / 1e3


# ---------------------------------------------------------------- nas pareto

def cmd_pareto(args: argparse.Namespace) -> None:
    from nas.arch.spec import loads_arch
    from nas.report import (BASELINES_ATTR, Baseline, default_reference, front, hypervolume, knee, pareto_figure,
                            save_figure, score_name, trial_points, write_front_csv)

    r = open_run(args.run, args.storage, args.study)
    points, members = trial_points(r.study), front(r.study)
    if not members:
        raise NasError(f"study {r.study.study_name!r} ({len(points)} complete trials) has no feasible evaluated trial "
                       f"yet: no front (run more trials, or raise the budget)")
    measured = None
    if args.measure:
        protocol = r.table(args.table, "--measure").protocol
        attrs = {t.number: t.user_attrs for t in r.study.get_trials(deepcopy=False)}
        measured = {m.trial: round(measure_ms(loads_arch(m.arch, f"trial {m.trial}"), protocol,
                                              trial_head(attrs[m.trial])), 4) for m in members}
    for flag, v in (("--ref-score", args.ref_score), ("--ref-ms", args.ref_ms)):
        if v is not None and not math.isfinite(v):
            raise ConfigError(None, flag, f"must be a finite number, got {v}")
    budget = r.budget_ms
    ref = list(default_reference(points, budget))
    ref[0] = ref[0] if args.ref_score is None else args.ref_score
    ref[1] = ref[1] if args.ref_ms is None else args.ref_ms
    hv = hypervolume([m.key for m in members], tuple(ref))
    k = knee(members)
    out = Path(args.out) if args.out else (r.run_dir or Path("."))
    csv_path = write_front_csv(members, out / "front.csv", measured)
    baselines = [Baseline(**b) for b in r.study.user_attrs.get(BASELINES_ATTR, [])]
    fig = pareto_figure(points, members, budget_ms=budget, baselines=baselines, score_label=score_name(r.study),
                        title=f"{r.study.study_name}: {len(points)} trials, {len(members)} on the front", highlight=k,
                        scope=_scope(r.study))
    png_path = save_figure(fig, out / "front.png")
    ref_src = ("given" if args.ref_score is not None else "worst feasible score",
               "given" if args.ref_ms is not None else ("the budget" if budget else "slowest feasible"))
    hv_line = (f"hypervolume {hv:.6g} against reference (score {ref[0]:.6g} = {ref_src[0]}, "
               f"latency {ref[1]:.6g} ms = {ref_src[1]})")
    if args.json:
        rows = [m.row() | ({"measured_ms": measured[m.trial]} if measured else {}) for m in members]
        print(json.dumps(rows, indent=2))
        print(hv_line, file=sys.stderr)
        return
    head = f"{'trial':>6s} {'predicted ms':>13s} {'score':>10s} {'params':>11s} {'MACs':>9s}"
    print(f"{r.study.study_name} ({r.url}): {len(points)} complete trials, {len(members)} on the Pareto front")
    print(head + (f" {'measured ms':>12s}" if measured else ""))
    for m in members:
        line = (f"{m.trial:6d} {m.predicted_ms:13.3f} {m.score:10.4g} {m.params or 0:11,d} "
                f"{(m.macs or 0) / 1e6:8.1f}M")
        if measured:
            line += f" {measured[m.trial]:12.3f}"
        print(line + ("  <- knee" if m is k else ""))
    print(hv_line)
    print(f"wrote {csv_path} and {png_path}")


# ---------------------------------------------------------------- nas export

def cmd_export(args: argparse.Namespace) -> None:
    from nas.arch.backbone import build_backbone
    from nas.arch.spec import dumps_arch, load_arch, loads_arch, save_arch
    from nas.export import check_onnx, export_onnx
    from nas.latency.profile import environment
    from nas.report import pick, score_name

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
        m = measurement(arch, protocol, head)
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


# ---------------------------------------------------------------- parsers

def _run_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("run", nargs="?", help="run folder written by `nas search` (runs/NAME)")
    p.add_argument("--storage", help="Optuna storage URL (instead of, or overriding, the run folder's)")
    p.add_argument("--study", help="study name (default: the run's)")
    p.add_argument("--table", help="latency table (default: the one in the run's config.yaml)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pareto", help="the Pareto front of a search: table, front.csv, front.png, hypervolume",
                       description="Print the front (score up, predicted latency down) of a search's feasible trials, "
                                   "write front.csv and front.png, and the hypervolume against a stated reference.")
    _run_args(p, "folder for front.csv and front.png (default: the run folder)")
    p.add_argument("--measure", action="store_true",
                   help="also measure each front member here, in ms (the whole detector for detector-scope searches)")
    p.add_argument("--ref-score", type=float, help="hypervolume reference score (default: worst feasible score)")
    p.add_argument("--ref-ms", type=float, help="hypervolume reference latency (default: the budget, else the slowest)")
    p.set_defaults(func=cmd_pareto)
    p = sub.add_parser("export", help="write a searched architecture as arch YAML with provenance (+ backbone ONNX)",
                       description="Export one trial of a search as an arch YAML `nas train` reads, with its study, "
                                   "trial, table, predicted latency and the latency measured on this machine now.")
    _run_args(p, "output folder (default: RUN/export)")
    p.add_argument("--pick", default="knee", help="best | knee | trial:N (default knee)")
    p.add_argument("--onnx", action="store_true",
                   help="also the backbone as ONNX (untrained, weights seeded with 0), checked against torch with "
                        "ONNX Runtime")
    p.add_argument("--no-measure", action="store_true", help="skip measuring the latency on this machine")
    p.set_defaults(func=cmd_export)
