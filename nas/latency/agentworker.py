"""The device agent's measuring process (`python -m nas.latency.agentworker`): it parses and checks each model,
builds its runtime session and times it with the same loop as local profiling (`timing.py`). The agent starts
it, feeds it one request at a time over stdin and kills it when a request overruns its time limit, so a model
that never finishes cannot wedge the agent. Frames both ways: 4-byte big-endian length, then JSON."""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from nas.errors import NasError
from nas.latency.protocol import Protocol
from nas.latency.timing import Runner, process_env, time_calls

# Opset domains a model may use: the standard ones and ONNX Runtime's contrib ops; anything else is a custom op.
DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
MAX_FRAME = 1 << 20  # messages carry paths and shapes, never models


class ModelError(NasError):
    """A model the worker refuses or a runtime fails on: the reply names the job."""


def write_frame(out: IO[bytes], obj: Any) -> None:
    data = json.dumps(obj).encode()
    out.write(struct.pack(">I", len(data)) + data)
    out.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise NasError(f"agent worker: a {n}-byte frame exceeds {MAX_FRAME}")
    return json.loads(stream.read(n))


def _tensors_and_graphs(graph: Any) -> tuple[list[Any], list[Any]]:
    """Every tensor (initializers, constant attributes) of `graph` and its subgraphs (Loop/If/Scan bodies)."""
    tensors, graphs, todo = [], [], [graph]
    while todo:
        g = todo.pop()
        graphs.append(g)
        tensors += list(g.initializer) + [s.values for s in g.sparse_initializer]
        for node in g.node:
            for a in node.attribute:
                tensors += ([a.t] if a.HasField("t") else []) + list(a.tensors)
                todo += ([a.g] if a.HasField("g") else []) + list(a.graphs)
    return tensors, graphs


def check_model(path: str, n_inputs: int) -> None:
    """ModelError unless the file parses as ONNX, passes onnx.checker, keeps all its data inside (external data
    would have the runtime read files on this device), uses only standard op domains, and has `n_inputs` inputs."""
    import onnx

    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"cannot parse the ONNX model ({first_line(e)}); truncated or not ONNX") from e
    tensors, _ = _tensors_and_graphs(model.graph)
    if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
        raise ModelError("the model refers to external data files; send a self-contained model")
    domains = sorted({o.domain for o in model.opset_import} - set(DOMAINS))
    if domains:
        raise ModelError(f"op domain {domains[0]!r} is not allowed (custom ops); allowed: standard ONNX and "
                         f"com.microsoft")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError and others
        raise ModelError(f"invalid ONNX model: {first_line(e)}") from e
    initialised = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initialised]
    if len(inputs) != n_inputs:
        raise ModelError(f"the model has {len(inputs)} input(s), the request gives {n_inputs} shape(s)")


def make_runner(path: str, shapes: Sequence[Sequence[int]], protocol: Protocol) -> Runner:
    """The protocol's runtime on `path`, one synchronous inference per call on seeded standard-normal inputs."""
    gen = np.random.default_rng(protocol.seed)
    xs = [gen.standard_normal(tuple(s), dtype=np.float32) for s in shapes]
    if protocol.backend == "openvino-cpu":
        from nas.latency.openvino import openvino_runner

        return openvino_runner(path, xs, protocol)
    from nas.latency.runtime import ort_runner

    # No torch here to flush denormals on the calling thread as local profiling does: ONNX Runtime's own switch.
    return ort_runner(path, xs, protocol, denormal_as_zero=protocol.flush_denormal)


def first_line(e: BaseException | None) -> str:
    """The type and first line of an error, for a one-line reply."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def measure_job(job: dict, reference: dict | None, protocol: Protocol) -> dict[str, Any]:
    check_model(job["path"], len(job["inputs"]))
    if reference:
        check_model(reference["path"], len(reference["inputs"]))
    try:
        run = make_runner(job["path"], job["inputs"], protocol)
        ref = make_runner(reference["path"], reference["inputs"], protocol) if reference else None
        with process_env(protocol):
            return time_calls(run, protocol, ref).to_dict()
    except NasError:
        raise
    except Exception as e:  # the runtimes raise their own types (Fail, InvalidArgument, RuntimeError)
        raise ModelError(first_line(e)) from e


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Answer requests until stdin closes: one frame per job ({"id", "measurement"} or {"id", "error"}), then
    {"done": true}. The first failing job ends its request."""
    while (msg := read_frame(inp)) is not None:
        protocol = Protocol.from_dict(msg["protocol"])
        for job in msg["jobs"]:
            try:
                write_frame(out, {"id": job["id"], "measurement": measure_job(job, msg.get("reference"), protocol)})
            except NasError as e:
                write_frame(out, {"id": job["id"], "error": str(e)})
                break
        write_frame(out, {"done": True})


def _exit_with(parent: int) -> None:
    """Exit when the agent is gone, even in the middle of a model that never finishes (the runtimes release the
    GIL while they compute, so this thread runs)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main() -> None:
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    # The frames go to a private copy of stdout; whatever a runtime prints lands on stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import onnx  # noqa: F401 - imported before the first request (2 s on a busy core), not inside its time limit

    from nas.latency.runtime import import_ort

    import_ort()
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
