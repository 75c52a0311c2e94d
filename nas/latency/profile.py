"""Measure the latency of one nn.Module at one input shape on one backend, under a stated, reproducible protocol.

`measure` times one module; `measure_interleaved` times several side by side (the only way to separate close
models on a machine whose speed drifts); `environment` records what a latency table header needs to be reproducible.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.arch.backbone import build_backbone
from nas.arch.detector import Detector, NeckHead
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.errors import ConfigError, NasError
from nas.latency.litert import check_litert_cpu, convert_tflite, litert_runner
from nas.latency.onnx import eval_mode, export_onnx
from nas.latency.openvino import check_openvino_cpu, openvino_runner
from nas.latency.protocol import ONNX_BACKENDS, Measurement, Protocol, Shape, Shapes, check_int
from nas.latency.quantize import calibration_inputs, quantize_model
from nas.latency.runtime import import_ort, ort_runner
from nas.latency.timing import process_env, time_calls, time_interleaved

# --- the timing machinery ---------------------------------------------------------------------------------------


def _check_backend_available(protocol: Protocol) -> None:
    if protocol.backend == "torch-cuda" and not torch.cuda.is_available():
        raise NasError(
            f"backend torch-cuda requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use torch-cpu or onnxruntime-cpu"
        )
    if protocol.backend == "onnxruntime-cpu":
        import_ort()
    if protocol.backend == "openvino-cpu":
        check_openvino_cpu()
    if protocol.backend == "litert-cpu":
        check_litert_cpu()


@contextlib.contextmanager
def _timing_env(protocol: Protocol) -> Iterator[None]:
    """Threads, CPU pinning, gc off and inference mode for the duration; everything restored afterwards."""
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(protocol.threads)
        with process_env(protocol):
            if protocol.flush_denormal:
                torch.set_flush_denormal(True)
            try:
                with torch.inference_mode():
                    yield
            finally:
                if protocol.flush_denormal:
                    torch.set_flush_denormal(False)
    finally:
        torch.set_num_threads(threads_before)


def _on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` itself if already on device/dtype, else a converted copy: measuring never moves the caller's model."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == device.type and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def _ort_runner(path: Path, xs: tuple[torch.Tensor, ...], protocol: Protocol) -> Callable[[], Any]:
    return ort_runner(path, [x.numpy() for x in xs], protocol)


def _openvino_runner(path: Path, xs: tuple[torch.Tensor, ...], protocol: Protocol) -> Callable[[], Any]:
    return openvino_runner(path, [x.numpy() for x in xs], protocol)


# One runner per runtime of the ONNX export (protocol.ONNX_BACKENDS): another runtime is one more entry.
_ONNX_RUNNERS: Mapping[str, Callable[[Path, tuple[torch.Tensor, ...], Protocol], Callable[[], Any]]] = {
    "onnxruntime-cpu": _ort_runner,
    "openvino-cpu": _openvino_runner,
}


def _make_runner(module: nn.Module, shapes: Shapes, protocol: Protocol, onnx_path: Path) -> Callable[[], Any]:
    """One synchronous inference per call on one input per shape; `module` must already be in eval mode.
    `onnx_path`: where to export."""
    gen = torch.Generator().manual_seed(protocol.seed)
    xs = tuple(torch.randn((protocol.batch, *shape), generator=gen) for shape in shapes)
    if protocol.backend in ONNX_BACKENDS:
        path = export_onnx(module, xs, onnx_path, opset=protocol.onnx_opset, exporter=protocol.onnx_exporter)
        if protocol.dtype == "int8":
            samples = calibration_inputs(shapes, protocol.batch, protocol.seed, protocol.calibration)
            path = quantize_model(protocol.backend, path, samples, decodes=isinstance(module, (Detector, NeckHead)))
        return _ONNX_RUNNERS[protocol.backend](path, xs, protocol)
    if protocol.backend == "litert-cpu":  # converted from the module itself, not from the ONNX export
        path = convert_tflite(module, xs, onnx_path.with_suffix(".tflite"))
        return litert_runner(path, [x.numpy() for x in xs], protocol)
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
    with tempfile.TemporaryDirectory(prefix="nas-profile-") as tmp, eval_mode(module):
        run = _make_runner(module, shapes, protocol, Path(tmp) / "model.onnx")
        reference = _reference_runner(protocol, Path(tmp) / "reference.onnx")
        with _timing_env(protocol):
            return time_calls(run, protocol, reference)


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
    p = dataclasses.replace(protocol, repeats=repeats, min_time_s=0.0)
    return measure(typical_block(), (64, 40, 40), p).reference_us


def typical_block() -> nn.Module:
    """The block `reference_speed` times the reference next to: an inverted bottleneck, 64 ch at (64, 40, 40)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1, groups=256),
                             nn.ReLU(), nn.Conv2d(256, 64, 1))


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
    check_int("runs_per_round", runs_per_round, 1, source=None)
    if rounds is not None:
        check_int("rounds", rounds, 1, source=None)
    if isinstance(input_shape, Mapping):
        missing = sorted(set(models) - set(input_shape))
        if missing:
            raise ConfigError(None, "input_shape", f"no input shape for model(s) {', '.join(missing)}")
        shapes = {name: _check_inputs(input_shape[name], f"input_shape[{name!r}]") for name in models}
    else:
        shapes = {name: _check_inputs(input_shape) for name in models}
    _check_backend_available(protocol)

    names = list(models)
    min_rounds = rounds if rounds is not None else math.ceil(protocol.repeats / runs_per_round)
    max_rounds = rounds if rounds is not None else max(min_rounds, protocol.max_repeats // runs_per_round)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nas-profile-")))
        stack.enter_context(eval_mode(*models.values()))
        runners = {n: _make_runner(models[n], shapes[n], protocol, tmp / f"{i}.onnx") for i, n in enumerate(names)}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=rounds, desc="interleaved rounds", unit="round"))
        stack.enter_context(_timing_env(protocol))
        return time_interleaved(runners, protocol, min_rounds, max_rounds, runs_per_round,
                                None if bar is None else bar.update)


def network(arch: ArchSpec, head: HeadConfig | None = None) -> nn.Module:
    """The backbone of `arch`, or with `head` the whole detector (eval forward: backbone, neck, head, box decoding)."""
    if head is None:
        return build_backbone(arch)
    return Detector(arch, head)


def measure_network(arch: ArchSpec, protocol: Protocol, head: HeadConfig | None = None) -> Measurement:
    """`arch`'s backbone (with `head`: the whole detector) measured end to end, here and now, under `protocol`."""
    return measure(network(arch, head), (arch.channels, arch.resolution, arch.resolution), protocol)
