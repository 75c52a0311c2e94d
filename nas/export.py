"""Export a Detector to ONNX (eval mode, batch 1, decoded output) and check it against PyTorch with ONNX Runtime."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nas.errors import NasError

INPUT_NAME, OUTPUT_NAME = "images", "output"


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamo: bool,
            output_names: Sequence[str] = (OUTPUT_NAME,)) -> None:
    kwargs = {"dynamo": dynamo, "opset_version": opset, "input_names": [INPUT_NAME], "output_names": list(output_names)}
    if dynamo:
        kwargs["external_data"] = False  # one self-contained file (these models are a few MB)
    else:
        kwargs["do_constant_folding"] = True
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress chatter
        torch.onnx.export(model, (x,), str(path), **kwargs)


def export_onnx(model: nn.Module, imgsz: int, path: str | Path, opset: int = 17, dynamo: bool | None = None,
                output_names: Sequence[str] = (OUTPUT_NAME,)) -> Path:
    """Write `model` (eval mode, input 1x3ximgszximgsz float in [0, 1]) as ONNX; returns the path.
    `output_names` names the outputs in order (a backbone has one per feature map).

    Exporter: the TorchScript one (dynamo=False) by default. For these conv nets both give the same numbers, but
    with torch 2.13 the dynamo exporter builds opset 18 and its down-conversion to 17 fails on our graphs (onnx
    version converter assertion in axes_input_to_attribute), so the file silently stays at opset 18; the
    TorchScript exporter writes opset 17 as asked, in one file, about 4x faster (it matters when a search exports
    many candidates). It is deprecated since torch 2.9: when it is missing or fails we fall back to dynamo.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, imgsz, imgsz, device=device)
    try:
        if dynamo is None:
            try:
                _export(model, x, path, opset, False, output_names)
            except Exception:  # noqa: BLE001 - the legacy exporter is gone or cannot trace this model: try dynamo
                _export(model, x, path, opset, True, output_names)
        else:
            _export(model, x, path, opset, dynamo, output_names)
    except Exception as e:  # noqa: BLE001
        raise NasError(f"ONNX export to {path} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                       ) from e
    finally:
        model.train(was_training)
    return path


def check_onnx(model: nn.Module, path: str | Path, imgsz: int, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Validate the ONNX file (onnx.checker) and compare ONNX Runtime (CPU) with PyTorch on one random image.

    Returns the max absolute difference over all outputs (a model returning a list or tuple, such as a backbone's
    feature maps, is compared output by output); raises NasError where |onnx - torch| > atol + rtol * |torch|
    (numpy.allclose's rule). Boxes are in pixels: after a few epochs of training a box coordinate of 69.3 differed
    by 1.45e-3 between the runtimes, float32 rounding over ~100 layers, so the relative part is 1e-4, not 1e-5.
    """
    import onnx

    from nas.latency.profile import _import_ort

    ort = _import_ort()  # telemetry off

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
