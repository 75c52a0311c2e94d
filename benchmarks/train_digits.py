"""Acceptance benchmark of issue 6: train detectors on DigitsDet (2,000 train / 500 val images, 256 px, seeded) for a
wall-clock budget each and report mAP50, mAP50-95, epochs, wall time and training throughput (images/s).

Full run (about 90 minutes: three backbones x 30 minutes; do not run it next to latency measurements):

    .venv/bin/python benchmarks/train_digits.py --out runs/benchmarks/train_digits.json

Smoke test (about 3 minutes): --minutes 0.5 --train-images 64 --val-images 32

Budget: TrainConfig.time_limit_s. After every epoch the number of epochs is re-planned from the mean epoch time
(training + validation) so that the LR schedule and the close-mosaic phase fit the budget; training ends after the
epoch that uses it up. The wall time column includes setup and checkpoint writes, so it exceeds the budget a little.
Throughput is measured twice: `step img/s` times training steps on in-memory batches (benchmarks/train_step.py:
forward, loss, backward, SGD, EMA; 3 warm-up steps, then the median of 10), `loop img/s` is the training images
seen per second of the epochs' training phase (data loading and augmentation included, validation excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from train_step import measure_throughput  # noqa: E402

from nas.arch.headconfig import HeadConfig
from nas.arch.zoo import get_arch  # noqa: E402
from nas.detect.data import YoloDataset, collate, load_data_config  # noqa: E402
from nas.detect.digits import ensure_digits  # noqa: E402
from nas.detect.train import train  # noqa: E402
from nas.detect.trainconfig import TrainConfig  # noqa: E402
from nas.errors import ConfigError, NasError  # noqa: E402
from nas.system import cache_dir  # noqa: E402

MODELS = ("zoo:mobilenet_v4_conv_small", "zoo:mobilenet_v3_small_100", "zoo:yolov8n_csp")
MAX_EPOCHS = 300  # only a cap: the time budget decides


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def exact_command() -> str:
    """This invocation as a shell line, with the CPU pinning and thread variables that shape the numbers."""
    prefix = []
    if usable_cpus() < (os.cpu_count() or 1):
        prefix += ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))]
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    if env:
        prefix += ["env", *env]
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    return shlex.join([*prefix, exe, *sys.argv])


def step_batches(data_yaml: Path, imgsz: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two real training batches (mosaic + affine, as epoch 1 sees them) for the step-throughput measurement."""
    ds = YoloDataset(load_data_config(data_yaml), "train", imgsz, augment=True, seed=seed)
    return [collate([ds[(start + i) % len(ds)] for i in range(batch)])[:2] for start in (0, batch)]


def run_model(ref: str, data_yaml: Path, args: argparse.Namespace, project: Path) -> dict[str, Any]:
    arch = get_arch(ref.removeprefix("zoo:"))
    steps = measure_throughput(arch, step_batches(data_yaml, args.imgsz, args.batch, args.seed), neck=args.neck,
                               steps=args.throughput_steps, warmup=3, threads=args.threads, seed=args.seed)
    cfg = TrainConfig(arch=arch, data=str(data_yaml), epochs=MAX_EPOCHS, imgsz=args.imgsz, batch=args.batch,
                      workers=args.workers, threads=args.threads, head=HeadConfig(neck=args.neck), seed=args.seed,
                      retain_heap=True,  # as `nas train` does
                      time_limit_s=args.minutes * 60, project=str(project), name=arch.name, progress=not args.quiet)
    r = train(cfg)
    train_s = sum(h["time"] - h["val_time"] for h in r.history)
    return {
        "model": ref, "map50": r.map50, "map50_95": r.map50_95, "epochs": r.epochs, "best_epoch": r.best_epoch,
        "wall_s": round(r.seconds, 1), "train_s": round(train_s, 1),
        "val_s": round(sum(h["val_time"] for h in r.history), 1),
        "loop_images_per_s": round(args.train_images * r.epochs / train_s, 2) if train_s > 0 else None,
        "step_images_per_s": steps["images_per_s"], "step_ms": steps["ms_per_step"],
        "step_cpu_ms": steps["cpu_ms_per_step"], "run_dir": str(r.run_dir), "weights": str(r.best),
    }


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"DigitsDet {args.train_images} train / {args.val_images} val, {args.imgsz} px, batch {args.batch}, "
            f"{args.minutes:g} min per model, {args.threads} thread(s), neck {args.neck}\n\n"
            "| backbone | mAP50 | mAP50-95 | epochs (best) | wall min | loop img/s | step img/s |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model'].removeprefix('zoo:')} | {r['map50']:.3f} | {r['map50_95']:.3f} | {r['epochs']} "
             f"({r['best_epoch']}) | {r['wall_s'] / 60:.1f} | {r['loop_images_per_s']} | {r['step_images_per_s']} |"
             for r in rows]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per model (default %(default)s)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo:NAME list (default: %(default)s)")
    p.add_argument("--threads", type=int, default=usable_cpus(),
                   help="torch threads (default: the CPUs this process may use, %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/train_digits.json"),
                   help="JSON results; the training runs go to a folder next to it (default %(default)s)")
    p.add_argument("--train-images", type=int, default=2000, dest="train_images")
    p.add_argument("--val-images", type=int, default=500, dest="val_images")
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default %(default)s)")
    p.add_argument("--neck", default="yolov8", choices=("yolov8", "dw"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-steps", type=int, default=10, dest="throughput_steps",
                   help="timed steps of the step-throughput measurement (default %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, dest="data_dir",
                   help="where DigitsDet is generated once (default: the nas cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        raise ConfigError("train_digits.py", "--minutes", f"must be positive, got {args.minutes}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    command = exact_command()

    name = f"digitsdet_{args.train_images}_{args.val_images}_{args.imgsz}_s{args.seed}"
    data_dir = args.data_dir or cache_dir() / name
    data_yaml = ensure_digits(data_dir, args.train_images, args.val_images, imgsz=args.imgsz, seed=args.seed,
                              progress=not args.quiet)
    project = args.out.with_suffix("")  # runs/benchmarks/train_digits/<model>
    t0 = time.time()
    rows = [run_model(m, data_yaml, args, project) for m in models]
    from nas.latency.environment import environment
    from nas.latency.protocol import Protocol

    env = environment(Protocol(threads=args.threads))
    env.pop("protocol")
    report = {"command": command, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": str(data_yaml), "environment": env, "total_s": round(time.time() - t0, 1), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows, args))
    print(f"\ncommand: {command}\njson:    {args.out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except NasError as e:
        sys.exit(f"train_digits.py: error: {e}")
