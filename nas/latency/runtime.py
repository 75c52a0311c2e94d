"""ONNX Runtime without torch: the import (telemetry off), a session configured as a protocol says, and a runner
doing one inference per call. Local profiling and the device agent (which has no torch) build sessions here."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.errors import NasError
from nas.latency.protocol import Protocol

if TYPE_CHECKING:
    import onnxruntime


def import_ort() -> Any:
    """onnxruntime with its telemetry off. Since 1.2x its Linux wheels upload usage events and keep a device id in
    ~/.cache/Microsoft (seen with 1.32); nas sends nothing anywhere and writes only into its run folder. The switch
    is read once, when onnxruntime initialises, so it is set before the first import (a user's own value wins)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as err:
        raise NasError("ONNX Runtime is not installed: pip install onnxruntime") from err
    return onnxruntime


def ort_session(onnx_path: str | Path, protocol: Protocol,
                denormal_as_zero: bool = False) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession configured as the protocol says (threads, sequential, all graph optimisations).

    `denormal_as_zero`: ONNX Runtime's own flush-to-zero switch, for processes without torch (the device agent).
    Locally torch's flush flag covers it: with one thread ORT runs on the calling thread, whose flag torch sets.
    ORT applies the switch of a process's first session to the calling thread, so one process, one setting."""
    ort = import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = protocol.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: per-op warnings would flood a table build
    if denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_runner(onnx_path: str | Path, inputs: Sequence[np.ndarray], protocol: Protocol,
               denormal_as_zero: bool = False) -> Callable[[], Any]:
    """One synchronous inference per call on `inputs` (one array per model input, in the model's input order)."""
    session = ort_session(onnx_path, protocol, denormal_as_zero)
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)
