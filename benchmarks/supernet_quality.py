"""Supernet quality: train the weight-sharing supernet of a space on DigitsDet, then rank architectures by their
inherited val mAP (BatchNorm recalibrated, as the search's `supernet` evaluator scores them) against the mAP they
reached in their own training (the per-architecture CSV of benchmarks/proxy_quality.py: `space.random(seed)`,
trained alike), beside MACs on the same architectures (Kendall τ, scipy.stats.kendalltau).

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proxy_quality.py --n 12 --out runs/bench_sn_pq
    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/supernet_quality.py --pq runs/bench_sn_pq/proxy_quality.csv \
        --epochs 30 --time-limit 1500

The supernet sees the same DigitsDet as proxy_quality's trainings (seed 0, 500 train / 150 val images at 128 px).
Running it again resumes an unfinished supernet training, then scores again.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.detect.inherit import inherited_map, load_supernet
from nas.detect.supernet import train_supernet
from nas.search.experiment import load_experiment
from nas.search.inherited import supernet_config, supernet_run
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pq", required=True, help="proxy_quality.csv with seed, map50_95, map50, macs_n per arch")
    ap.add_argument("--space", default=str(ROOT / "search_spaces/uib_yolo.yaml"))
    ap.add_argument("--table", default=str(ROOT / "latency_tables/cpu_torch-cpu_fp32_t1.csv"))
    ap.add_argument("--out", default=str(ROOT / "runs/bench_supernet"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--time-limit", type=float, default=None, help="supernet training budget in seconds")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=500)
    ap.add_argument("--val-images", type=int, default=150)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "supernet_quality", "space": str(Path(args.space).resolve()),
        "table": str(Path(args.table).resolve()), "budget_ms": 1000.0, "output": str(out.resolve()),
        "evaluator": {"kind": "supernet", "epochs": args.epochs, "imgsz": args.imgsz, "train_batch": args.batch,
                      "train_images": args.train_images, "val_images": args.val_images,
                      "calib_images": args.calib_images}}, sort_keys=False))
    exp = load_experiment(exp_path)
    cfg = supernet_config(exp, time_limit_s=args.time_limit, threads=args.threads, workers=0)
    t0 = time.time()
    try:
        r = train_supernet(exp.space, cfg, calib_images=args.calib_images)
        print(f"supernet: {r.epochs} epochs in {r.seconds / 60:.1f} min (this invocation); largest mAP50-95 "
              f"{r.map50_95:.4f}", flush=True)
    except Exception as e:  # an already finished run: score it as it is
        if "already finished" not in str(e):
            raise
        print(f"supernet: {e}", flush=True)
    train_min = (time.time() - t0) / 60

    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    sn = load_supernet(supernet_run(exp))
    with open(args.pq) as f:
        target = {int(row["seed"]): row for row in csv.DictReader(f)}
    rows = []
    for seed in sorted(target):
        arch = space.random(seed)
        c0 = time.process_time()
        m = inherited_map(sn, arch, args.calib_images)
        rows.append({"seed": seed, "inherited_map50_95": m["map50_95"], "inherited_map50": m["map50"],
                     "eval_s": m["eval_s"], "eval_cpu_s": round(time.process_time() - c0, 2),
                     "trained_map50_95": float(target[seed]["map50_95"]),
                     "trained_map50": float(target[seed]["map50"]), "macs": float(target[seed]["macs_n"])})
        print(json.dumps(rows[-1]), flush=True)
    with open(out / "supernet_quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    y = [r["trained_map50_95"] for r in rows]
    for name in ("inherited_map50_95", "macs"):
        tau, p = kendalltau([r[name] for r in rows], y)
        print(f"tau({name}, trained mAP50-95) = {tau:+.3f} (p {p:.3f}, n {len(rows)})")
    wall, cpu = (sorted(r[k] for r in rows) for k in ("eval_s", "eval_cpu_s"))
    print(f"supernet epochs {sn.epoch}; training wall {train_min:.1f} min in this invocation; per candidate: "
          f"median {wall[len(wall) // 2]:.2f} s wall, {cpu[len(cpu) // 2]:.2f} s CPU")


if __name__ == "__main__":
    main()
