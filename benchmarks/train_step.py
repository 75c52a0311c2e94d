"""Time a Detector's training step on this machine (forward, loss, backward, clip, SGD, EMA: one `train()` batch)
and report ms per step and images/s; used for the CPU fast-path numbers and by train_digits.py for throughput.

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py --batch 8 --imgsz 256
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.arch.detector import Detector
from nas.arch.headconfig import NECKS, HeadConfig
from nas.arch.spec import ArchSpec  # noqa: E402
from nas.arch.zoo import get_arch  # noqa: E402
from nas.detect.device import resolve_channels_last  # noqa: E402
from nas.detect.loss import DetectionLoss  # noqa: E402
from nas.detect.optim import ModelEMA, build_optimizer  # noqa: E402
from nas.detect.trainconfig import TrainConfig  # noqa: E402
from nas.system import retain_heap  # noqa: E402


def synthetic_batches(n: int, batch: int, imgsz: int, nc: int = 10, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """`n` batches of random images with 1-6 random boxes each (DigitsDet's count), as `collate` returns them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        imgs = torch.rand(batch, 3, imgsz, imgsz, generator=g)
        rows = []
        for i in range(batch):
            k = int(torch.randint(1, 7, (1,), generator=g))
            wh = 0.05 + 0.3 * torch.rand(k, 2, generator=g)
            cxy = wh / 2 + (1 - wh) * torch.rand(k, 2, generator=g)
            cls = torch.randint(0, nc, (k, 1), generator=g).float()
            rows.append(torch.cat([torch.full((k, 1), float(i)), cls, cxy, wh], 1))
        out.append((imgs, torch.cat(rows)))
    return out


def measure_throughput(arch: ArchSpec, batches: Iterable[tuple[Tensor, Tensor]], *, nc: int = 10,
                       neck: str = "yolov8", steps: int = 10, warmup: int = 3, channels_last: bool | None = None,
                       heap: bool = True, threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Median ms per training step and images/s over `steps` steps after `warmup` untimed ones, cycling over
    `batches` (already in memory: data loading is not counted). `channels_last` and `heap` (glibc mallopt, which
    stays on for the rest of the process) default to what `train()` does on CPU.

    Also the median process CPU time per step (user + system, all threads): with one thread it is the step's cost
    without the time other processes on the same core take, i.e. the number to compare on a shared machine.
    """
    batches = list(batches)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        retained = retain_heap() if heap else False
        cl = resolve_channels_last(channels_last, torch.device("cpu"))
        fmt = torch.channels_last if cl else torch.contiguous_format
        torch.manual_seed(seed)
        imgsz = batches[0][0].shape[-1]
        model = Detector(arch, HeadConfig(neck=neck, num_classes=nc)).to(memory_format=fmt).train()
        criterion = DetectionLoss(nc, model.strides, model.reg_max)
        cfg = TrainConfig(arch=arch, batch=batches[0][0].shape[0])
        optimizer = build_optimizer(model, cfg, 0.01)
        ema = ModelEMA(model)
        times: list[float] = []
        cpu: list[float] = []  # process CPU time: what the step costs even when other jobs share the core
        faults: list[int] = []
        for i in range(warmup + steps):
            imgs, targets = batches[i % len(batches)]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            preds = model(imgs.to(memory_format=fmt))
            loss, _ = criterion(preds, targets, imgsz)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    finally:
        torch.set_num_threads(old_threads)
    ms = statistics.median(times) * 1e3
    return {"ms_per_step": round(ms, 1), "ms_min": round(min(times) * 1e3, 1),
            "ms_max": round(max(times) * 1e3, 1), "images_per_s": round(batches[0][0].shape[0] / ms * 1e3, 2),
            "cpu_ms_per_step": round(statistics.median(cpu) * 1e3, 1),
            "page_faults_per_step": round(statistics.median(faults)), "steps": steps, "warmup": warmup,
            "batch": int(batches[0][0].shape[0]), "imgsz": int(imgsz), "channels_last": cl, "heap_retained": retained,
            "threads": torch.get_num_threads() if not threads else threads}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="zoo:mobilenet_v4_conv_small", help="zoo:NAME (default %(default)s)")
    p.add_argument("--neck", default="yolov8", choices=NECKS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: what train() does on CPU (on)")
    p.add_argument("--heap", action=argparse.BooleanOptionalAction, default=True,
                   help="retain freed memory with glibc mallopt, as train() does (default on)")
    args = p.parse_args(argv)
    arch = get_arch(args.arch.removeprefix("zoo:"))
    r = measure_throughput(arch, synthetic_batches(2, args.batch, args.imgsz), neck=args.neck, steps=args.steps,
                           warmup=args.warmup, channels_last=args.channels_last, heap=args.heap, threads=args.threads)
    print(json.dumps({"arch": arch.name, "neck": args.neck, **r}))
    return r


if __name__ == "__main__":
    main()
