"""What one litert-cpu table entry costs: seeded ops of a search space, each converted by litert-torch and timed by
`measure` under `nas lut build`'s default protocol, with wall and CPU seconds of both parts. The CPU seconds are
what a quiet core would take; on a shared machine the wall time is larger by the other processes' share.

    taskset -c 1 python benchmarks/litert_op_cost.py search_spaces/uib_yolo.yaml --n 30
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nas.arch.blocks import build_block
from nas.latency.litert import convert_tflite, import_converter
from nas.latency.profile import measure
from nas.latency.protocol import Protocol
from nas.space import load_space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", type=Path)
    ap.add_argument("--n", type=int, default=30, help="ops to sample (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import_converter()  # its import (~5 s) is paid once per build, not per op
    ops = list(load_space(args.space).ops())
    sample = random.Random(args.seed).sample(ops, args.n)
    # `nas lut build`'s defaults (commands/lut.py), reference workload off: it is converted once and then reused
    protocol = Protocol(backend="litert-cpu", repeats=20, min_time_s=0.04, warmup_runs=3, warmup_s=0.01,
                        reference=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (block, shape) in enumerate(sample):
            module = build_block(block, shape[0]).eval()
            x = torch.randn(1, *shape)
            w0, c0 = time.perf_counter(), time.process_time()
            convert_tflite(module, x, Path(tmp) / f"{i}.tflite")
            w1, c1 = time.perf_counter(), time.process_time()
            m = measure(module, shape, protocol)  # converts again from the in-process memo, then times
            w2, c2 = time.perf_counter(), time.process_time()
            rows.append((w1 - w0, c1 - c0, w2 - w1, c2 - c1, m.p10_us))
            print(f"{block.op:9s} in={'x'.join(map(str, shape)):12s} convert {w1 - w0:5.2f} s wall {c1 - c0:5.2f} s "
                  f"cpu; measure {w2 - w1:5.2f} s wall {c2 - c1:5.2f} s cpu; p10 {m.p10_us:8.1f} us", flush=True)
    n_space = len(ops)
    conv_cpu = statistics.mean(r[1] for r in rows)
    meas_cpu = statistics.mean(r[3] for r in rows)
    total_cpu = conv_cpu + meas_cpu
    print(f"{args.n} ops: convert {statistics.mean(r[0] for r in rows):.2f} s wall / {conv_cpu:.2f} s cpu per op, "
          f"measure {statistics.mean(r[2] for r in rows):.2f} s wall / {meas_cpu:.2f} s cpu per op")
    print(f"whole space: {n_space} ops x {total_cpu:.2f} s cpu = {n_space * total_cpu / 3600:.1f} h of one quiet core")


if __name__ == "__main__":
    main()
