"""Measure the latency of one nn.Module at one input shape on one backend, under a stated, reproducible protocol.

`measure` times one module; `measure_interleaved` times several side by side (the only way to separate close
models on a machine whose speed drifts); `environment` records what a latency table header needs to be reproducible.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nas.errors import ConfigError, NasError
from nas.heap import retain_heap as _retain_heap

if TYPE_CHECKING:
    import onnxruntime

BACKENDS = ("torch-cpu", "onnxruntime-cpu", "torch-cuda")
DTYPES = ("fp32", "fp16")
STATISTICS = ("p10", "median", "mean", "min")
ONNX_EXPORTERS = ("torchscript", "dynamo")

Shape = Sequence[int]
Shapes = tuple[tuple[int, ...], ...]  # one shape per input of the module
_SOURCE = "latency protocol"


def _check_int(field: str, value: Any, minimum: int, source: str | None = _SOURCE) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(source, field, f"must be an integer >= {minimum}, got {value!r}")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(_SOURCE, field, f"unknown value {value!r}; choose one of: {', '.join(choices)}")


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

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("statistic", self.statistic, STATISTICS)
        _check_choice("onnx_exporter", self.onnx_exporter, ONNX_EXPORTERS)
        _check_int("threads", self.threads, 1)
        _check_int("batch", self.batch, 1)
        _check_int("warmup_runs", self.warmup_runs, 0)
        _check_int("repeats", self.repeats, 1)
        _check_int("max_repeats", self.max_repeats, self.repeats)
        _check_int("onnx_opset", self.onnx_opset, 18 if self.onnx_exporter == "dynamo" else 17)
        _check_int("seed", self.seed, 0)
        if self.pin_cpu is not None:
            _check_int("pin_cpu", self.pin_cpu, 0)
        for name in ("retain_heap", "flush_denormal", "reference"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(_SOURCE, name, f"must be true or false, got {getattr(self, name)!r}")
        for name in ("warmup_s", "min_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(_SOURCE, name, f"must be a number of seconds >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))  # YAML may give an int; keep to_dict stable
        if self.dtype == "fp16" and self.backend != "torch-cuda":
            # fp16 eager convolutions on CPU are slow reference kernels, not what a deployment would run.
            raise ConfigError(_SOURCE, "dtype", f"fp16 is only supported on torch-cuda; use fp32 for {self.backend}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(_SOURCE, unknown[0], f"unknown field; known fields: {', '.join(known)}")
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


# --- ONNX Runtime -----------------------------------------------------------------------------------------------


def _import_ort() -> Any:
    """onnxruntime with its telemetry off. Since 1.2x its Linux wheels upload usage events and keep a device id in
    ~/.cache/Microsoft (seen with 1.32); nas sends nothing anywhere and writes only into its run folder. The switch
    is read once, when onnxruntime initialises, so it is set before the first import (a user's own value wins)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as err:
        raise NasError("backend onnxruntime-cpu needs onnxruntime: pip install onnxruntime") from err
    return onnxruntime


def export_onnx(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path,
                protocol: Protocol) -> Path:
    """Export `module` (in eval mode) with the static input shape(s) of `example` (one tensor, or a tuple for a
    module taking several inputs: inputs input0, input1, ...) to `path`; returns the path.

    The default exporter is TorchScript (dynamo=False), although deprecated, because with torch 2.13 it is
    ~20-50x faster per op (20-200 ms vs 1-3 s; a latency table exports hundreds of ops) and it exports 3-D
    scaled_dot_product_attention, on which the dynamo exporter fails ("only 4D query, key, and value are
    supported"). On a conv-bn-hswish and a matmul/softmax attention both give the same ORT latency (within 1%:
    ORT folds the extra shape ops of the TorchScript graph). The exporter is recorded in the protocol.
    """
    path = Path(path)
    dynamo = protocol.onnx_exporter == "dynamo"
    args = example if isinstance(example, tuple) else (example,)
    names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    kwargs: dict[str, Any] = {"opset_version": protocol.onnx_opset, "input_names": names, "dynamo": dynamo}
    if dynamo:
        kwargs["verbose"] = False  # otherwise it prints a progress line per export step
    try:
        with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")  # torch-internal, dynamo
            torch.onnx.export(module, args, str(path), **kwargs)
    except Exception as err:
        other = "dynamo" if not dynamo else "torchscript"
        raise NasError(
            f"ONNX export of {type(module).__name__} with the {protocol.onnx_exporter} exporter failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"try onnx_exporter={other!r} in the protocol"
        ) from err
    return path


def ort_session(onnx_path: str | Path, protocol: Protocol) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession configured as the protocol says (threads, sequential, all graph optimisations)."""
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = protocol.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: per-op warnings would flood a table build
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


# --- the timing machinery ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own training flag is restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def _pin_cores(protocol: Protocol) -> set[int]:
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(_SOURCE, "pin_cpu", "CPU pinning needs Linux (os.sched_setaffinity); use pin_cpu: null")
    assert protocol.pin_cpu is not None
    wanted = set(range(protocol.pin_cpu, protocol.pin_cpu + protocol.threads))
    available = os.sched_getaffinity(0)
    if not wanted <= available:
        raise ConfigError(
            _SOURCE, "pin_cpu",
            f"cores {sorted(wanted)} are not all available to this process (available: {sorted(available)})",
        )
    return wanted


def _check_backend_available(protocol: Protocol) -> None:
    if protocol.backend == "torch-cuda" and not torch.cuda.is_available():
        raise NasError(
            f"backend torch-cuda requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use torch-cpu or onnxruntime-cpu"
        )
    if protocol.backend == "onnxruntime-cpu":
        _import_ort()


@contextlib.contextmanager
def _timing_env(protocol: Protocol) -> Iterator[None]:
    """Threads, CPU pinning, gc off and inference mode for the duration; everything restored afterwards."""
    cores = _pin_cores(protocol) if protocol.pin_cpu is not None else None
    threads_before = torch.get_num_threads()
    affinity_before = os.sched_getaffinity(0) if cores is not None else None
    gc_was_enabled = gc.isenabled()
    try:
        torch.set_num_threads(protocol.threads)
        if protocol.retain_heap:
            _retain_heap()
        if cores is not None:
            # Affects this thread and threads created later; pools torch already started keep their mask.
            os.sched_setaffinity(0, cores)
        # Young generations only: a full collection costs ~80 ms in a process holding torch, optuna and a few
        # thousand built modules, which dominated table builds; gc is off while timing anyway.
        gc.collect(1)
        gc.disable()  # a collection inside a timed call would be charged to whichever op it hit
        if protocol.flush_denormal:
            torch.set_flush_denormal(True)
        with torch.inference_mode():
            yield
    finally:
        if protocol.flush_denormal:
            torch.set_flush_denormal(False)
        if gc_was_enabled:
            gc.enable()
        if affinity_before is not None:
            os.sched_setaffinity(0, affinity_before)
        torch.set_num_threads(threads_before)


def _on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` itself if already on device/dtype, else a converted copy: measuring never moves the caller's model."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == device.type and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def _make_runner(module: nn.Module, shapes: Shapes, protocol: Protocol, onnx_path: Path) -> Callable[[], Any]:
    """One synchronous inference per call on one input per shape; `module` must already be in eval mode.
    `onnx_path`: where to export."""
    gen = torch.Generator().manual_seed(protocol.seed)
    xs = tuple(torch.randn((protocol.batch, *shape), generator=gen) for shape in shapes)
    if protocol.backend == "onnxruntime-cpu":
        session = ort_session(export_onnx(module, xs, onnx_path, protocol), protocol)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)}
        return lambda: session.run(None, feed)
    if protocol.backend == "torch-cuda":
        dtype = torch.float16 if protocol.dtype == "fp16" else torch.float32
        model = _on(module, torch.device("cuda"), dtype)
        xs = tuple(x.to("cuda", dtype) for x in xs)
        sync = torch.cuda.synchronize

        def run_cuda() -> Any:
            # Kernels are asynchronous: without the sync we would time the launch, not the work. The previous
            # call ended with a sync too, so the queue is empty when the clock starts.
            out = model(*xs)
            sync()
            return out

        return run_cuda
    model = _on(module, torch.device("cpu"), torch.float32)
    return lambda: model(*xs)


def _warm_up(run: Callable[[], Any], protocol: Protocol) -> None:
    clock = time.perf_counter_ns
    deadline = clock() + int(protocol.warmup_s * 1e9)
    done = 0
    while done < protocol.warmup_runs or clock() < deadline:
        run()
        done += 1


def _check_shape(shape: Any, field: str = "input_shape") -> tuple[int, ...]:
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
    ):
        raise ConfigError(None, field, f"must be a non-empty tuple of positive ints such as (C, H, W), got {shape!r}")
    return tuple(shape)


def _check_inputs(shape: Any, field: str = "input_shape") -> Shapes:
    """One shape such as (C, H, W): a module with one input; a sequence of shapes: one input per shape (a detector's
    neck takes three feature maps)."""
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(s, (tuple, list)) for s in shape):
        return tuple(_check_shape(s, f"{field}[{i}]") for i, s in enumerate(shape))
    return (_check_shape(shape, field),)


# --- public entry points ----------------------------------------------------------------------------------------


def measure(module: nn.Module, input_shape: Shape | Sequence[Shape], protocol: Protocol = Protocol()) -> Measurement:
    """Latency of `module` on an input of shape (protocol.batch, *input_shape), e.g. input_shape=(C, H, W); a
    sequence of shapes calls `module(x0, x1, ...)` with one input per shape.

    The module is run in eval mode (its training flags are restored afterwards) under torch.inference_mode;
    torch's thread count, the CPU affinity and the garbage collector are restored even if the module raises.
    """
    shapes = _check_inputs(input_shape)
    _check_backend_available(protocol)
    with tempfile.TemporaryDirectory(prefix="nas-profile-") as tmp, _eval_mode(module):
        run = _make_runner(module, shapes, protocol, Path(tmp) / "model.onnx")
        reference = _reference_runner(protocol, Path(tmp) / "reference.onnx")
        samples: list[int] = []
        ref_samples: list[int] = []
        with _timing_env(protocol):
            _warm_up(run, protocol)
            clock = time.perf_counter_ns
            deadline = clock() + int(protocol.min_time_s * 1e9)
            while len(samples) < protocol.repeats or (clock() < deadline and len(samples) < protocol.max_repeats):
                if reference is not None:
                    reference()  # untimed: whatever ran before leaves the timed reference below unaffected
                    start = clock()
                    reference()
                    ref_samples.append(clock() - start)
                start = clock()
                run()
                samples.append(clock() - start)
    return Measurement.from_samples(samples, ref_samples, protocol.statistic)


def reference_module() -> nn.Module:
    """The fixed reference workload: depthwise 3x3 + pointwise 1x1 + ReLU on 32x64x64 (about 10 M MACs and 2 MB
    of activations: some compute, some memory traffic, enough to push a block's weights out of L2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU())
    return m.eval()


REFERENCE_SHAPE = (32, 64, 64)


def _reference_runner(protocol: Protocol, onnx_path: Path) -> Callable[[], Any] | None:
    """The reference workload on the protocol's own backend: after an ONNX Runtime call a torch reference measured
    2-6x slower than on its own, so only the same runtime tells the machine's speed in that state."""
    if not protocol.reference or protocol.backend == "torch-cuda":
        return None
    return _make_runner(reference_module(), (REFERENCE_SHAPE,), dataclasses.replace(protocol, batch=1), onnx_path)


def reference_speed(protocol: Protocol, repeats: int = 300) -> float | None:
    """Median µs of the reference workload under `protocol`, timed alongside a typical block (an inverted
    bottleneck, 64 ch at 40x40): the nominal a table's entries are normalised to. The reference's own time depends
    on what ran before it (an ONNX Runtime op leaves it 1.5-2x slower than a second reference does), so the
    nominal is taken in the same context as the entries. None when the protocol has no reference."""
    if not protocol.reference or protocol.backend == "torch-cuda":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        typical = nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1, groups=256),
                                nn.ReLU(), nn.Conv2d(256, 64, 1))
    p = dataclasses.replace(protocol, repeats=repeats, min_time_s=0.0)
    return measure(typical, (64, 40, 40), p).reference_us


def measure_interleaved(
    models: Mapping[str, nn.Module],
    input_shape: Shape | Mapping[str, Shape],
    protocol: Protocol = Protocol(),
    rounds: int | None = None,
    runs_per_round: int = 5,
    progress: bool = False,
) -> dict[str, Measurement]:
    """Measure several models side by side: round-robin, a seeded shuffle of the order each round.

    Each round gives every model one untimed call (steady state, as in `measure`: the previous model evicted its
    weights from cache) then `runs_per_round` timed calls. Drift over minutes hits all models alike, so their
    ratios are far more stable than those of separate `measure` calls. With `rounds=None`, rounds continue until
    each model has >= protocol.repeats runs and the total time reaches protocol.min_time_s per model.
    `input_shape` is one shape for all models or a dict name -> shape.
    """
    if not models:
        raise ConfigError(None, "models", "give at least one model to measure")
    _check_int("runs_per_round", runs_per_round, 1, source=None)
    if rounds is not None:
        _check_int("rounds", rounds, 1, source=None)
    if isinstance(input_shape, Mapping):
        missing = sorted(set(models) - set(input_shape))
        if missing:
            raise ConfigError(None, "input_shape", f"no input shape for model(s) {', '.join(missing)}")
        shapes = {name: _check_inputs(input_shape[name], f"input_shape[{name!r}]") for name in models}
    else:
        shapes = {name: _check_inputs(input_shape) for name in models}
    _check_backend_available(protocol)

    names = list(models)
    rng = random.Random(protocol.seed)
    min_rounds = rounds if rounds is not None else math.ceil(protocol.repeats / runs_per_round)
    max_rounds = rounds if rounds is not None else max(min_rounds, protocol.max_repeats // runs_per_round)
    samples: dict[str, list[int]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nas-profile-")))
        stack.enter_context(_eval_mode(*models.values()))
        runners = {n: _make_runner(models[n], shapes[n], protocol, tmp / f"{i}.onnx") for i, n in enumerate(names)}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=rounds, desc="interleaved rounds", unit="round"))
        stack.enter_context(_timing_env(protocol))
        for name in names:
            _warm_up(runners[name], protocol)
        clock = time.perf_counter_ns
        deadline = clock() + int(protocol.min_time_s * len(names) * 1e9)
        done = 0
        while done < min_rounds or (clock() < deadline and done < max_rounds):
            rng.shuffle(names)
            for name in names:
                run, out = runners[name], samples[name]
                run()
                for _ in range(runs_per_round):
                    start = clock()
                    run()
                    out.append(clock() - start)
            done += 1
            if bar is not None:
                bar.update()
    return {name: Measurement.from_samples(samples[name]) for name in models}


def _cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in reversed(info)}  # the first core's value wins


def _cpu_model() -> str:
    fields = _cpuinfo()
    for key in ("model name", "Hardware", "Model", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def _cpu_id() -> str | None:
    """The CPU generation, where the model name does not tell it: a cloud guest's "AMD EPYC" was a Zen 4 (family
    25) on one host and a Zen 5 (family 26), 1.6-1.9x faster on these detectors, on the next."""
    f = _cpuinfo()
    if f.get("vendor_id") and f.get("cpu family"):
        return f"{f['vendor_id']} family {f['cpu family']} model {f.get('model', '?')}"
    if f.get("CPU implementer"):  # Arm
        return f"arm implementer {f['CPU implementer']} part {f.get('CPU part', '?')}"
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def environment(protocol: Protocol) -> dict[str, Any]:
    """What makes a latency number reproducible: hardware, software versions, date, and the protocol itself."""
    env: dict[str, Any] = {
        "cpu": _cpu_model(),
        **({"cpu_id": cid} if (cid := _cpu_id()) else {}),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA torch dispatches kernels to
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libc": " ".join(platform.libc_ver()).strip() or "unknown",
        "torch": torch.__version__,
    }
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        env["cpu_governor"] = governor
    if protocol.backend == "onnxruntime-cpu":
        import onnx

        env["onnxruntime"] = _import_ort().__version__
        env["onnx"] = onnx.__version__
        if protocol.onnx_exporter == "dynamo":
            import onnxscript

            env["onnxscript"] = onnxscript.__version__
    if protocol.backend == "torch-cuda":
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["cudnn"] = torch.backends.cudnn.version()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["protocol"] = protocol.to_dict()
    return env
