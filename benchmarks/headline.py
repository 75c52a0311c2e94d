"""Headline benchmark (issue 9): searched YOLO backbones against hand-designed MobileNets at equal latency.

One command runs it all and writes everything docs/BENCHMARKS.md needs:

    .venv/bin/python benchmarks/headline.py            # full run: 49 (Zen 5) to ~85 min (Zen 4) on 2 free cores
    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/headline.py --smoke --out runs/headline_smoke

Steps (each prints a progress line with its wall time):
1. budgets: the MobileNetV4-Conv-Small and MobileNetV3-Small detectors (dw neck, 10 classes, untrained) measured
   interleaved at --resolution (torch eager, 1 thread, median); `--budget-ms A B` overrides the values. The
   same measurement gives the table's bias on each of them: search i gets budget i x predicted/measured of
   detector i, so that "under the budget" means the same thing to the search (table units) and to the verdict
   (measured).
2. one search per budget (`nas search` on --experiment with overrides; its space pinned to --resolution), then
   its --rerank best front members predicted at or under the search budget are trained briefly
   (nas.report.rerank, the short schedule, ~1 CPU-min each) and the --top-k best of them by that mAP go on
   (--rerank 0: the --top-k best by the search's score).
3. those and the zoo baselines trained alike (same neck, head, DigitsDet data, schedule and seeds) with
   nas.report.compare's training task, one training per usable CPU core at a time, each pinned to its core with
   one thread.
4. every compared detector measured end to end in ONE interleaved run (round-robin, many rounds, medians), with
   its predicted latency, params and MACs at --resolution.
5. OUT/results.json, OUT/headline.md, OUT/map_vs_latency_<budget>.png, and a verdict per budget: the best searched
   model (highest median mAP50-95 among those at or under the budget) must be at or under the budget, and no
   baseline that is not faster may beat its median mAP50-95 by more than the seed range (the larger of the two).
   A measured budget is judged against its zoo detector in the final run (the machine drifts between runs).

Resumable: run the same command again. Finished searches (OUT/searches/*/headline.json), short trainings
(OUT/rerank/<model>/seed<N>/short.json) and trainings (OUT/train/<model>/seed<N>/headline.json) are kept; a
killed training restarts from scratch. Settings that change results (schedule, data, seeds, search) are checked
against OUT/settings.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from nas.arch.spec import dumps_arch, loads_arch
from nas.errors import ConfigError, NasError

BASELINES = ("mobilenet_v2_100", "mobilenet_v3_large_100", "mobilenet_v3_small_100", "mobilenet_v4_conv_small",
             "yolov8n_csp")
BUDGET_MODELS = ("mobilenet_v4_conv_small", "mobilenet_v3_small_100")  # budget 1, budget 2
SMOKE = {"trials": 24, "top_k": 2, "rerank": 3, "epochs": 1, "imgsz": 64, "batch": 8, "train_images": 32,
         "val_images": 16, "seeds": [0], "baselines": "mobilenet_v3_small_100,mobilenet_v4_conv_small",
         "budget_rounds": 5, "measure_rounds": 5}
# what makes a finished training or search reusable by a rerun: a change here means other numbers
RESULT_SETTINGS = ("experiment", "space", "table", "resolution", "mode", "proxy", "trials", "rerank", "rerank_seeds",
                   "epochs", "minutes", "imgsz", "batch", "train_images", "val_images", "data_seed", "neck",
                   "calibrate")
T0 = time.time()  # a pool worker gets the script's start from its initializer


def stamp(msg: str) -> str:
    return f"[{time.strftime('%H:%M:%S')} +{(time.time() - T0) / 60:5.1f} min] {msg}"


def log(msg: str) -> None:
    # one write per line: the pool workers share the terminal
    sys.stdout.write(stamp(msg) + "\n")
    sys.stdout.flush()


class Stamped(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return stamp(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())


def show_library_logs(quiet: bool) -> None:
    """The library's records on stdout, stamped like the script's lines; per-epoch lines unless --quiet; Optuna's
    per-trial lines off (the searches report when they finish)."""
    import optuna

    handler = logging.StreamHandler(sys.stdout)  # one write per record
    handler.setFormatter(Stamped())
    logging.getLogger("nas").addHandler(handler)
    logging.getLogger("nas").setLevel(logging.INFO)
    logging.getLogger("nas.report.compare").setLevel(logging.INFO if quiet else logging.DEBUG)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pin(core: int | None) -> None:
    """One core, one thread: two trainings side by side must not time-share a core or spin OpenMP threads."""
    import torch

    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")  # temp + rename: a kill mid-write leaves the old file or none
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- settings

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="headline.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]))
    g = p.add_argument_group("budgets and search")
    g.add_argument("--budget-ms", type=float, nargs=2, metavar=("A", "B"),
                   help="the two latency budgets in measured ms (default: the measured V4-Conv-Small and V3-Small "
                        "detectors' latencies)")
    g.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="search against the budgets as given, not scaled to the table's predictions")
    g.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "quickstart.yaml",
                   help="the search settings (default: %(default)s)")
    g.add_argument("--space", type=Path, help="search space YAML (default: the experiment's)")
    g.add_argument("--table", type=Path, default=ROOT / "latency_tables" / "cpu_torch-cpu_fp32_t1.csv",
                   help="latency table the searches predict with (default: %(default)s)")
    g.add_argument("--resolution", type=int, default=256,
                   help="deployed input resolution: budgets, search space and latency (default: %(default)s)")
    g.add_argument("--mode", choices=("pareto", "constraint"), help="search mode (default: the experiment's)")
    g.add_argument("--proxy", help="zero-cost proxy of the search (default: the experiment's)")
    g.add_argument("--trials", type=int, default=300, help="trials per search (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=3, help="front members trained per budget (default: %(default)s)")
    g.add_argument("--rerank", type=int, default=8,
                   help="front members per budget short-trained to choose the --top-k among (0: choose by the "
                        "search's score; default: %(default)s)")
    g = p.add_argument_group("training (identical for every model)")
    g.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma-separated zoo names, or 'none' (default: %(default)s)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    g.add_argument("--epochs", type=int, default=8, help="epochs per training (default: %(default)s)")
    g.add_argument("--minutes", type=float,
                   help="wall-clock cap per training (epochs re-planned to fit it: slower models may then train fewer "
                        "epochs than --epochs, so the schedules differ)")
    g.add_argument("--imgsz", type=int, default=256, help="training and evaluation image size (default: %(default)s)")
    g.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    g.add_argument("--train-images", type=int, default=800, help="DigitsDet training images (default: %(default)s)")
    g.add_argument("--val-images", type=int, default=200, help="DigitsDet validation images (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=ROOT / "runs" / "headline", help="output folder (default: %(default)s)")
    g.add_argument("--jobs", type=int,
                   help="trainings (and searches) in parallel, one per core (default: the cores this process may "
                        "use, from taskset)")
    g.add_argument("--budget-rounds", type=int, default=60,
                   help="interleaved rounds of the budget measurement (default: %(default)s)")
    g.add_argument("--measure-rounds", type=int, default=100,
                   help="interleaved rounds of the final measurement, 5 timed calls each (default: %(default)s)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny settings end to end in a few minutes: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
                        + " (explicit options still win)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = p.parse_args(argv)
    if args.smoke:  # the smoke values replace defaults only, never what was typed
        typed = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in typed:
                setattr(args, k, v)
    check_args(args, p)
    return args


def check_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    from nas.report.compare import parse_baselines

    for name in ("trials", "epochs", "batch", "train_images", "val_images", "budget_rounds", "measure_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.rerank and args.rerank <= args.top_k:
        p.error(f"--rerank must be more than --top-k ({args.top_k}) to choose among them, got {args.rerank} "
                "(0: no reranking)")
    for name in ("imgsz", "resolution"):
        v = getattr(args, name)
        if v < 32 or v % 32:
            p.error(f"--{name} must be a positive multiple of 32 (the detector's largest stride), got {v}")
    if args.budget_ms and not all(b > 0 for b in args.budget_ms):
        p.error(f"--budget-ms must be positive, got {args.budget_ms}")
    if args.minutes is not None and not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    for name in ("experiment", "table"):
        if not getattr(args, name).is_file():
            p.error(f"--{name}: file not found: {getattr(args, name)}")
    if args.space is not None and not args.space.is_file():
        p.error(f"--space: file not found: {args.space}")
    cores = usable_cores()
    if args.jobs is None:
        args.jobs = len(cores)
    if not 1 <= args.jobs <= len(cores):
        p.error(f"--jobs must be between 1 and the {len(cores)} core(s) this process may use ({cores}), "
                f"got {args.jobs}")
    args.cores = cores[:args.jobs]
    args.baseline_names = parse_baselines(args.baselines)
    args.data_seed = 0


def settings(args: argparse.Namespace, exp) -> dict[str, Any]:
    return {"experiment": str(args.experiment), "space": str(args.space or exp.space), "table": str(args.table),
            "resolution": args.resolution, "mode": exp.mode, "proxy": exp.evaluator.proxy, "trials": args.trials,
            "top_k": args.top_k, "rerank": args.rerank,
            "rerank_seeds": list(short_schedule(args, exp.evaluator.neck).seeds),
            "baselines": args.baseline_names, "seeds": args.seeds,
            "epochs": args.epochs, "minutes": args.minutes, "imgsz": args.imgsz, "batch": args.batch,
            "train_images": args.train_images,
            "val_images": args.val_images, "data_seed": args.data_seed, "neck": exp.evaluator.neck,
            "num_classes": 10, "calibrate": args.calibrate, "jobs": args.jobs, "cores": args.cores,
            "budget_rounds": args.budget_rounds, "measure_rounds": args.measure_rounds, "smoke": args.smoke}


def check_settings(out: Path, now: dict[str, Any]) -> None:
    """A rerun reuses finished work only when it was made with the same settings; say which differ otherwise."""
    path = out / "settings.json"
    old = read_json(path)
    if isinstance(old, dict):
        diff = [k for k in RESULT_SETTINGS if k in old and old[k] != now.get(k)]
        if diff:
            raise ConfigError(str(path), diff[0], "this folder's finished work was made with other settings ("
                              + ", ".join(f"{k}: {old[k]!r} then, {now.get(k)!r} now" for k in diff)
                              + "); use another --out, or delete the folder to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, now)


def load_search_experiment(args: argparse.Namespace):
    from nas.search.experiment import apply_overrides, load_experiment

    exp = load_experiment(args.experiment)
    return apply_overrides(exp, {"mode": args.mode, "evaluator.proxy": args.proxy, "trials": args.trials,
                                 "table": str(args.table.resolve()), "workers": 1,
                                 "space": str(args.space.resolve()) if args.space else None})


def pinned_space(exp, resolution: int, out: Path) -> Path:
    """The experiment's space with its input resolution fixed to the deployed one: a searched model must not
    spend its budget at another resolution than the one it is measured and compared at."""
    import yaml

    from nas.config import load_yaml
    from nas.space import space_from_dict

    d = load_yaml(exp.space)
    d["resolution"] = [resolution]
    path = out / f"space_{resolution}.yaml"
    space_from_dict(d, str(path))  # validate before a search opens it
    path.write_text(f"# {exp.space} with resolution pinned to {resolution} by benchmarks/headline.py\n"
                    + yaml.safe_dump(d, sort_keys=False))
    return path


# ---------------------------------------------------------------- budgets

def measure_budgets(args, table, head, out: Path) -> dict[str, Any]:
    """Measured (and predicted) latencies of the budget-defining zoo detectors; kept in OUT/budgets.json so a
    rerun searches against the same budgets."""
    path = out / "budgets.json"
    saved = read_json(path)
    if isinstance(saved, dict) and saved.get("resolution") == args.resolution:
        log(f"budget reference latencies from {path} (delete it to measure again)")
        ref = saved
    else:
        import torch

        from nas.arch.detector import Detector
        from nas.arch.zoo import get_arch
        from nas.report.compare import measure_detectors, predicted_ms

        torch.manual_seed(0)
        models = {n: Detector(get_arch(n), head) for n in BUDGET_MODELS}
        t = time.time()
        m = measure_detectors(models, args.resolution, table.protocol, rounds=args.budget_rounds)
        ref = {"resolution": args.resolution, "seconds": round(time.time() - t, 1),
               "measured_ms": {n: round(m[n].value_us("median") / 1e3, 3) for n in BUDGET_MODELS},
               "measured_p10_ms": {n: round(m[n].value_us("p10") / 1e3, 3) for n in BUDGET_MODELS},
               "predicted_ms": {n: predicted_ms(table, get_arch(n), head, args.resolution) for n in BUDGET_MODELS}}
        write_json(path, ref)
    values = list(args.budget_ms) if args.budget_ms else [ref["measured_ms"][n] for n in BUDGET_MODELS]
    # Each budget is scaled by its own reference detector's predicted/measured ratio: the table's error is not
    # one factor for all models (measured on another CPU than the table: V4-Conv-Small 1.75, V3-Small 1.90), and
    # a model near the reference shares most of the reference's error.
    ratios = {n: ref["predicted_ms"][n] / ref["measured_ms"][n] for n in BUDGET_MODELS
              if ref["predicted_ms"][n] and ref["measured_ms"][n]}
    if args.calibrate and not ratios:
        log("calibration skipped: the table cannot predict the budget models (searching against the raw budgets)")
    budgets = []
    for i, b in enumerate(values):
        source = "--budget-ms" if args.budget_ms else f"measured {BUDGET_MODELS[i]} detector"
        factor = (ratios.get(BUDGET_MODELS[i], statistics.mean(ratios.values()) if ratios else 1.0)
                  if args.calibrate else 1.0)
        budgets.append({"tag": f"b{i + 1}", "budget_ms": round(b, 3), "source": source,
                        "reference": None if args.budget_ms else BUDGET_MODELS[i],
                        "factor": round(factor, 4), "search_budget_ms": round(b * factor, 3)})
        log(f"budget b{i + 1}: {b:.2f} ms measured ({source}); search budget {b * factor:.2f} ms predicted "
            f"(table/measured {factor:.3f}, {BUDGET_MODELS[i] if BUDGET_MODELS[i] in ratios else 'mean'})")
    return {"reference": ref, "budgets": budgets}


# ---------------------------------------------------------------- searches

def search_task(task: dict[str, Any]) -> dict[str, Any]:
    """One search, run or resumed (nas.search.study.run adds only the missing trials); its k best front members
    under the budget are the candidates."""
    from nas.report.compare import top_members
    from nas.report.fronts import front
    from nas.report.tensorboard import tensorboard_callbacks
    from nas.search.study import run, summary

    exp, max_ms, k = task["exp"], task["max_ms"], task["top_k"]
    t = time.time()
    study = run(exp, progress=False, callbacks=tensorboard_callbacks(exp))
    wall = time.time() - t
    try:
        members = top_members(study, k, max_ms) if k else []
    except NasError as e:  # no feasible member: the budget's table holds the baselines only
        log(f"search {exp.name}: {e}")
        members = []
    return {"name": exp.name, "run_dir": str(exp.run_dir), "wall_s": round(wall, 1), "trials": summary(study),
            "front_size": len(front(study)), "budget_ms": exp.budget_ms,
            "members": [{"label": m.label, "score": m.score, "arch": dumps_arch(m.arch)} for m in members]}


def run_searches(args, exp, budgets, space: Path, out: Path, map_fn) -> list[dict[str, Any]]:
    tasks, done = [], {}
    for b in budgets:
        name = f"search_{b['tag']}_{b['search_budget_ms']:g}ms"
        e = replace(exp, name=name, budget_ms=b["search_budget_ms"], space=str(space), output=str(out / "searches"),
                    scope="detector", tensorboard_every=0 if args.smoke else exp.tensorboard_every)
        marker = out / "searches" / name / "headline.json"
        prev = read_json(marker)
        if isinstance(prev, dict) and prev.get("candidates") == n_candidates(args):
            log(f"search {name}: finished earlier ({prev['wall_s'] / 60:.1f} min), reused")
            done[b["tag"]] = prev
            continue
        # a search killed before its marker resumes its study; the killed part's wall time is not counted
        tasks.append((b["tag"], marker, {"exp": e, "max_ms": b["search_budget_ms"], "top_k": n_candidates(args)}))
        log(f"search {name}: {e.mode} mode, {e.trials} trials, proxy {e.evaluator.proxy}, "
            f"budget {e.budget_ms:g} ms predicted (whole detector)")
    for (tag, marker, _), r in zip(tasks, map_fn(search_task, [t[2] for t in tasks])):
        r["candidates"] = n_candidates(args)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, r)
        log(f"search {r['name']}: done in {r['wall_s'] / 60:.1f} min, front {r['front_size']}, candidates "
            + (", ".join(m["label"] for m in r["members"]) or "none (no front member under the budget)"))
        done[tag] = r
    return [done[b["tag"]] for b in budgets]


def n_candidates(args) -> int:
    return max(args.top_k, args.rerank) if args.top_k else 0


# ---------------------------------------------------------------- rerank and trainings (nas.report)

def short_schedule(args, neck: str):
    """The short schedule of nas.report.rerank; --smoke shrinks it to the smoke run's data and image size."""
    from nas.detect.short import ShortSchedule

    if args.smoke:
        return ShortSchedule(epochs=1, imgsz=args.imgsz, batch=args.batch, train_images=args.train_images,
                             val_images=args.val_images, neck=neck, seeds=(0,))
    return ShortSchedule(neck=neck)


def run_reranks(args, budgets, searches, neck: str, out: Path, map_fn) -> float:
    """Short-train every search's candidates (nas.report.rerank, one per core at a time, finished ones reused),
    then keep each search's --top-k best by mean short-training mAP as its members; all of them, ranked, go to the
    search's `candidates_ranked`. Returns the wall time."""
    from nas.report.compare import Entrant
    from nas.report.rerank import Ranked, order, rerank

    if not args.rerank:
        for s in searches:
            s["members"] = s["members"][:args.top_k]
        return 0.0
    schedule = short_schedule(args, neck)
    archs: dict[str, str] = {}  # label -> arch, one per architecture: both searches may find the same one
    for b, s in zip(budgets, searches):
        for m in s["members"]:
            m["rerank_label"] = next((k for k, a in archs.items() if a == m["arch"]), f"{b['tag']}-{m['label']}")
            archs.setdefault(m["rerank_label"], m["arch"])
    log(f"rerank: {len(archs)} candidates, {schedule.epochs} epochs at {schedule.imgsz} px each with seeds "
        f"{', '.join(map(str, schedule.seeds))}, {len(args.cores)} candidates at a time")
    t = time.time()
    candidates = [Entrant(k, "search", loads_arch(archs[k], k)) for k in sorted(archs)]
    # the script owns its processes: keeping freed memory saves page faults in every training step
    results = {x.entrant.label: x for x in rerank(candidates, schedule, out / "rerank", map_fn, retain_heap=True)}
    for b, s in zip(budgets, searches):
        by_label = {}
        for m in s["members"]:
            r = results[m["rerank_label"]]
            by_label[m["label"]] = {**m, "map50_95": r.map50_95, "map50": r.map50, "train_s": r.train_s,
                                    "train_cpu_s": r.train_cpu_s, "per_seed": list(r.per_seed)}
        ranked = order(Ranked(Entrant(c["label"], "search", loads_arch(c["arch"], c["label"]), c["score"]),
                              c["map50_95"], c["map50"], c["train_s"]) for c in by_label.values())
        s["candidates_ranked"] = [{**by_label[x.entrant.label], "chosen": i < args.top_k} for i, x in enumerate(ranked)]
        members = {m["label"]: m for m in s["members"]}
        s["members"] = [members[x.entrant.label] for x in ranked[:args.top_k]]
        log(f"rerank {b['tag']}: after the short training "
            + ", ".join(f"{x.entrant.label} {x.map50_95:.4f}" for x in ranked))
        log(f"rerank {b['tag']}: training " + ", ".join(m["label"] for m in s["members"]))
    return time.time() - t


def run_trainings(args, entrants: dict[str, dict[str, Any]], data: Path, head, out: Path, map_fn
                  ) -> dict[str, list[dict[str, Any]]]:
    """Every entrant with every seed into OUT/train/<label>/seed<N> (nas.report.compare's training task, one per
    core at a time, heaviest first); a training's headline.json marks it finished."""
    from nas.detect.train import TrainConfig
    from nas.report.compare import Training, run_training

    results: dict[str, list[dict[str, Any]]] = {label: [] for label in entrants}
    pending = []  # (label, run folder, task)
    # heaviest first: the last ones to finish are short
    for label, e in sorted(entrants.items(), key=lambda x: -x[1]["macs"]):
        for seed in args.seeds:
            run_dir = out / "train" / label / f"seed{seed}"
            prev = read_json(run_dir / "headline.json")
            if isinstance(prev, dict) and Path(prev.get("weights", "")).is_file():
                results[label].append(prev)
                continue
            if run_dir.exists():  # killed mid-training: start again rather than mix two runs' files
                shutil.rmtree(run_dir)
            cfg = TrainConfig(arch=loads_arch(e["arch"], label), data=str(data), epochs=args.epochs, imgsz=args.imgsz,
                              batch=args.batch, workers=0, threads=1, head=head, seed=seed,
                              time_limit_s=args.minutes * 60 if args.minutes else None, project=str(run_dir.parent),
                              name=run_dir.name, exist_ok=True, progress=False, retain_heap=True)
            pending.append((label, run_dir, Training(f"{label} seed {seed}", cfg)))
    log(f"trainings: {len(pending)} to run, {sum(map(len, results.values()))} finished earlier, "
        f"{len(args.cores)} at a time")
    for (label, run_dir, task), r in zip(pending, map_fn(run_training, [p[2] for p in pending])):
        res = {"label": label, "seed": task.config.seed, "map50_95": r.map50_95, "map50": r.map50,
               "epochs": r.epochs, "best_epoch": r.best_epoch, "wall_s": round(r.seconds, 1),
               "weights": str(r.best if r.best.is_file() else r.last)}
        write_json(run_dir / "headline.json", res)
        results[label].append(res)
    for v in results.values():
        v.sort(key=lambda r: r["seed"])
    return results


# ---------------------------------------------------------------- pools

def init_worker(cores, t0: float, quiet: bool) -> None:
    global T0
    T0 = t0
    die_with_parent()
    pin(cores.get())
    show_library_logs(quiet)


def die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGTERM when the process that started it dies, so killing the script
    does not leave workers training (or searching) into OUT on their own. Elsewhere: nothing."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def make_pool(cores: list[int], quiet: bool):
    """A process pool with one worker per core, or None for --jobs 1 (everything in this process, already pinned,
    so tracebacks and Ctrl-C are plain)."""
    pin(cores[0])  # this process measures (budgets, final run): on the first core, while the workers are idle
    if len(cores) == 1:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # fork after torch started threads is unsafe
    q = ctx.Queue()
    for c in cores:
        q.put(c)
    return ProcessPoolExecutor(len(cores), mp_context=ctx, initializer=init_worker, initargs=(q, T0, quiet))


# ---------------------------------------------------------------- outputs

def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def verdict(budget: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best searched model = highest median mAP50-95 among the searched ones measured at or under the budget (if
    none is, among all searched: it then fails the latency part). It wins if no baseline that is not faster beats
    its median mAP50-95 by more than the larger of the two seed ranges."""
    searched = [r for r in rows if r["source"] == "search" and r["measured_ms"] is not None]
    if not searched:
        return {"ok": False, "text": "no searched model (no front member under the search budget)"}
    under = [r for r in searched if r["measured_ms"] <= budget["limit_ms"]]
    best = max(under or searched, key=lambda r: r["map50_95"]["median"])
    lines, ok = [], bool(under)
    lines.append(f"best searched {best['model']}: {best['measured_ms']:.2f} ms measured, "
                 f"{'at or under' if under else 'OVER'} the {budget['limit_ms']:.2f} ms budget "
                 f"({budget['limit_source']}); "
                 f"mAP50-95 {best['map50_95']['median']:.4f}")
    for r in rows:
        if r["source"] != "zoo" or r["measured_ms"] is None or r["measured_ms"] < best["measured_ms"]:
            continue
        tol = max(best["map50_95"]["max"] - best["map50_95"]["min"], r["map50_95"]["max"] - r["map50_95"]["min"])
        gap = r["map50_95"]["median"] - best["map50_95"]["median"]
        beaten = gap > tol
        ok = ok and not beaten
        lines.append(f"  vs {r['model']} ({r['measured_ms']:.2f} ms): mAP50-95 {r['map50_95']['median']:.4f}, "
                     f"{'BEATS it' if beaten else 'not better'} by more than the seed spread ({gap:+.4f} vs "
                     f"{tol:.4f})")
    return {"ok": ok, "best": best["model"], "text": "\n".join(lines)}


def fmt_range(s: dict[str, float]) -> str:
    return f"{s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}]"


def markdown(report: dict[str, Any]) -> str:
    st = report["settings"]
    out = [f"# Headline benchmark{' (SMOKE: tiny settings, numbers meaningless)' if st['smoke'] else ''}", "",
           f"Command: `{report['command']}`", "",
           (f"Training: DigitsDet {st['train_images']} train / {st['val_images']} val (data seed {st['data_seed']}), "
            f"{st['epochs']} epochs" + (f" capped at {st['minutes']:g} min" if st["minutes"] else "")
            + f", {st['imgsz']} px, batch {st['batch']}, {st['neck']} neck, 10 classes, seeds "
            + ", ".join(map(str, st["seeds"])) + ". "
            f"Latency: torch eager CPU, 1 thread, {st['resolution']} px, median of one interleaved run "
            f"({st['measure_rounds']} rounds); predicted: {Path(st['table']).name}. "
            "mAP: median [min-max] over seeds."), "",
           (f"Wall time of this invocation: total {report['wall_s'] / 60:.1f} min, rerank "
            f"{report['rerank_s'] / 60:.1f} min, trainings "
            f"{report['train_wall_s'] / 60:.1f} min (sum of all trainings' wall times "
            f"{report['train_cpu_s'] / 60:.1f} min, over {len(st['cores'])} core(s)), "
            f"final measurement {report['measure_s'] / 60:.1f} min."), ""]
    for b in report["budgets"]:
        s = b["search"]
        out += [f"## Budget {b['tag']}: {b['limit_ms']:.2f} ms ({b['limit_source']})", "",
                f"Before the searches: {b['budget_ms']:.2f} ms ({b['source']}).", "",
                (f"Search: {st['mode']} mode, {st['trials']} trials, proxy {st['proxy']}, search budget "
                 f"{b['search_budget_ms']:.2f} ms predicted; wall time {s['wall_s'] / 60:.1f} min; front "
                 f"{s['front_size']}; training of its models {b['train_wall_s'] / 60:.1f} min (sum over seeds)."), "",
                *rerank_table(s, st),
                "| model | source | measured ms | predicted ms | params | MACs | mAP50-95 | mAP50 |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in b["rows"]:
            pred = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f}"
            out.append(f"| {r['model']} | {r['source']} | {r['measured_ms']:.2f} | {pred} | {r['params']:,} | "
                       f"{r['macs'] / 1e6:.1f}M | {fmt_range(r['map50_95'])} | {fmt_range(r['map50'])} |")
        v = b["verdict"]
        out += ["", f"**Verdict: {'met' if v['ok'] else 'NOT met'}.** " + v["text"].replace("\n", "<br>"), "",
                f"![mAP vs latency, {b['tag']}]({b['figure']})", ""]
    return "\n".join(out)


def rerank_table(search: dict[str, Any], st: dict[str, Any]) -> list[str]:
    ranked = search.get("candidates_ranked")
    if not ranked:
        return []
    lines = [(f"Rerank: the search's {len(ranked)} best front members under the budget by its score, ordered by "
              f"mAP50-95 after the short training (nas.report.rerank: mean over seeds, listed); the first "
              f"{st['top_k']} are trained below."), "",
             "| candidate | predicted ms | MACs | search score | short-training mAP50-95 | seeds | trained |",
             "|---|---:|---:|---:|---:|---|---|"]
    for c in ranked:
        pred = "-" if c.get("predicted_ms") is None else f"{c['predicted_ms']:.2f}"
        score = "-" if c["score"] is None else f"{c['score']:.4g}"
        seeds = " ".join(f"{m:.4f}" for m in c["per_seed"])
        lines.append(f"| {c['label']} | {pred} | {c['macs'] / 1e6:.1f}M | {score} | {c['map50_95']:.4f} | {seeds} | "
                     f"{'yes' if c['chosen'] else ''} |")
    return [*lines, ""]


def figure(budget: dict[str, Any], others: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path,
           title: str) -> Path:
    """compare.comparison_figure (searched dots, zoo stars, budget line) plus the seed range as error bars."""
    from nas.report.compare import Row, comparison_figure
    from nas.report.figures import save_figure

    pts = [Row(r["model"], r["source"], r["map50_95"]["median"], r["map50"]["median"], r["measured_ms"],
               r["predicted_ms"], r["params"], r["macs"], 0, "") for r in rows]
    fig = comparison_figure(pts, title, budget["limit_ms"])
    ax = fig.axes[0]
    ax.errorbar([r["measured_ms"] for r in rows], [r["map50_95"]["median"] for r in rows],
                yerr=[[r["map50_95"]["median"] - r["map50_95"]["min"] for r in rows],
                      [r["map50_95"]["max"] - r["map50_95"]["median"] for r in rows]],
                fmt="none", ecolor="0.45", elinewidth=1.0, capsize=3, zorder=2)
    for line in ax.get_lines():  # comparison_figure calls it the search budget; here the search's is in table units
        if line.get_label().startswith("search budget"):
            line.set_label(f"budget {budget['tag']}: {budget['limit_ms']:.2f} ms (measured)")
    for other in others:
        ax.axvline(other["limit_ms"], color="0.5", linestyle=":", linewidth=1.0,
                   label=f"budget {other['tag']}: {other['limit_ms']:.2f} ms")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("measured detector latency, torch eager CPU, 1 thread (ms)")
    ax.set_ylabel("mAP50-95 on DigitsDet val (median, bars: seed range)")
    return save_figure(fig, path)


def exact_command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    prefix = []
    if len(usable_cores()) < (os.cpu_count() or 1):
        prefix += ["taskset", "-c", ",".join(map(str, usable_cores()))]
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return shlex.join([*prefix, *(["env", *env] if env else []), "python", "benchmarks/headline.py", *args])


# ---------------------------------------------------------------- main

def collect_entrants(args, budgets, searches, table, head) -> dict[str, dict[str, Any]]:
    """Every model once (the baselines serve both budgets, a front member found by both searches trains once),
    with its params, MACs and predicted latency at --resolution; the rerank candidates get the last two too."""
    from nas.arch.detector import detector_cost
    from nas.report.compare import predicted_ms, zoo_entrants

    entrants = {z.label: {"source": "zoo", "arch": dumps_arch(z.arch), "budgets": [x["tag"] for x in budgets]}
                for z in zoo_entrants(args.baseline_names)}
    for bud, s in zip(budgets, searches):
        for m in s["members"]:
            same = next((k for k, e in entrants.items() if e["arch"] == m["arch"]), None)
            if same:
                entrants[same]["budgets"].append(bud["tag"])
            else:
                entrants[f"{bud['tag']}-{m['label']}"] = {"source": "search", "arch": m["arch"],
                                                           "budgets": [bud["tag"]], "score": m["score"]}
    for label, e in entrants.items():
        arch = loads_arch(e["arch"], label)
        e["params"], e["macs"] = detector_cost(arch, head, args.resolution)
        e["predicted_ms"] = predicted_ms(table, arch, head, args.resolution)
    for s in searches:
        for c in s.get("candidates_ranked", []):
            arch = loads_arch(c["arch"], c["label"])
            c["macs"] = detector_cost(arch, head, args.resolution)[1]
            c["predicted_ms"] = predicted_ms(table, arch, head, args.resolution)
    return entrants


def measure_final(args, entrants, trained, table) -> tuple[dict[str, dict[str, Any]], float]:
    """ONE interleaved run over every compared detector (the first seed's weights: seeds share the architecture);
    returns each model's row and the measurement's wall time."""
    from nas.detect.checkpoint import load_detector
    from nas.report.compare import measure_detectors

    pin(args.cores[0])
    t = time.time()
    models = {label: load_detector(trained[label][0]["weights"]) for label in entrants}
    m = measure_detectors(models, args.resolution, table.protocol, rounds=args.measure_rounds)
    measure_s = time.time() - t
    log(f"measured in {measure_s / 60:.1f} min")
    rows: dict[str, dict[str, Any]] = {}
    for label, e in entrants.items():
        runs = trained[label]
        rows[label] = {"model": label, "source": e["source"], "budgets": e["budgets"],
                       "measured_ms": round(m[label].value_us("median") / 1e3, 3),
                       "measured_p10_ms": round(m[label].value_us("p10") / 1e3, 3),
                       "predicted_ms": e["predicted_ms"], "params": e["params"], "macs": e["macs"],
                       "map50_95": spread([r["map50_95"] for r in runs]), "map50": spread([r["map50"] for r in runs]),
                       "seeds": runs, "train_wall_s": round(sum(r["wall_s"] for r in runs), 1),
                       "score": e.get("score"), "arch": e["arch"]}
    return rows, measure_s


def judge(args, budgets, searches, rows, out: Path) -> list[dict[str, Any]]:
    """Each budget's limit, rows (searched models of the budget, then every baseline, fastest first), figure and
    verdict."""
    for bud in budgets:
        # A budget that is a zoo detector's latency is judged against that detector in the same interleaved run:
        # the machine drifts 10-40% between the first measurement and this one.
        ref = rows.get(bud["reference"]) if bud["reference"] else None
        bud["limit_ms"] = ref["measured_ms"] if ref else bud["budget_ms"]
        bud["limit_source"] = (f"{bud['reference']} measured in the same interleaved run" if ref
                               else bud["source"] if bud["reference"] is None
                               else f"{bud['source']} before the searches (not among the compared models)")
    judged = []
    for bud, s in zip(budgets, searches):
        brows = sorted([r for r in rows.values() if bud["tag"] in r["budgets"]],
                       key=lambda r: (r["source"] != "search", r["measured_ms"]))
        png = out / f"map_vs_latency_{bud['tag']}.png"
        figure(bud, [x for x in budgets if x is not bud], brows, png,
               f"budget {bud['tag']} {bud['limit_ms']:.2f} ms: {args.epochs} epochs at {args.imgsz} px, "
               f"latency at {args.resolution} px")
        judged.append({**bud, "search": s, "rows": brows, "verdict": verdict(bud, brows), "figure": png.name,
                       "train_wall_s": round(sum(r["train_wall_s"] for r in brows if r["source"] == "search"), 1)})
    return judged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    command = exact_command(argv)  # before this process pins itself or sets OMP_NUM_THREADS: as the user ran it
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by spawned workers before they import torch
    show_library_logs(args.quiet)
    from nas.arch.headconfig import HeadConfig
    from nas.detect.digits import ensure_digits
    from nas.latency.environment import environment
    from nas.latency.table import LatencyTable

    out = args.out
    exp = load_search_experiment(args)
    head = HeadConfig(neck=exp.evaluator.neck, num_classes=10)  # DigitsDet's 10 digits
    if exp.scope != "detector" or exp.num_classes != 10:
        raise ConfigError(str(args.experiment), "scope", "the headline benchmark needs a detector-scope experiment "
                                                         "with num_classes 10 (DigitsDet)")
    check_settings(out, settings(args, exp))
    log(f"headline benchmark into {out}: cores {args.cores}, seeds {args.seeds}, {args.epochs} epochs at "
        f"{args.imgsz} px, {len(args.baseline_names)} baselines, {args.trials} trials x 2 searches")
    pool = make_pool(args.cores, args.quiet)
    map_fn = pool.map if pool is not None else map
    try:
        table = LatencyTable.load(args.table)
        space = pinned_space(exp, args.resolution, out)
        b = measure_budgets(args, table, head, out)
        budgets = b["budgets"]
        t = time.time()
        data = ensure_digits(out / "data" / f"digitsdet_{args.train_images}_{args.val_images}_{args.imgsz}",
                             args.train_images, args.val_images, imgsz=args.imgsz, seed=args.data_seed,
                             progress=False, workers=0)
        log(f"DigitsDet ready: {data} ({time.time() - t:.0f} s)")
        searches = run_searches(args, exp, budgets, space, out, map_fn)
        rerank_s = run_reranks(args, budgets, searches, head.neck, out, map_fn)
        entrants = collect_entrants(args, budgets, searches, table, head)
        t = time.time()
        trained = run_trainings(args, entrants, data, head, out, map_fn)
        train_wall = time.time() - t
    finally:
        if pool is not None:
            pool.shutdown()

    rows, measure_s = measure_final(args, entrants, trained, table)
    report: dict[str, Any] = {"command": command, "settings": settings(args, exp),
                              "data": str(data), "environment": environment(table.protocol),
                              "budget_reference": b["reference"],
                              "wall_s": round(time.time() - T0, 1), "rerank_s": round(rerank_s, 1),
                              "train_wall_s": round(train_wall, 1),
                              "train_cpu_s": round(sum(r["train_wall_s"] for r in rows.values()), 1),
                              "measure_s": round(measure_s, 1), "budgets": [], "models": rows}
    report["budgets"] = judge(args, budgets, searches, rows, out)
    write_json(out / "results.json", report)
    (out / "headline.md").write_text(markdown(report))
    print()
    for x in report["budgets"]:
        print(f"VERDICT {x['tag']} ({x['limit_ms']:.2f} ms): {'MET' if x['verdict']['ok'] else 'NOT MET'}")
        print(x["verdict"]["text"])
    print(f"\nwrote {out / 'results.json'}, {out / 'headline.md'}, "
          + ", ".join(x["figure"] for x in report["budgets"]) + f" (total {(time.time() - T0) / 60:.1f} min)")
    return report


if __name__ == "__main__":
    try:
        main()
    except NasError as e:
        sys.exit(f"headline.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("headline.py: interrupted; run the same command again to resume")
