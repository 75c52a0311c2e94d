"""Proxy quality: how well each zero-cost proxy (and the #params / MACs baselines) ranks architectures of a search
space by the mAP they reach after a short, identical training on DigitsDet (Kendall τ, scipy.stats.kendalltau).

Every architecture is `space.random(seed)` for seed in 0..N-1, trained with the same data, seed and schedule (dw
neck and warmup capped at a third of the run as in the short-training evaluator, no mosaic in a run this short;
AdamW, which learns much faster than SGD in a few epochs; mAP of the EMA model after the last epoch). Proxies are
computed as the search's proxy evaluator calls them (160 px, batch 8, seed 0). One CSV row per architecture is
appended as soon as it is done, so a killed run is resumed by running the same command again (only the
architecture being trained at the time is redone). Pin it to one core:

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proxy_quality.py --n 30
    .venv/bin/python benchmarks/proxy_quality.py --report-only     # τ table from the CSV so far
    .venv/bin/python benchmarks/proxy_quality.py --headline runs/headline/results.json --out runs/pq_headline

`--headline` scores the models of a finished headline benchmark instead (searched and hand-designed, trained
longer and at a higher resolution there) against their median mAP over seeds: a second, independent target.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.arch.cost import arch_cost  # noqa: E402
from nas.arch.spec import ArchSpec, loads_arch, save_arch  # noqa: E402
from nas.detect.short import ShortSchedule, short_train
from nas.latency.table import LatencyTable
from nas.search.experiment import EvaluatorConfig  # noqa: E402
from nas.search.proxies import PROXIES, ProxyError, score  # noqa: E402
from nas.space import load_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("map50_95", "map50")
# Not accuracy proxies, but worth a row: does the budget axis itself predict mAP? (and, for --headline, does the
# short training schedule rank the headline's long one?)
EXTRA = ("predicted_ms", "short_train")


def columns() -> list[str]:
    return ["seed", "arch", "resolution", "predicted_ms", "params_n", "macs_n", *PROXIES,
            *[f"{p}_s" for p in PROXIES], "map50", "map50_95", "best_epoch", "train_s", "train_cpu_s",
            "short_train"]


def done_seeds(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    with path.open() as f:
        return {int(r["seed"]) for r in csv.DictReader(f)}


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One line per finished arch, flushed at once: the CSV is the checkpoint."""
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns())
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


def proxy_scores(arch: ArchSpec, resolution: int, batch: int, seed: int) -> dict[str, float]:
    """Every proxy exactly as the search's proxy evaluator calls it; a proxy that fails on an arch gives NaN
    (it then drops out of that proxy's τ, and the count shows it)."""
    row: dict[str, float] = {}
    for name in PROXIES:
        t0 = time.process_time()  # CPU time: the core is shared, wall time would measure the neighbours
        try:
            row[name] = score(arch, name, resolution=resolution, batch=batch, seed=seed)
        except ProxyError as e:
            print(f"  {name}: {e}", file=sys.stderr)
            row[name] = math.nan
        row[f"{name}_s"] = round(time.process_time() - t0, 3)
    return row


def schedule(args: argparse.Namespace) -> ShortSchedule:
    return ShortSchedule(epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, optimizer=args.optimizer,
                         lr0=args.lr0, neck=args.neck, seeds=(args.train_seed,), train_images=args.train_images,
                         val_images=args.val_images, data_seed=args.data_seed)


def train_arch(arch: ArchSpec, data: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """nas.rerank's short training (the schedule the framework reranks candidates with) into out/train."""
    r = short_train(arch, schedule(args), data, out / "train" / arch.name, args.train_seed)
    r.pop("weights", None)  # not a CSV column
    return {**r, "best_epoch": args.epochs}  # evaluated once, after the last epoch


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "proxy_quality.csv"
    space = load_space(args.space)
    table = LatencyTable.load(args.table)
    data = schedule(args).dataset(out)
    (out / "settings.txt").write_text("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())) + "\n")
    done = done_seeds(csv_path)
    todo = [s for s in range(args.first, args.first + args.n) if s not in done]
    if args.limit is not None:
        todo = todo[:args.limit]
    print(f"{len(done)} archs in {csv_path}; {len(todo)} to go", file=sys.stderr)
    for i, seed in enumerate(todo, 1):
        arch = space.random(seed, name=f"pq-{seed}")
        save_arch(arch, out / "archs" / f"{arch.name}.yaml")
        cost = arch_cost(arch, args.imgsz)
        t0 = time.process_time()
        row: dict[str, Any] = {"seed": seed, "arch": arch.name, "resolution": arch.resolution,
                               "predicted_ms": round(table.predict(arch).total_ms, 4),
                               "params_n": cost.params, "macs_n": cost.macs}
        row |= proxy_scores(arch, args.proxy_resolution, args.proxy_batch, args.proxy_seed)
        t_proxy = time.process_time() - t0
        row |= train_arch(arch, data, out, args)
        append_row(csv_path, row)
        print(f"[{i}/{len(todo)}] {arch.name}: {row['predicted_ms']:.2f} ms, mAP50-95 {row['map50_95']:.4f}, "
              f"mAP50 {row['map50']:.4f}, proxies {t_proxy:.1f} CPU s, train {row['train_s']:.0f} s wall / "
              f"{row['train_cpu_s']:.0f} s CPU", file=sys.stderr,
              flush=True)
    report(csv_path, out / "proxy_quality.md")


def from_headline(args: argparse.Namespace) -> None:
    """Every model of a headline results.json, proxies as the search computes them, target its median mAP."""
    results = json.loads(Path(args.headline).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "proxy_quality.csv"
    csv_path.unlink(missing_ok=True)
    data = schedule(args).dataset(out)
    for i, (label, r) in enumerate(results["models"].items()):
        arch = loads_arch(r["arch"], f"{args.headline}: {label}")
        row: dict[str, Any] = {"seed": i, "arch": label, "resolution": arch.resolution,
                               "predicted_ms": math.nan if r["predicted_ms"] is None else r["predicted_ms"],
                               "params_n": r["params"], "macs_n": r["macs"]}
        row |= proxy_scores(arch, args.proxy_resolution, args.proxy_batch, args.proxy_seed)
        short = train_arch(arch, data, out, args)  # the short schedule as a ranker of the headline's long one
        row |= {"map50": r["map50"]["median"], "map50_95": r["map50_95"]["median"], "best_epoch": "",
                "train_s": short["train_s"], "train_cpu_s": short["train_cpu_s"], "short_train": short["map50_95"]}
        append_row(csv_path, row)
        print(f"[{i + 1}/{len(results['models'])}] {label}: mAP50-95 {row['map50_95']:.4f}, after the short "
              f"training {short['map50_95']:.4f}", file=sys.stderr)
    report(csv_path, out / "proxy_quality.md")


def report(csv_path: Path, md_path: Path) -> str:
    """Kendall τ (and its p-value) of every proxy with each target, best first by τ(mAP50-95)."""
    from scipy.stats import kendalltau

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    names = [n for n in (*PROXIES, *EXTRA) if rows and rows[0].get(n) not in (None, "")]
    stats = []
    for name in names:
        entry: dict[str, Any] = {"proxy": name}
        for target in TARGETS:
            pairs = [(float(r[name]), float(r[target])) for r in rows
                     if math.isfinite(float(r[name])) and math.isfinite(float(r[target]))]
            tau, p = kendalltau([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) > 2 else (math.nan,) * 2
            entry[target], entry[f"{target}_p"], entry["n"] = float(tau), float(p), len(pairs)
        cost = [float(r[f"{name}_s"]) for r in rows if f"{name}_s" in r]
        entry["median_s"] = sorted(cost)[len(cost) // 2] if cost else math.nan
        stats.append(entry)
    stats.sort(key=lambda e: -e["map50_95"] if math.isfinite(e["map50_95"]) else math.inf)
    m = [float(r["map50_95"]) for r in rows]
    lines = [f"{len(rows)} architectures; trained mAP50-95 from {min(m):.4f} to {max(m):.4f} "
             f"(median {sorted(m)[len(m) // 2]:.4f})" if rows else "no rows yet", "",
             "| proxy | τ vs mAP50-95 | p | τ vs mAP50 | p | n | median CPU s / arch |",
             "|---|---|---|---|---|---|---|"]
    for e in stats:
        baseline = {"params": " (baseline)", "macs": " (baseline)"}.get(e["proxy"], " (not a proxy)"
                                                                        if e["proxy"] in EXTRA else "")
        cost = f"{e['median_s']:.2f}" if math.isfinite(e["median_s"]) else "–"
        lines.append(f"| {e['proxy']}{baseline} | {e['map50_95']:+.3f} | {e['map50_95_p']:.3g} | "
                     f"{e['map50']:+.3f} | {e['map50_p']:.3g} | {e['n']} | {cost} |")
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces/uib_yolo.yaml"))
    ap.add_argument("--table", default=str(ROOT / "latency_tables/cpu_torch-cpu_fp32_t1.csv"))
    ap.add_argument("--out", default=str(ROOT / "runs/bench_proxy_quality"))
    ap.add_argument("--n", type=int, default=30, help="architectures: space.random(seed), seed in first..first+n-1")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--limit", type=int, help="train at most this many new archs in this invocation")
    # The short training: nas.rerank.ShortSchedule's defaults. Measured with one arch on one thread: 6 epochs of
    # 600 images at 128 px cost ~3 CPU-minutes; AdamW reached mAP50-95 0.067 where SGD at 160 px was still at 0
    # after an epoch. The defaults fit 30 archs in ~50 CPU-min.
    d = ShortSchedule()
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--imgsz", type=int, default=d.imgsz)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--neck", default=d.neck)
    ap.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    ap.add_argument("--lr0", type=float, help="initial LR (default: the trainer's, 0.01 SGD / 0.001 AdamW)")
    ap.add_argument("--train-images", type=int, default=d.train_images)
    ap.add_argument("--val-images", type=int, default=d.val_images)
    ap.add_argument("--data-seed", type=int, default=d.data_seed)
    ap.add_argument("--train-seed", type=int, default=d.seeds[0])
    # the proxy evaluator's own defaults, so τ describes what the search actually ranks by
    ap.add_argument("--proxy-resolution", type=int, default=EvaluatorConfig.resolution)
    ap.add_argument("--proxy-batch", type=int, default=EvaluatorConfig.batch)
    ap.add_argument("--proxy-seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="only recompute the τ table from the CSV")
    ap.add_argument("--headline", metavar="RESULTS_JSON",
                    help="score the models of a headline benchmark's results.json instead of training archs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.report_only:
        out = Path(args.out)
        report(out / "proxy_quality.csv", out / "proxy_quality.md")
        return
    if args.headline:
        from_headline(args)
        return
    run(args)


if __name__ == "__main__":
    main()
