"""`nas quickstart`: the whole loop on the embedded defaults (shipped latency table, SQLite in the run folder,
DigitsDet generated on the fly): search, front, export of the knee, a short training of the winner. Each step calls
the library and prints the `nas ...` command that does the same by hand."""
from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.errors import ConfigError, NasError

if TYPE_CHECKING:
    import optuna

    from nas.detect.trainconfig import TrainResult
    from nas.report.export import Exported
    from nas.report.fronts import Point
    from nas.search.experiment import Experiment

# Shipped inside the package (nas/data) and found through it, so an installed copy needs no checkout; wheels install
# as plain files, so the experiment's relative paths (../search_spaces, ../latency_tables) resolve beside it.
EXPERIMENT = Path(str(files("nas") / "data" / "experiments" / "quickstart.yaml"))


@dataclass
class Step:
    name: str
    command: str
    seconds: float = 0.0
    result: str = ""


@dataclass
class Quickstart:
    """The steps done so far (for the closing summary)."""

    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, command: str, fn: Callable[[], Any]) -> Any:
        """fn() as the step `name`, announced with its equivalent `command`; a library error stops the quickstart
        with the step's name."""
        step = Step(name, command)
        print(f"\n=== {name}: {command}", flush=True)
        start = time.monotonic()
        try:
            value = fn()
        except NasError as e:
            raise NasError(f"quickstart stopped at the {name} step: {e}; fix it and run `nas quickstart` again: "
                           f"finished search trials are kept") from e
        step.seconds = time.monotonic() - start
        self.steps.append(step)
        return value

    def done(self, result: str) -> None:
        step = self.steps[-1]
        step.result = result
        print(f"--- {step.name}: {result} ({_duration(step.seconds)})", flush=True)


def _shown(path: Path) -> Path:
    """A path as a user would type it: relative to the working folder when inside it, '..' resolved."""
    p = Path(os.path.normpath(path.resolve()))
    try:
        return p.relative_to(Path.cwd())
    except ValueError:
        return p


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _nas(*argv: Any) -> str:
    return "nas " + " ".join(shlex.quote(str(a)) for a in argv)


def _experiment(args: argparse.Namespace) -> tuple[Path, Experiment, list[str]]:
    """The experiment with the command line's overrides (checked here: a bad flag fails before any work), and
    those overrides as `nas search` flags."""
    from nas.search.experiment import apply_overrides, load_experiment
    from nas.search.storage import mask_url

    path = Path(args.experiment) if args.experiment else EXPERIMENT
    if not path.is_file():
        raise ConfigError(str(path), None, "quickstart experiment not found; pass --experiment FILE")
    # Runs go under the working folder's runs/: the packaged experiment's own output (../runs) is inside the package.
    output = args.output or (None if args.experiment else "runs")
    overrides = {"name": args.name, "output": output, "trials": args.trials, "workers": args.workers,
                 "storage": args.storage, "device": args.device, "budget_ms": args.budget_ms}
    exp = apply_overrides(load_experiment(path), overrides)
    shown = {**overrides, "storage": mask_url(args.storage) if args.storage else None}  # no password on screen
    flags = [x for k, v in shown.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
    return path, exp, flags


def _host_table(qs: Quickstart, args: argparse.Namespace, exp: Experiment) -> Experiment:
    """The table for this machine: the experiment's, or (unless --no-adapt) one adapted here into the run folder
    when the shipped table was measured on another CPU."""
    from nas.latency.table import LatencyTable
    from nas.search.hosttable import ADAPTED, adapt_command, host_table

    out = exp.run_dir / ADAPTED
    if args.no_adapt or out.is_file() or not LatencyTable.load(exp.table).measured_elsewhere():
        return host_table(exp, False, progress=not args.quiet)[0]
    shown = replace(exp, table=str(_shown(Path(exp.table))), space=str(_shown(Path(exp.space))))
    exp, line = qs.run("adapt", adapt_command(shown, _shown(out)), lambda: host_table(exp, True, progress=not args.quiet))
    qs.done(line)
    return exp


def _search(qs: Quickstart, path: Path, exp: Experiment, flags: list[str], quiet: bool) -> optuna.Study:
    from nas.commands.common import quiet_optuna
    from nas.report.tensorboard import tensorboard_callbacks
    from nas.search.study import run

    def search() -> optuna.Study:
        restore = quiet_optuna()
        try:
            return run(exp, progress=not quiet, callbacks=tensorboard_callbacks(exp))
        finally:
            restore()

    return qs.run("search", _nas("search", _shown(path), *flags), search)


def _front(study: optuna.Study, exp: Experiment, run_dir: Path) -> tuple[list[Point], Point, Path]:
    """The front, its knee, front.csv and front.png, as `nas pareto` writes them."""
    from nas.report.baselines import BASELINES_ATTR, Baseline
    from nas.report.figures import pareto_figure, save_figure
    from nas.report.fronts import front, knee, score_name, trial_points, write_front_csv
    from nas.report.runs import study_scope

    points, members = trial_points(study), front(study)
    if not members:
        raise NasError(f"no feasible evaluated trial among {len(points)}: no front (run more trials, or raise the "
                       f"budget with --budget-ms)")
    k = knee(members)
    write_front_csv(members, run_dir / "front.csv")
    baselines = [Baseline(**b) for b in study.user_attrs.get(BASELINES_ATTR, [])]
    fig = pareto_figure(points, members, budget_ms=exp.budget_ms, baselines=baselines, score_label=score_name(study),
                        title=f"{study.study_name}: {len(points)} trials, {len(members)} on the front", highlight=k,
                        scope=study_scope(study))
    return members, k, save_figure(fig, run_dir / "front.png")


def _train(qs: Quickstart, args: argparse.Namespace, exp: Experiment, run_dir: Path, e: Exported) -> TrainResult:
    """A short training of the exported knee on a small DigitsDet, generated once into the run folder."""
    from nas.arch.headconfig import HeadConfig
    from nas.detect.digits import ensure_digits
    from nas.detect.train import train
    from nas.detect.trainconfig import TrainConfig

    imgsz = e.arch.resolution
    data = qs.run("data", f"DigitsDet {args.train_images}+{args.val_images} images at {imgsz} px -> "
                          f"{run_dir / 'digits'}",
                  lambda: ensure_digits(run_dir / "digits", args.train_images, args.val_images, imgsz, exp.seed,
                                        progress=False))
    qs.done(str(data))
    # One compute thread and one loader process: on a small CPU that is busy with anything else, OpenMP threads
    # spin-waiting for a second core cost far more than they gain. The ONNX export is left to `nas export --onnx`.
    # The detector is the one the search budgeted (its neck); the heap is retained as `nas train` does.
    limit = round(args.train_minutes * 60)
    cfg = TrainConfig(arch=e.arch, data=str(data), imgsz=imgsz, epochs=args.epochs, time_limit_s=float(limit),
                      batch=16, device=exp.device, threads=1, workers=1, project=str(run_dir), name="train",
                      exist_ok=True, progress=not args.quiet, head=e.head or HeadConfig(), retain_heap=True)
    command = _nas("train", e.path, "--data", data, "--imgsz", imgsz, "--epochs", args.epochs, "--time-limit", limit,
                   "--batch", 16, "--device", exp.device, "--threads", 1, "--workers", 1, "--project", run_dir,
                   "--name", "train", "--exist-ok", "--no-onnx")
    result = qs.run("train", command, lambda: train(cfg))
    weights = result.best if result.best.is_file() else result.last
    qs.done(f"{result.epochs} epochs, best epoch {result.best_epoch}: mAP50-95 {result.map50_95:.4f}, "
            f"mAP50 {result.map50:.4f}; weights {weights}")
    return result


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from nas.report.export import export_trial
    from nas.report.fronts import front
    from nas.report.runs import open_run
    from nas.search.storage import mask_url
    from nas.search.study import summary

    path, exp, flags = _experiment(args)
    run_dir = _shown(exp.run_dir)
    storage = ["--storage", mask_url(args.storage)] if args.storage else []
    qs = Quickstart()
    t0 = time.monotonic()
    print(f"nas quickstart: search -> front -> export -> training, run folder {run_dir}\n"
          f"  {exp.trials} trials of {Path(exp.space).name} against a {exp.budget_ms:g} ms {exp.scope} budget on "
          f"{Path(exp.table).name} ({exp.evaluator.proxy if exp.evaluator.kind == 'proxy' else 'short-training'} "
          f"evaluator, {exp.sampler} sampler, storage {'SQLite in the run folder' if not exp.storage else 'given'})",
          flush=True)

    # 0. the table for this CPU (adapted once into the run folder when the shipped one was measured elsewhere)
    exp = _host_table(qs, args, exp)

    # 1. search (running it again resumes: finished trials are kept)
    study = _search(qs, path, exp, flags, args.quiet)
    qs.done(f"{summary(study).get('complete', 0)} complete trials, {len(front(study))} on the Pareto front, "
            f"storage {mask_url(exp.storage_url())}")

    # 2. the front
    members, k, png = qs.run("front", _nas("pareto", run_dir, *storage), lambda: _front(study, exp, run_dir))
    print(f"  {'trial':>6s} {'predicted ms':>13s} {'score':>10s}")
    for m in members:
        print(f"  {m.trial:6d} {m.predicted_ms:13.3f} {m.score:10.4g}" + ("  <- knee" if m is k else ""))
    qs.done(f"{len(members)} members; knee: trial {k.trial}; {png}")

    # 3. export of the knee, with the latency measured here now (`nas export` opens the run the same way)
    e = qs.run("export", _nas("export", run_dir, *storage, "--pick", "knee"),
               lambda: export_trial(open_run(str(run_dir), args.storage), "knee"))
    gap = ""
    if e.measured_ms:
        gap = f", measured {e.measured_ms:.2f} ms here now ({100 * (e.measured_ms / e.predicted_ms - 1):+.1f}%)"
        norm = e.measured_normalised_ms
        if norm:  # the prediction's own scale: the machine's speed now factored out by the reference workload
            gap += f", {norm:.2f} ms at the table's reference speed ({100 * (norm / e.predicted_ms - 1):+.1f}%)"
    qs.done(f"trial {e.trial}: predicted {e.predicted_ms:.2f} ms (budget {exp.budget_ms:g} ms){gap} -> {e.path}")

    # 4. a short training of the winner
    trained = _train(qs, args, exp, run_dir, e)

    total = time.monotonic() - t0
    print(f"\n=== quickstart done in {_duration(total)}")
    for s in qs.steps:
        print(f"  {s.name:7s} {_duration(s.seconds):>8s}  {s.result}")
    print(f"TensorBoard (search scalars, Pareto figure, hparams, training curves): tensorboard --logdir {run_dir}")
    return {"steps": [{"name": s.name, "command": s.command, "seconds": round(s.seconds, 1), "result": s.result}
                      for s in qs.steps], "seconds": round(total, 1), "run_dir": str(run_dir),
            "arch": str(e.path), "map50_95": trained.map50_95, "predicted_ms": e.predicted_ms,
            "measured_ms": e.measured_ms, "measured_normalised_ms": e.measured_normalised_ms}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="the whole loop on the embedded defaults: search, front, export, training",
        description="Run the packaged quickstart experiment (experiments/quickstart.yaml in a checkout) end to end, "
                    "as `nas search`, `nas pareto`, `nas export --pick knee` and `nas train` would, printing each "
                    "equivalent command, its result and its wall time: about 15 minutes on a 2-core CPU. Running it "
                    "again resumes the search and retrains the winner.")
    p.add_argument("--experiment", help="experiment YAML (default: the packaged experiments/quickstart.yaml)")
    p.add_argument("--name", help="run name (folder under --output; default quickstart)")
    p.add_argument("--output", help="parent folder of the run folder (default: runs/ in the working folder; with "
                                    "--experiment, that file's output)")
    p.add_argument("--trials", type=int, help="search trials (default: the experiment's)")
    p.add_argument("--workers", type=int, help="local search worker processes")
    p.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user:pass@host/db (default SQLite)")
    p.add_argument("--budget-ms", type=float, help="whole-detector latency budget in ms (default: the experiment's)")
    p.add_argument("--device", help="cpu | cuda:0, for the proxy scores and the training")
    p.add_argument("--epochs", type=int, default=30, help="most training epochs (default 30)")
    p.add_argument("--train-minutes", type=float, default=8.0,
                   help="training wall-clock budget; the epochs are re-planned to fit it (default 8)")
    p.add_argument("--train-images", type=int, default=500, help="DigitsDet training images (default 500)")
    p.add_argument("--val-images", type=int, default=100, help="DigitsDet validation images (default 100)")
    p.add_argument("--no-adapt", action="store_true",
                   help="use the shipped latency table as it is even when it was measured on another CPU (default: "
                        "adapt it to this one first, about a minute, into the run folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)
