"""`nas quickstart`: the whole loop on the embedded defaults (shipped latency table, SQLite in the run folder,
DigitsDet generated on the fly): search, front, export of the knee, a short training of the winner."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nas.errors import ConfigError, NasError

REPO = Path(__file__).resolve().parents[2]


EXPERIMENT = REPO / "experiments" / "quickstart.yaml"


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

    def run(self, name: str, argv: list[str], capture: bool = False) -> str:
        """`nas ARGV` in this process, as typed on a shell; stops the quickstart with the step's own error."""
        from nas.commands.main import main

        step = Step(name, "nas " + " ".join(shlex.quote(a) for a in argv))
        print(f"\n=== {name}: {step.command}", flush=True)
        out = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
            code = main(argv)
        step.seconds = time.monotonic() - start
        self.steps.append(step)
        if code != 0:
            raise NasError(f"quickstart stopped at the {name} step (exit code {code}, error above); fix it and run "
                           f"`nas quickstart` again: finished search trials are kept")
        return out.getvalue()

    def timed(self, name: str, command: str, fn: Callable[[], Any]) -> Any:
        step = Step(name, command)
        print(f"\n=== {name}: {command}", flush=True)
        start = time.monotonic()
        value = fn()
        step.seconds = time.monotonic() - start
        self.steps.append(step)
        return value

    def done(self, result: str) -> None:
        step = self.steps[-1]
        step.result = result
        print(f"--- {step.name}: {result} ({_duration(step.seconds)})", flush=True)


def _shown(path: Path) -> Path:
    """The run folder as a user would type it: relative to the working folder when inside it, '..' resolved."""
    p = Path(os.path.normpath(path.resolve()))
    try:
        return p.relative_to(Path.cwd())
    except ValueError:
        return p


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from nas.arch.spec import load_arch
    from nas.detect.digits import ensure_digits
    from nas.search.experiment import apply_overrides, load_experiment

    path = Path(args.experiment) if args.experiment else EXPERIMENT
    if not path.is_file():
        raise ConfigError(str(path), None, "quickstart experiment not found; run from a clone of the repository "
                                           "(pip install -e .), or pass --experiment FILE")
    overrides = {"name": args.name, "output": args.output, "trials": args.trials, "workers": args.workers,
                 "storage": args.storage, "device": args.device, "budget_ms": args.budget_ms}
    exp = apply_overrides(load_experiment(path), overrides)  # checked here: a bad flag fails before any work
    run_dir = _shown(exp.run_dir)
    flags = [x for k, v in overrides.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
    # config.yaml masks a storage password: the reading steps need the URL itself
    storage = ["--storage", args.storage] if args.storage else []
    qs = Quickstart()
    t0 = time.monotonic()
    print(f"nas quickstart: search -> front -> export -> training, run folder {run_dir}\n"
          f"  {exp.trials} trials of {exp.space} against a {exp.budget_ms:g} ms {exp.scope} budget on "
          f"{Path(exp.table).name} ({exp.evaluator.proxy if exp.evaluator.kind == 'proxy' else 'short-training'} "
          f"evaluator, {exp.sampler} sampler, storage {'SQLite in the run folder' if not exp.storage else 'given'})",
          flush=True)

    # 1. search (running it again resumes: finished trials are kept)
    quiet = ["--quiet"] if args.quiet else []
    search = json.loads(qs.run("search", ["search", str(path), *flags, *quiet, "--json"], capture=True))
    states = search["trials"]
    qs.done(f"{states.get('complete', 0)} complete trials, {search.get('pareto_front', 0)} on the Pareto front, "
            f"storage {search['storage']}")

    # 2. the front
    text = qs.run("front", ["pareto", str(run_dir), *storage], capture=True)
    print(text, end="")
    knee_line = next((ln for ln in text.splitlines() if ln.endswith("<- knee")), "")
    qs.done(f"{search.get('pareto_front', 0)} members; knee: trial {knee_line.split()[0] if knee_line else '?'}; "
            f"{run_dir / 'front.png'}")

    # 3. export of the knee, with the latency measured here now
    exported = json.loads(qs.run("export", ["export", str(run_dir), *storage, "--pick", "knee", "--json"],
                                 capture=True))
    arch_path = Path(exported["arch"])
    arch = load_arch(arch_path)
    pred, meas = exported["predicted_ms"], exported.get("measured_ms")
    gap = ""
    if meas:
        gap = f", measured {meas:.2f} ms here now ({100 * (meas / pred - 1):+.1f}%)"
        norm = exported.get("measured_normalised_ms")
        if norm:  # the prediction's own scale: the machine's speed now factored out by the reference workload
            gap += f", {norm:.2f} ms at the table's reference speed ({100 * (norm / pred - 1):+.1f}%)"
    qs.done(f"trial {exported['trial']}: predicted {pred:.2f} ms (budget {exp.budget_ms:g} ms){gap} -> {arch_path}")

    # 4. a short training of the winner on a small DigitsDet, generated once into the run folder
    imgsz = arch.resolution
    data = qs.timed("data", f"DigitsDet {args.train_images}+{args.val_images} images at {imgsz} px -> "
                            f"{run_dir / 'digits'}",
                    lambda: ensure_digits(run_dir / "digits", args.train_images, args.val_images, imgsz, exp.seed,
                                          progress=False))
    qs.done(str(data))
    # One compute thread and one loader process: on a small CPU that is busy with anything else, OpenMP threads
    # spin-waiting for a second core cost far more than they gain. The ONNX export is left to `nas export --onnx`.
    train_argv = ["train", str(arch_path), "--data", str(data), "--imgsz", str(imgsz), "--epochs", str(args.epochs),
                  "--time-limit", str(round(args.train_minutes * 60)), "--batch", "16", "--device", exp.device,
                  "--threads", "1", "--workers", "1", "--project", str(run_dir), "--name", "train", "--exist-ok",
                  "--no-onnx", "--json"]
    train_argv += quiet
    trained = json.loads(qs.run("train", train_argv, capture=True))
    qs.done(f"{trained['epochs']} epochs, best epoch {trained['best_epoch']}: mAP50-95 {trained['map50_95']:.4f}, "
            f"mAP50 {trained['map50']:.4f}; weights {trained['weights']}")

    total = time.monotonic() - t0
    print(f"\n=== quickstart done in {_duration(total)}")
    for s in qs.steps:
        print(f"  {s.name:7s} {_duration(s.seconds):>8s}  {s.result}")
    print(f"TensorBoard (search scalars, Pareto figure, hparams, training curves): tensorboard --logdir {run_dir}")
    return {"steps": [{"name": s.name, "command": s.command, "seconds": round(s.seconds, 1), "result": s.result}
                      for s in qs.steps], "seconds": round(total, 1), "run_dir": str(run_dir),
            "arch": str(arch_path), "map50_95": trained["map50_95"], "predicted_ms": pred, "measured_ms": meas,
            "measured_normalised_ms": exported.get("measured_normalised_ms")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="the whole loop on the embedded defaults: search, front, export, training",
        description="Run experiments/quickstart.yaml end to end, as `nas search`, `nas pareto`, `nas export --pick "
                    "knee` and `nas train` would, printing each command, its result and its wall time: about 15 "
                    "minutes on a 2-core CPU. Running it again resumes the search and retrains the winner.")
    p.add_argument("--experiment", help="experiment YAML (default: experiments/quickstart.yaml of this repository)")
    p.add_argument("--name", help="run name (folder under --output; default quickstart)")
    p.add_argument("--output", help="parent folder of the run folder (default: the repository's runs/)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)
