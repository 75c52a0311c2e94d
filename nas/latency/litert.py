"""LiteRT on the CPU (backend `litert-cpu`): a module converted to a .tflite flatbuffer by litert-torch and run by
the LiteRT interpreter with its XNNPACK delegate, the runtime MobileNet-class detectors ship with on Android and
embedded Linux. Both packages are the optional extra `litert`, imported only when this backend is used; running a
.tflite file needs numpy and ai-edge-litert only (no torch), converting one needs torch and litert-torch."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.errors import NasError
from nas.latency.protocol import Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("nas.latency.litert")

INSTALL_HINT = "backend litert-cpu needs ai-edge-litert and litert-torch: pip install 'hwnas-yolo[litert]'"


@contextlib.contextmanager
def _quiet() -> Iterator[Path]:
    """Route the process's stdout and stderr (file descriptors, not only sys.stdout) to a log file for the duration;
    the file is removed afterwards unless the block raised (an error message can name it).

    Why: litert-torch draws a progress tree per conversion and its MLIR converter and the interpreter log through
    absl straight to fd 2 (a dozen lines per op), which would bury a table build's progress bar."""
    with tempfile.NamedTemporaryFile("w+", prefix="nas-litert-", suffix=".log", delete=False) as f:
        log_path = Path(f.name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.__stdout__), \
                contextlib.redirect_stderr(sys.__stderr__):
            warnings.simplefilter("ignore")  # torch.export's deprecation chatter
            yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for d in (*saved, fd):
            os.close(d)
    log_path.unlink(missing_ok=True)  # not reached when the block raised


def import_interpreter() -> Any:
    """`ai_edge_litert.interpreter`, or one NasError saying how to install it."""
    try:
        from ai_edge_litert import interpreter
    except ImportError as err:
        raise NasError(INSTALL_HINT) from err
    return interpreter


def import_converter() -> Any:
    """The `litert_torch` module (progress display off unless the user asked for it), or one NasError."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    if "litert_torch" in sys.modules:
        return sys.modules["litert_torch"]
    try:
        with _quiet():  # its import prints torchao's missing CUDA kernels to fd 2
            import litert_torch
    except ImportError as err:
        raise NasError(INSTALL_HINT) from err
    return litert_torch


def litert_versions() -> dict[str, str]:
    """What a table header records: the interpreter's release, and the converter's where it is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import ai_edge_litert
    except ImportError as err:
        raise NasError(INSTALL_HINT) from err
    versions = {"ai_edge_litert": ai_edge_litert.__version__}

    with contextlib.suppress(PackageNotFoundError):  # a device agent runs .tflite files without the converter
        versions["litert_torch"] = version("litert-torch")
    return versions


def check_litert_cpu() -> None:
    """NasError unless both the interpreter and the converter import."""
    import_interpreter()
    import_converter()


# --- conversion ---------------------------------------------------------------------------------------------------

# The last few conversions, by content (structure, weights, shapes, versions): a table build measures the same
# reference workload beside every op, and a conversion costs seconds (a block 1.5-4 s of CPU, a detector ~40 s).
# A hit gives the bytes the conversion gave, so the cache never changes a result.
_MEMO_SIZE = 8
_memo: OrderedDict[str, bytes] = OrderedDict()


def _content_key(module: nn.Module, example: tuple[torch.Tensor, ...], channels_last: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{litert_versions()}|{channels_last}|{[tuple(x.shape) for x in example]}|{module!r}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def convert_tflite(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path, *,
                   channels_last: bool = True) -> Path:
    """Write `module` in eval mode as a .tflite file for the static input shape(s) of `example` (NCHW tensors).

    With `channels_last` every 4-D input and output of the file is NHWC and the graph stays NHWC inside: a single
    op converted with NCHW ends carries a transpose at each end (and a residual add left outside them, in NCHW),
    which a network pays only once, at its ends; converted NHWC, an op costs what it costs inside a network."""
    import torch

    from nas.latency.onnx import eval_mode

    path = Path(path)
    args = example if isinstance(example, tuple) else (example,)
    key = _content_key(module, args, channels_last)
    if key in _memo:
        _memo.move_to_end(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_memo[key])
        return path
    lt = import_converter()
    with eval_mode(module), torch.no_grad():
        outs = module(*args)
        flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        to_convert, inputs = module, args
        if channels_last:
            four_d_in = [i for i, x in enumerate(args) if x.dim() == 4]
            four_d_out = [i for i, y in enumerate(flat) if y.dim() == 4]
            to_convert = lt.to_channel_last_io(module, args=four_d_in, outputs=four_d_out).eval()
            inputs = tuple(x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else x for x in args)
        try:
            with _quiet() as log_path:
                lt.convert(to_convert, inputs).export(str(path))
        except Exception as err:  # torch.export and the MLIR converter raise many types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NasError(f"LiteRT conversion of {type(module).__name__} to {path} failed ({type(err).__name__}: "
                           f"{first}); converter log: {log_path}") from err
    _memo[key] = path.read_bytes()
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return path


# --- the interpreter ----------------------------------------------------------------------------------------------


def interpreter(path: str | Path, threads: int = 1) -> Any:
    """A LiteRT interpreter for the .tflite file with the XNNPACK delegate (the CPU default) on `threads` threads,
    its tensors allocated."""
    lite = import_interpreter()
    try:
        with _quiet():  # "Created TensorFlow Lite XNNPACK delegate for CPU." on fd 2
            interp = lite.Interpreter(model_path=str(path), num_threads=threads)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise NasError(f"LiteRT could not load {path}: {msg}") from err
    return interp


def _ordered(details: dict[str, dict]) -> list[dict]:
    """A signature's tensors in argument order (litert-torch names them args_0, args_1, ... and output_0, ...)."""
    def rank(name: str) -> tuple[int, str]:
        tail = name.rsplit("_", 1)[-1]
        return (int(tail), name) if tail.isdigit() else (1 << 30, name)

    return [details[k] for k in sorted(details, key=rank)]


def _io(interp: Any) -> tuple[list[dict], list[dict]]:
    runner = interp.get_signature_runner()
    return _ordered(runner.get_input_details()), _ordered(runner.get_output_details())


def _bind(interp: Any, path: str | Path, inputs: Sequence[np.ndarray], channels_last: bool) -> list[np.ndarray]:
    ins, _ = _io(interp)
    if len(ins) != len(inputs):
        raise NasError(f"{path} takes {len(ins)} inputs, got {len(inputs)}")
    kept = []
    for i, (d, x) in enumerate(zip(ins, inputs)):
        if channels_last and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(d["shape"]) != x.shape:
            raise NasError(f"{path}: input {i} has shape {tuple(d['shape'])}, got an array of {x.shape}")
        interp.set_tensor(d["index"], x)
        kept.append(x)
    return kept


def litert_runner(path: str | Path, inputs: Sequence[np.ndarray], protocol: Protocol,
                  channels_last: bool = True) -> Callable[[], Any]:
    """One synchronous `invoke` per call on `inputs` (NCHW arrays, one per model input; handed over in NHWC with
    `channels_last`). The inputs are copied into the interpreter's input tensors once: invoke reads them in place."""
    interp = interpreter(path, protocol.threads)
    _bind(interp, path, inputs, channels_last)
    log.debug("loaded %s into LiteRT with XNNPACK, %d thread(s)", path, protocol.threads)
    return interp.invoke


def tflite_function(path: str | Path, channels_last: bool = True, threads: int = 1
                    ) -> Callable[..., list[np.ndarray]]:
    """The .tflite file as a function of NCHW arrays (one per input) returning its outputs in the module's order,
    4-D ones back in NCHW; one interpreter, loaded once."""
    interp = interpreter(path, threads)
    outputs = _io(interp)[1]

    def run(*inputs: np.ndarray) -> list[np.ndarray]:
        _bind(interp, path, inputs, channels_last)
        interp.invoke()
        outs = [interp.get_tensor(d["index"]) for d in outputs]  # copies: the next invoke reuses the buffers
        return [y.transpose(0, 3, 1, 2) if channels_last and y.ndim == 4 else y for y in outs]

    return run

