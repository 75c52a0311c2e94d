"""Search quality: hypervolume of `pareto`-mode searches at equal trial budgets, per sampler, over several seeds.

Each (sampler, seed) study runs the experiment (default experiments/uib_pareto.yaml: the shipped UIB space and
torch-CPU table, proxy evaluator) for the same number of trials, in its own SQLite file under the benchmark folder;
running the command again resumes unfinished studies and reuses finished ones (wall times are kept in times.json;
a resumed study's time adds up the calls that worked on it, without the killed call's share). Hypervolume is of
the feasible evaluated trials in (proxy score up, predicted latency down) against ONE reference point for all
studies: (lowest feasible score seen in any study, the latency budget).

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_quality.py --trials 200
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.report.fronts import Point, hypervolume, trial_points
from nas.search.experiment import EvaluatorConfig, Experiment, apply_overrides, load_experiment  # noqa: E402
from nas.search.storage import make_storage
from nas.search.study import run

ROOT = Path(__file__).resolve().parents[1]


def study_experiment(base: Experiment, sampler: str, seed: int, args: argparse.Namespace) -> Experiment:
    name = f"{sampler}-s{seed}"
    out = Path(args.out).resolve()
    exp = apply_overrides(base, {"name": name, "sampler": sampler, "seed": seed, "trials": args.trials,
                                 "mode": "pareto", "output": str(out), "tensorboard_every": 0, "workers": 1,
                                 "storage": f"sqlite:///{out / name / 'study.db'}", "study": name,
                                 "evaluator.kind": "proxy", "evaluator.proxy": args.proxy})
    return exp


def load_points(exp: Experiment) -> list[Point]:
    import optuna

    try:
        study = optuna.load_study(study_name=exp.study_name, storage=make_storage(exp.storage_url()))
    except KeyError:  # the database exists but the study was never created
        return []
    return trial_points(study)


def feasible_pairs(points: list[Point], first: int | None = None) -> list[tuple[float, float]]:
    """(score, predicted_ms) of the feasible evaluated trials among the first `first` trials (all when None)."""
    return [(p.score, p.predicted_ms) for p in points
            if p.feasible and p.score is not None and (first is None or p.trial < first)]


def fmt_median(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "–"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default=str(ROOT / "experiments/uib_pareto.yaml"))
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--samplers", default="tpe,nsga2,random")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--proxy", default=EvaluatorConfig.proxy, help="default: the evaluator's default proxy")
    ap.add_argument("--budget-ms", type=float, help="override the experiment's budget")
    ap.add_argument("--checkpoints", default="50,100", help="also report HV after these many trials")
    ap.add_argument("--out", default=str(ROOT / "runs/bench_search_quality"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial would bury the table

    base = load_experiment(args.experiment)
    if args.budget_ms:
        base = replace(base, budget_ms=args.budget_ms)
    if base.budget_ms is None:
        sys.exit("the experiment needs budget_ms: it is the reference latency of the hypervolume")
    samplers, seeds = args.samplers.split(","), [int(s) for s in args.seeds.split(",")]
    checkpoints = [int(c) for c in args.checkpoints.split(",") if c and int(c) < args.trials] + [args.trials]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}

    points: dict[tuple[str, int], list[Point]] = {}
    for seed in seeds:  # seed-major: an interrupted benchmark still has every sampler at the first seeds
        for sampler in samplers:
            exp = study_experiment(base, sampler, seed, args)
            key = f"{exp.name}@{args.trials}"
            before = len(load_points(exp)) if (exp.run_dir / "study.db").is_file() else 0
            t0, c0 = time.perf_counter(), time.process_time()
            run(exp, progress=False)  # a finished study returns at once
            if before < args.trials:  # this call did (some of) the work; a resumed study's time is partial
                times[key] = round(time.perf_counter() - t0, 1) + (times.get(key, 0.0) if before else 0.0)
                # CPU time as well: the core is shared with other jobs, so wall time overstates the cost
                cpu = round(time.process_time() - c0, 1)
                times[key + ":cpu"] = cpu + (times.get(key + ":cpu", 0.0) if before else 0.0)
                times_path.write_text(json.dumps(times, indent=1))
            points[(sampler, seed)] = load_points(exp)
            print(f"{exp.name}: {len(points[(sampler, seed)])} trials, {len(feasible_pairs(points[(sampler, seed)]))} "
                  f"feasible, {times.get(key, float('nan')):.0f} s", file=sys.stderr, flush=True)

    # One reference for every study, else the hypervolumes are not comparable.
    all_pairs = [pair for pts in points.values() for pair in feasible_pairs(pts)]
    ref = (min(s for s, _ in all_pairs), float(base.budget_ms))
    # Normaliser: the box between the reference and the ideal corner (best score, fastest latency of all studies).
    box = (max(s for s, _ in all_pairs) - ref[0]) * (ref[1] - min(lat for _, lat in all_pairs))

    rows: list[dict[str, Any]] = []
    for (sampler, seed), pts in points.items():
        row = {"sampler": sampler, "seed": seed, "feasible": len(feasible_pairs(pts)),
               "seconds": times.get(f"{sampler}-s{seed}@{args.trials}", float("nan")),
               "cpu_seconds": times.get(f"{sampler}-s{seed}@{args.trials}:cpu", float("nan"))}
        for c in checkpoints:
            row[f"hv@{c}"] = hypervolume(feasible_pairs(pts, c), ref)
        rows.append(row)
    (out / "results.json").write_text(json.dumps({"reference": ref, "ideal_box": box, "trials": args.trials,
                                                  "proxy": args.proxy, "budget_ms": base.budget_ms, "rows": rows},
                                                 indent=1))

    head = " | ".join(f"median HV@{c} (norm.)" for c in checkpoints)
    lines = [f"pareto mode, proxy {args.proxy}, budget {base.budget_ms} ms, {args.trials} trials per study, seeds "
             f"{args.seeds}; reference point (score {ref[0]:.3f}, latency {ref[1]} ms); norm. = HV / {box:.3f} "
             f"(the box up to the best score and fastest latency seen in any study)", "",
             f"| sampler | {head} | HV@{args.trials} per seed | feasible trials (median) | "
             f"wall s per study (median) | CPU s per study (median) |",
             "|---|" + "---|" * (len(checkpoints) + 4)]
    for sampler in samplers:
        mine = [r for r in rows if r["sampler"] == sampler]
        medians = [statistics.median(r[f"hv@{c}"] for r in mine) for c in checkpoints]
        cells = [f"{m:.3f} ({m / box:.3f})" for m in medians]
        per_seed = ", ".join(f"{r[f'hv@{args.trials}']:.3f}" for r in mine)
        lines.append(f"| {sampler} | {' | '.join(cells)} | {per_seed} | "
                     f"{fmt_median([r['feasible'] for r in mine], 0)} | "
                     f"{fmt_median([r['seconds'] for r in mine], 0)} | "
                     f"{fmt_median([r['cpu_seconds'] for r in mine], 0)} |")
    if "random" in samplers:  # within a seed: the proxy's random weights come from the seed too
        lines += ["", f"HV@{args.trials} relative to random sampling at the same seed:", ""]
        hv = {(r["sampler"], r["seed"]): r[f"hv@{args.trials}"] for r in rows}
        for sampler in (s for s in samplers if s != "random"):
            ratios = [hv[(sampler, seed)] / hv[("random", seed)] for seed in seeds if hv[("random", seed)] > 0]
            wins = sum(hv[(sampler, seed)] > hv[("random", seed)] for seed in seeds)
            lines.append(f"- {sampler}: " + ", ".join(f"{x:.2f}x" for x in ratios)
                         + f" (median {statistics.median(ratios):.2f}x; beats random at {wins} of {len(seeds)} seeds)")
    text = "\n".join(lines) + "\n"
    (out / "search_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
