"""`nas search EXPERIMENT.yaml [overrides]`: run or resume a search."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_search(args: argparse.Namespace) -> None:
    from nas.commands.common import quiet_optuna
    from nas.report.tensorboard import tensorboard_callbacks
    from nas.search.experiment import apply_overrides, load_experiment
    from nas.search.hosttable import host_table
    from nas.search.storage import mask_url
    from nas.search.study import run, summary

    exp = load_experiment(args.experiment)
    exp = apply_overrides(exp, {
        "name": args.name, "table": args.table, "budget_ms": args.budget_ms, "mode": args.mode, "sampler": args.sampler,
        "trials": args.trials, "timeout_s": args.timeout, "storage": args.storage, "study": args.study,
        "seed": args.seed, "workers": args.workers, "output": args.output, "device": args.device, "scope": args.scope,
        "num_classes": args.classes, "evaluator.neck": args.neck,
        "tensorboard_every": args.tb_every, "heartbeat_s": args.heartbeat, "grace_s": args.grace,
        "storage_timeout_s": args.storage_timeout,
        "evaluator.kind": args.evaluator, "evaluator.proxy": args.proxy, "evaluator.epochs": args.epochs,
    })
    exp, adapted = host_table(exp, args.adapt, progress=not args.quiet)
    if adapted:
        print(adapted, file=sys.stderr)
    print(f"search {exp.name}: {exp.mode} mode, budget {exp.budget_ms} ms ({exp.scope}), sampler {exp.sampler}, "
          f"{exp.trials} trials, {exp.workers} worker(s), storage {mask_url(exp.storage_url())}", file=sys.stderr)
    restore = quiet_optuna()
    try:
        study = run(exp, progress=not args.quiet, callbacks=tensorboard_callbacks(exp))
    finally:
        restore()
    states = summary(study)
    result = {"name": exp.name, "study": exp.study_name, "run_dir": str(exp.run_dir), "trials": states,
              "storage": mask_url(exp.storage_url())}
    if exp.tensorboard_every:
        result["tensorboard"] = str(exp.run_dir / "tb")
    feasible = study.best_trials
    if exp.mode != "pareto" and feasible:
        best = study.best_trial
        result["best"] = {"trial": best.number, "value": best.value, "predicted_ms": best.user_attrs.get("predicted_ms")}
    else:
        result["pareto_front"] = len(feasible)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{exp.name}: " + ", ".join(f"{v} {k}" for k, v in states.items() if v))
    if "best" in result:
        b = result["best"]
        print(f"best: trial {b['trial']}, value {b['value']:.4g}, predicted {b['predicted_ms']:.3f} ms")
    else:
        print(f"Pareto front: {result['pareto_front']} trials")
    print(f"run folder: {exp.run_dir}")
    if "tensorboard" in result:
        print(f"watch it: tensorboard --logdir {result['tensorboard']}; the front: nas pareto {exp.run_dir}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run or resume an architecture search (same command again resumes)",
                       description="Run the search an experiment YAML describes. Running the same command again "
                                   "resumes it: finished trials are kept and only the missing ones run. Several "
                                   "machines join by using the same --storage URL and --study name.")
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    p.add_argument("--name", help="run name (folder under --output)")
    p.add_argument("--table", help="latency table to predict with (default: the experiment's)")
    p.add_argument("--adapt", action="store_true",
                   help="if the table was measured on another CPU, adapt it to this one first (about a minute: "
                        "`nas lut adapt`), into RUN/latency_table.csv; a run that has one keeps using it")
    p.add_argument("--budget-ms", type=float, help="latency budget in milliseconds")
    p.add_argument("--budget-scope", "--scope", dest="scope", choices=["backbone", "detector"],
                   help="what the budget covers: detector = backbone + neck + head, the latency you deploy (default), "
                        "or the backbone alone")
    p.add_argument("--neck", choices=["dw", "yolov8"], help="detector neck (short training and detector budgets)")
    p.add_argument("--classes", type=int, help="classes of the deployed detector (sizes the head in the budget)")
    p.add_argument("--mode", choices=["constraint", "mnas", "pareto"], help="how latency enters the objective")
    p.add_argument("--sampler", help="tpe | nsga2 | random | gp | qmc | ... or any optuna.samplers class name")
    p.add_argument("--trials", type=int, help="finished trials the study should hold")
    p.add_argument("--timeout", type=float, help="stop this worker after this many seconds")
    p.add_argument("--evaluator", choices=["proxy", "train"], help="zero-cost proxy or short training")
    p.add_argument("--proxy", help="proxy name: macs (default), params, synflow, grad_norm, snip, naswot, entropy, zen, tse")
    p.add_argument("--epochs", type=int, help="epochs of the short-training evaluator")
    p.add_argument("--storage", help="Optuna storage: sqlite:///F, postgresql://..., journal:///F, redis://...")
    p.add_argument("--study", help="study name (default: the run name)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="local worker processes on the same study")
    p.add_argument("--output", help="parent folder of the run folder (default runs)")
    p.add_argument("--device", help="cpu | cuda:0 for evaluation")
    p.add_argument("--tb-every", type=int, metavar="K",
                   help="TensorBoard Pareto figure every K trials in RUN/tb (default 25; 0 = no TensorBoard)")
    p.add_argument("--heartbeat", type=int, metavar="S",
                   help="SQL storages: seconds between a running trial's heartbeats (default 10)")
    p.add_argument("--grace", type=int, metavar="S",
                   help="a trial with no heartbeat for this many seconds (SQL storages; journal storages: no worker "
                        "recorded) is failed and retried (default 30; must exceed --heartbeat); a worker waiting for "
                        "others' trials gives up after 5 times this without progress")
    p.add_argument("--storage-timeout", type=int, metavar="S",
                   help="a worker whose storage (database server) is unreachable waits and reconnects, and gives up "
                        "with an error after this many seconds (default 120)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_search)
