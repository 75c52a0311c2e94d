"""ONNX: one export for latency profiling and deployment, ONNX Runtime sessions, and a check of an exported
model against PyTorch."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nas.errors import NasError
from nas.latency.runtime import import_ort, ort_session  # noqa: F401 - ort_session re-exported for callers here


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own training flag is restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def export_onnx(module: nn.Module, example: int | torch.Tensor | tuple[torch.Tensor, ...], path: str | Path, *,
                opset: int = 17, exporter: str = "auto", output_names: Sequence[str] = ("output",)) -> Path:
    """Write `module` in eval mode as ONNX with the static input shape(s) of `example`: a tensor, a tuple of
    tensors (inputs input0, input1, ...), or an image side S for one 1x3xSxS image (input "images").

    `exporter`: "torchscript", "dynamo", or "auto" (TorchScript, then dynamo if that fails). TorchScript is the
    default although deprecated since torch 2.9: with torch 2.13 it is 20-50x faster per op (a latency table
    exports hundreds), it writes the opset asked for (dynamo builds 18 and its down-conversion to 17 fails on these
    graphs), and it exports 3-D scaled_dot_product_attention, on which dynamo fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(example, int):
        device = next(module.parameters()).device
        example = torch.zeros(1, 3, example, example, device=device)
    args = example if isinstance(example, tuple) else (example,)
    names = ["images"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    tries = ("torchscript", "dynamo") if exporter == "auto" else (exporter,)
    for i, how in enumerate(tries):
        kwargs: dict[str, Any] = {"opset_version": opset, "input_names": names, "output_names": list(output_names),
                                  "dynamo": how == "dynamo"}
        if how == "dynamo":
            kwargs.update(verbose=False, external_data=False)  # no progress lines; one self-contained file
        else:
            kwargs["do_constant_folding"] = True
        try:
            with eval_mode(module), torch.no_grad(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # the exporters' deprecation and progress chatter
                torch.onnx.export(module, args, str(path), **kwargs)
            return path
        except Exception as err:  # noqa: BLE001 - the exporters raise many types
            if i + 1 < len(tries):
                continue
            other = {"torchscript": " (try the dynamo exporter)", "dynamo": " (try the torchscript exporter)"}
            raise NasError(f"ONNX export of {type(module).__name__} to {path} with the {how} exporter failed "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                           f"{other[how] if exporter != 'auto' else ''}") from err
    return path


def check_onnx(model: nn.Module, path: str | Path, imgsz: int, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Validate the ONNX file (onnx.checker) and compare ONNX Runtime (CPU) with PyTorch on one random image.

    Returns the max absolute difference over all outputs (a model returning a list or tuple, such as a backbone's
    feature maps, is compared output by output); raises NasError where |onnx - torch| > atol + rtol * |torch|
    (numpy.allclose's rule). Boxes are in pixels: after a few epochs of training a box coordinate of 69.3 differed
    by 1.45e-3 between the runtimes, float32 rounding over ~100 layers, so the relative part is 1e-4, not 1e-5.
    """
    import onnx

    ort = import_ort()  # telemetry off

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise NasError(f"{path}: invalid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    refs = [r.float().cpu().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    if len(outs) != len(refs):
        raise NasError(f"{path}: ONNX model has {len(outs)} outputs, PyTorch returns {len(refs)}")
    diff = 0.0
    for k, (out, ref) in enumerate(zip(outs, refs)):
        if out.shape != ref.shape:
            raise NasError(f"{path}: ONNX output {k} shape {out.shape} differs from PyTorch {ref.shape}")
        err = np.abs(out.astype(np.float64) - ref)
        diff = max(diff, float(err.max()) if err.size else 0.0)
        bad = ~(err <= atol + rtol * np.abs(ref))  # also catches NaN
        if bad.any():
            i = np.unravel_index(np.argmax(np.where(bad, err, -1.0)), err.shape)
            raise NasError(f"{path}: ONNX Runtime output {k} differs from PyTorch by {float(err[i]):.3g} at index "
                           f"{i} (torch {float(ref[i]):.6g}, onnx {float(out[i]):.6g}; allowed {atol:g} + {rtol:g} * "
                           f"|torch|)")
    return diff
