"""int8 against fp32 for a trained detector, per runtime: val mAP50-95 through each runtime (`nas.report.deploy`)
and the whole detector's latency, the four files timed side by side (interleaved rounds, one thread).

    taskset -c 1 .venv/bin/python benchmarks/int8_export.py RUN/weights/best.pt DATA.yaml --imgsz 256 --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("data")
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--out", default="runs/int8/bench")
    p.add_argument("--calibration", type=int, default=128, help="training images calibrating int8")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--time-only", action="store_true", help="time the files an earlier run wrote into --out")
    args = p.parse_args()

    from nas.detect.checkpoint import load_detector
    from nas.latency.environment import cpu_id
    from nas.latency.openvino import openvino_runner, openvino_version
    from nas.latency.protocol import Protocol
    from nas.latency.quantize import import_nncf
    from nas.latency.runtime import import_ort, ort_runner
    from nas.report.deploy import Deployed, deploy

    t0 = time.time()
    if args.time_only:
        out = Path(args.out)
        files = [Deployed("onnx", "fp32", out / "model.onnx"), Deployed("onnx", "int8", out / "model.int8.onnx"),
                 Deployed("openvino", "fp32", out / "model.xml"), Deployed("openvino", "int8", out / "model.int8.xml")]
    else:
        files = deploy(load_detector(args.weights), args.imgsz, args.out, ["onnx", "openvino"], data=args.data,
                       int8=True, calibration_images=args.calibration)
        print(json.dumps([d.to_dict() for d in files], indent=1), flush=True)
        print(f"export + checks + 4 val evaluations: {time.time() - t0:.0f} s", flush=True)

    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    runners = {}
    for d in files:
        backend = "onnxruntime-cpu" if d.format == "onnx" else "openvino-cpu"
        protocol = Protocol(backend=backend, threads=1)
        runners[f"{d.format} {d.dtype}"] = (ort_runner if d.format == "onnx" else openvino_runner)(d.path, [x],
                                                                                                  protocol)
    samples: dict[str, list[int]] = {k: [] for k in runners}
    names = list(runners)
    rng = random.Random(0)
    for run in runners.values():
        for _ in range(20):
            run()
    gc.disable()
    clock = time.perf_counter_ns
    for _ in range(args.rounds):
        rng.shuffle(names)
        for name in names:
            runners[name]()  # untimed: the previous file evicted this one's weights
            for _ in range(3):
                start = clock()
                runners[name]()
                samples[name].append(clock() - start)
    gc.enable()
    stats = {k: {"p10_ms": float(np.percentile(v, 10)) / 1e6, "median_ms": float(np.median(v)) / 1e6, "n": len(v)}
             for k, v in samples.items()}
    for fmt in ("onnx", "openvino"):
        for s in ("p10_ms", "median_ms"):
            stats[f"{fmt} int8/fp32 {s[:-3]}"] = stats[f"{fmt} int8"][s] / stats[f"{fmt} fp32"][s]
    print(json.dumps(stats, indent=1))
    print(json.dumps({"cpu_id": cpu_id(), "onnxruntime": import_ort().__version__, "openvino": openvino_version(),
                      "nncf": import_nncf().__version__}))


if __name__ == "__main__":
    main()
