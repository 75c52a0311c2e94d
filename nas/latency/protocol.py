"""How one latency number is measured (`Protocol`, stored in a table's header) and what a measurement holds
(`Measurement`: statistics of individually timed calls)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nas.errors import ConfigError, NasError

BACKENDS = ("torch-cpu", "onnxruntime-cpu", "torch-cuda", "openvino-cpu", "litert-cpu")


ONNX_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")  # runtimes that run the one ONNX export of the measured module


DTYPES = ("fp32", "fp16", "int8")  # int8: the ONNX export statically quantized (nas.latency.quantize)


STATISTICS = ("p10", "median", "mean", "min")


ONNX_EXPORTERS = ("torchscript", "dynamo")


Shape = Sequence[int]


Shapes = tuple[tuple[int, ...], ...]  # one shape per input of the module


PROTOCOL_SOURCE = "latency protocol"


def check_int(field: str, value: Any, minimum: int, source: str | None = PROTOCOL_SOURCE) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(source, field, f"must be an integer >= {minimum}, got {value!r}")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(PROTOCOL_SOURCE, field, f"unknown value {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class Protocol:
    """How one latency number is measured. Stored in a latency table's header (`to_dict`) so it can be repeated.

    Warm-up runs until both `warmup_runs` calls and `warmup_s` seconds are done; timing then runs until both
    `repeats` calls and `min_time_s` seconds are done (capped at `max_repeats`). Each call is timed on its own
    with time.perf_counter_ns and the garbage collector off. `pin_cpu` pins the process to cores
    pin_cpu .. pin_cpu + threads - 1 for the duration. `seed` fixes the input tensor and the interleaving order.
    `retain_heap` (glibc only) stops malloc from handing freed memory back to the OS, process-wide and for good:
    otherwise every call page-faults its big tensors back in, and which calls do depends on allocation history
    (a 3x3 depthwise conv, 64 ch at 80x80, torch-cpu: 2.5-3.7 ms with glibc defaults, 0.24 ms retained).
    `statistic` is what a latency is: the 10th percentile by default. Noise on a shared machine only ever adds time,
    so a low quantile is the most repeatable figure (on 80 sampled backbones its sum over blocks tracked the
    end-to-end figure with Kendall tau 0.94-0.95, the median's 0.91-0.94), without the min's dependence on one
    lucky run.
    `reference` (CPU backends) times a fixed reference workload (`reference_module`) before every timed call, after
    an untimed call of it so that its time does not depend on what ran before (after a whole network it ran 15%
    slower than after one block). The same statistic of its times, stored with the result, tells how fast the
    machine was during that measurement, so numbers taken minutes apart on a machine whose speed drifts 10-20% can
    be put on one scale (`Measurement.normalised`). It also evicts the caches between calls the way the
    neighbouring blocks of a network do.
    `flush_denormal` treats denormal floats as zero while timing: activations of an untrained network decay
    towards denormals layer by layer, and x86 handles those up to 10x slower (a sampled backbone measured 25 ms
    end to end against 15.6 ms for the sum of its blocks; 15.3-16.3 ms with denormals flushed). Trained networks
    and deployment runtimes don't pay that, so the table measures without it.
    """

    backend: str = "torch-cpu"
    threads: int = 1
    batch: int = 1
    dtype: str = "fp32"
    warmup_runs: int = 10
    warmup_s: float = 0.1
    repeats: int = 50
    min_time_s: float = 0.2
    max_repeats: int = 100_000
    statistic: str = "p10"
    pin_cpu: int | None = None
    retain_heap: bool = True
    flush_denormal: bool = True
    onnx_exporter: str = "torchscript"
    onnx_opset: int = 18
    seed: int = 0
    reference: bool = True
    calibration: str | None = None  # int8: folder of images calibrating image inputs (else seeded normal noise)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("statistic", self.statistic, STATISTICS)
        _check_choice("onnx_exporter", self.onnx_exporter, ONNX_EXPORTERS)
        check_int("threads", self.threads, 1)
        check_int("batch", self.batch, 1)
        check_int("warmup_runs", self.warmup_runs, 0)
        check_int("repeats", self.repeats, 1)
        check_int("max_repeats", self.max_repeats, self.repeats)
        check_int("onnx_opset", self.onnx_opset, 18 if self.onnx_exporter == "dynamo" else 17)
        check_int("seed", self.seed, 0)
        if self.pin_cpu is not None:
            check_int("pin_cpu", self.pin_cpu, 0)
        for name in ("retain_heap", "flush_denormal", "reference"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(PROTOCOL_SOURCE, name, f"must be true or false, got {getattr(self, name)!r}")
        for name in ("warmup_s", "min_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(PROTOCOL_SOURCE, name, f"must be a number of seconds >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))  # YAML may give an int; keep to_dict stable
        if self.dtype == "fp16" and self.backend != "torch-cuda":
            # fp16 eager convolutions on CPU are slow reference kernels, not what a deployment would run.
            raise ConfigError(PROTOCOL_SOURCE, "dtype", f"fp16 is only supported on torch-cuda; use fp32 for {self.backend}")
        if self.dtype == "int8" and self.backend not in ONNX_BACKENDS:
            raise ConfigError(PROTOCOL_SOURCE, "dtype", f"int8 is measured on a statically quantized ONNX export: use "
                                                        f"{' or '.join(ONNX_BACKENDS)}, not {self.backend}")
        if self.calibration is not None and (self.dtype != "int8" or not isinstance(self.calibration, str)):
            raise ConfigError(PROTOCOL_SOURCE, "calibration", f"an image folder for int8 only, got "
                                                              f"{self.calibration!r} with dtype {self.dtype}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["calibration"] is None:  # fp32 headers stay as they were
            del d["calibration"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(PROTOCOL_SOURCE, unknown[0], f"unknown field; known fields: {', '.join(known)}")
        return cls(**data)

    def describe(self) -> str:
        """One line for a table header or a log, e.g. 'onnxruntime-cpu fp32 batch 1, 1 thread, ...'."""
        parts = [
            f"{self.backend} {self.dtype} batch {self.batch}, {self.threads} thread{'s' * (self.threads > 1)}",
            f"warm-up >= {self.warmup_runs} runs and >= {self.warmup_s:g} s",
            f"{self.statistic} of >= {self.repeats} runs and >= {self.min_time_s:g} s (at most {self.max_repeats})",
            "not pinned" if self.pin_cpu is None else f"pinned to cpu {self.pin_cpu}" + (
                f"-{self.pin_cpu + self.threads - 1}" if self.threads > 1 else ""
            ),
            "heap retained" if self.retain_heap else "malloc defaults",
            "denormals flushed" if self.flush_denormal else "denormals kept",
        ]
        if self.reference and self.backend != "torch-cuda":
            parts.append("reference workload interleaved")
        if self.backend == "onnxruntime-cpu":
            parts.append(f"ONNX opset {self.onnx_opset} via the {self.onnx_exporter} exporter, ORT_ENABLE_ALL")
        if self.backend == "openvino-cpu":
            parts.append(f"ONNX opset {self.onnx_opset} via the {self.onnx_exporter} exporter, OpenVINO CPU with the "
                         f"LATENCY hint, 1 stream, f32 inference precision, NHWC at the model's ends")
        if self.backend == "litert-cpu":
            parts.append("converted by litert-torch, NHWC at the model's ends; LiteRT interpreter with XNNPACK")
        if self.dtype == "int8":
            how = "QDQ via onnxruntime.quantization" if self.backend == "onnxruntime-cpu" else "NNCF"
            parts.append(f"int8 static quantization ({how}, per-channel weights) calibrated on "
                         f"{'images from ' + self.calibration if self.calibration else 'normal noise'}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Measurement:
    """Statistics of n individually timed calls, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    min_us: float
    n: int
    reference_us: float | None = None   # the reference workload timed alongside (Protocol.reference)

    @classmethod
    def from_samples(cls, samples_ns: Sequence[int], reference_ns: Sequence[int] = (),
                     statistic: str = "median") -> Measurement:
        """`statistic` (the protocol's) summarises the reference times: a p10 latency is put on the scale of the
        reference's p10 (normalising p10s by the reference's median under-corrected: slope 0.4-0.5, not 1)."""
        if not samples_ns:
            raise NasError("no timed runs to summarise")
        us = np.asarray(samples_ns, dtype=np.float64) / 1e3
        p10, median, p90 = np.percentile(us, [10, 50, 90])
        ref = None
        if len(reference_ns):
            ref = _summary(np.asarray(reference_ns, dtype=np.float64) / 1e3, statistic)
        return cls(float(median), float(p10), float(p90), float(us.mean()), float(us.min()), len(us), ref)

    def normalised(self, nominal_reference_us: float | None) -> Measurement:
        """This measurement on the scale of a machine whose reference workload takes `nominal_reference_us`:
        every statistic times nominal / reference timed alongside. Unchanged without a reference.

        Alongside, not smoothed: the machine's speed changes within seconds when a neighbour loads the shared
        cache and memory bus; on 40 architectures a rolling median of the last 25 references left 47% of
        predictions within ±10%, the reference of each measurement 80%."""
        if not nominal_reference_us or not self.reference_us:
            return self
        f = nominal_reference_us / self.reference_us
        return dataclasses.replace(self, median_us=self.median_us * f, p10_us=self.p10_us * f,
                                   p90_us=self.p90_us * f, mean_us=self.mean_us * f, min_us=self.min_us * f,
                                   reference_us=nominal_reference_us)

    def value_us(self, statistic: str) -> float:
        """The number a protocol's `statistic` selects."""
        _check_choice("statistic", statistic, STATISTICS)
        return getattr(self, f"{statistic}_us")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(**data)


def _summary(values: np.ndarray, statistic: str) -> float:
    _check_choice("statistic", statistic, STATISTICS)
    if statistic == "p10":
        return float(np.percentile(values, 10))
    return float(getattr(np, statistic)(values))
