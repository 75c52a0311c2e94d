"""OpenVINO on the CPU (backend `openvino-cpu`): an exported ONNX model read, compiled as the protocol says and run
one synchronous request per call. `openvino` is an optional extra, imported only when this backend is used."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.errors import NasError
from nas.latency.protocol import Protocol
from nas.system import import_without

log = logging.getLogger("nas.latency.openvino")

INSTALL_HINT = "backend openvino-cpu needs the openvino package: pip install 'hwnas-yolo[openvino]'"


def import_openvino() -> Any:
    """The openvino module, or one NasError saying how to install it.

    Importing openvino (2026.4) also imports its model converter, whose telemetry counts as consent the absence of
    a consent file: it writes a client id and a usage count into ~/intel on every import (events are sent only by
    `convert_model`). nas reads ONNX files and never converts, and writes only into its run folder, so the first
    import here skips the converter (openvino catches that ImportError); afterwards the converter imports as usual
    (`from openvino.tools.ovc import convert_model`), only `openvino.convert_model` is absent."""
    try:
        return import_without("openvino", "openvino.tools.ovc")
    except ImportError as err:
        raise NasError(INSTALL_HINT) from err


def openvino_version() -> str:
    """The release, e.g. '2026.4.1' (the build suffix of `openvino.__version__` dropped: it varies by wheel)."""
    return import_openvino().__version__.split("-")[0]


def check_openvino_cpu() -> None:
    """NasError unless openvino is installed and sees a CPU device."""
    devices = import_openvino().Core().available_devices
    if "CPU" not in devices:
        raise NasError(f"backend openvino-cpu: OpenVINO {openvino_version()} finds no CPU device (devices: "
                       f"{', '.join(devices) or 'none'})")


def compile_config(protocol: Protocol) -> dict[str, Any]:
    """CPU plugin properties for `protocol`. The precision is forced: on CPUs with AMX or AVX512-BF16 OpenVINO
    infers in bf16 by default, which is not an fp32 latency. Pinning is left to the protocol (`pin_cpu`): the
    plugin's own pinning would move threads onto cores the process was not given. Denormals follow the protocol
    (torch's flush flag does not reach OpenVINO's threads)."""
    return {
        "INFERENCE_NUM_THREADS": protocol.threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
        "CPU_DENORMALS_OPTIMIZATION": protocol.flush_denormal,
    }


def _channels_last(model: Any, ov: Any) -> Any:
    """Give every 4-D input and output an NHWC tensor layout (the model stays NCHW inside).

    Why: the CPU plugin computes convolutions in NHWC. A whole network converts layouts once, at its ends; a
    single op exported as NCHW pays a conversion at both of its own ends, and the output transpose is slow at
    power-of-two sizes (a dw 3x3 + 1x1 reference block with 64x64x64 output: 1.0 ms in NCHW, 0.2 ms in NHWC, of
    which the compute is 0.3 ms by the plugin's own counters). With NHWC ends the plugin fuses the conversion
    away, so the op costs what it costs inside a network."""
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    for i, port in enumerate(model.inputs):
        if port.get_partial_shape().rank.get_length() == 4:
            ppp.input(i).tensor().set_layout(ov.Layout("NHWC"))
            ppp.input(i).model().set_layout(ov.Layout("NCHW"))
    for i, port in enumerate(model.outputs):
        if port.get_partial_shape().rank.get_length() == 4:
            ppp.output(i).model().set_layout(ov.Layout("NCHW"))
            ppp.output(i).tensor().set_layout(ov.Layout("NHWC"))
    return ppp.build()


def compile_onnx(onnx_path: str | Path, protocol: Protocol, channels_last: bool = False) -> Any:
    """The ONNX file read and compiled for the CPU under `protocol` (an `openvino.CompiledModel`)."""
    ov = import_openvino()
    core = ov.Core()
    try:
        model = core.read_model(str(onnx_path))
        if channels_last:
            model = _channels_last(model, ov)
        return core.compile_model(model, "CPU", compile_config(protocol))
    except RuntimeError as err:  # OpenVINO reports every failure as RuntimeError with a multi-line trace
        raise NasError(f"OpenVINO {openvino_version()} could not compile {onnx_path}: "
                       f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from err


def openvino_runner(onnx_path: str | Path, inputs: Sequence[np.ndarray], protocol: Protocol,
                    channels_last: bool = True) -> Callable[[], Any]:
    """One synchronous inference per call on `inputs` (NCHW arrays, one per model input). The inputs are bound
    once (shared, not copied per call, as a deployed pipeline writes into the request's tensor); with
    `channels_last` they are handed over in NHWC (`_channels_last`)."""
    ov = import_openvino()
    compiled = compile_onnx(onnx_path, protocol, channels_last)
    request = compiled.create_infer_request()
    kept = []
    for i, x in enumerate(inputs):
        if channels_last and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x, dtype=np.float32)
        kept.append(x)  # the request reads this memory on every call
        request.set_input_tensor(i, ov.Tensor(x, shared_memory=True))
    log.debug("compiled %s for OpenVINO CPU (%s)", onnx_path, compile_config(protocol))

    def run(_inputs: list = kept) -> Any:  # the default keeps the bound arrays alive as long as the runner
        return request.infer()

    return run
