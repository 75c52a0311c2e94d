"""A detector in the files it ships as: ONNX (ONNX Runtime) and OpenVINO IR, fp32 checked against torch on real
images (the raw head outputs), int8 quantized as the latency tables quantize (`nas.latency.quantize`, calibrated
on training images) and scored on the val set with the training's own mAP code, run through the runtime.
The work behind `nas train --export` and `nas export --format`."""
from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.arch.detector import Detector
from nas.errors import ConfigError, NasError
from nas.latency.onnx import export_onnx
from nas.latency.protocol import Protocol

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "litert")
BACKEND = {"onnx": "onnxruntime-cpu", "openvino": "openvino-cpu", "litert": "litert-cpu"}
ATOL = 1e-3               # raw head outputs (logits and DFL bins) of the runtime against torch
CHECK_IMAGES = 8          # val images the fp32 check runs
CALIBRATION_IMAGES = 128  # training images the int8 ranges are calibrated on (none of them scored)


@dataclass(frozen=True)
class Deployed:
    """One exported file and what was checked or measured on it."""

    format: str
    dtype: str
    path: Path
    max_diff: float | None = None        # fp32: max |runtime - torch| over the raw head outputs of CHECK_IMAGES
    map50_95: float | None = None        # on the val set through the runtime (None: not evaluated)
    map50: float | None = None
    map50_95_drop: float | None = None   # int8: the same runtime's fp32 mAP50-95 minus this one

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """'onnx,openvino' -> ('onnx', 'openvino'); ConfigError naming an unknown one."""
    names = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise ConfigError("command line", "--export/--format", f"unknown format {bad[0]!r}" if bad else "empty"
                          f"; choose from {', '.join(FORMATS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


class _RawHead(nn.Module):
    """The detector's forward without the box decoding: the level maps (B, 4*reg_max+nc, H, W) the head computes."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.detector
        return tuple(d.head(d.neck(d.backbone(x))))


def _runner(fmt: str, path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
    """x (1, 3, H, W) -> every output of the model file in `fmt`'s runtime on one CPU thread."""
    if fmt == "litert":  # NCHW in and out, the file itself is NHWC at its 4-D ends
        from nas.latency.litert import tflite_function

        return tflite_function(path)
    protocol = Protocol(backend=BACKEND[fmt])
    if fmt == "onnx":
        from nas.latency.onnx import ort_session

        session = ort_session(path, protocol)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    from nas.latency.openvino import compile_onnx

    compiled = compile_onnx(path, protocol)
    return lambda x: [np.asarray(v) for v in compiled(x).values()]


def _write(fmt: str, onnx_path: Path, out: Path, model: nn.Module | None = None,
           example: torch.Tensor | None = None) -> Path:
    """The fp32 file of `fmt`: the ONNX export itself, or it converted to OpenVINO IR (out.xml + out.bin)."""
    if fmt == "onnx":
        return onnx_path
    if fmt == "litert":  # litert-torch converts the module itself (out.tflite), not the ONNX file
        from nas.latency.litert import convert_tflite

        return convert_tflite(model, example, out.with_suffix(".tflite"))
    from nas.latency.openvino import import_openvino

    ov = import_openvino()
    xml = out.with_suffix(".xml")
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def check_raw(model: Detector, fmt: str, images: Sequence[np.ndarray], folder: Path, atol: float = ATOL) -> float:
    """Max |runtime - torch| over the raw head outputs of `images` ((1, 3, H, W) each); NasError past `atol`."""
    raw = _RawHead(model).eval()
    size = images[0].shape[-1]
    levels = [f"p{s}" for s in model.strides]
    path = _write(fmt, export_onnx(raw, torch.from_numpy(images[0]), folder / "raw.onnx", output_names=levels),
                  folder / "raw", raw, torch.from_numpy(images[0]))
    run = _runner(fmt, path)
    worst = 0.0
    with torch.no_grad():
        for x in images:
            ref = [t.numpy() for t in raw(torch.from_numpy(x))]
            for name, r, o in zip(levels, ref, run(x)):
                diff = float(np.abs(o.astype(np.float64) - r).max())
                if not diff <= atol:  # also NaN
                    raise NasError(f"{fmt} export at {size} px: raw head output {name} differs from PyTorch by "
                                   f"{diff:.3g} (allowed {atol:g}); the runtime does not compute this detector as "
                                   f"torch does")
                worst = max(worst, diff)
    return worst


class RuntimeDetector(nn.Module):
    """A model file behind the nn.Module interface `nas.detect.evaluate.evaluate` scores: eval forward (B, 3, H, W)
    -> decoded (B, A, 4+nc), one image per runtime call (the exports have batch 1)."""

    def __init__(self, fmt: str, path: Path):
        super().__init__()
        self.run = _runner(fmt, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy()
        return torch.from_numpy(np.concatenate([self.run(arr[i:i + 1])[0] for i in range(len(arr))]))


def _images(data: str, split: str, imgsz: int, n: int) -> list[np.ndarray]:
    """The first `n` images of `split`, letterboxed as validation feeds them, each (1, 3, imgsz, imgsz)."""
    from nas.detect.data import YoloDataset

    ds = YoloDataset(data, split, imgsz, augment=False)
    if len(ds) == 0:
        raise ConfigError(str(data), split, "no images")
    return [ds[i][0].numpy()[None] for i in range(min(n, len(ds)))]


def _score(model: nn.Module, data: str, imgsz: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from nas.detect.data import YoloDataset, collate
    from nas.detect.evaluate import evaluate

    ds = YoloDataset(data, "val", imgsz, augment=False)
    return evaluate(model, DataLoader(ds, 8, shuffle=False, collate_fn=collate), num_classes=ds.cfg.nc)


def deploy(model: Detector, imgsz: int, out_dir: str | Path, formats: Sequence[str], *, data: str | None,
           int8: bool = False, evaluate: bool = True, calibration_images: int = CALIBRATION_IMAGES) -> list[Deployed]:
    """Write `model` as OUT/model.onnx and/or OUT/model.xml (fp32), each checked against torch on val images of
    `data`; with `int8` also model.int8.onnx / model.int8.xml, calibrated on `calibration_images` training images.
    With `evaluate`, every file is scored on the val set through its runtime and an int8 file reports its mAP50-95
    drop against the fp32 file of the same runtime. `data` None: a random-normal check, no int8, no scores."""
    from nas.latency.quantize import quantize_model

    if int8 and "litert" in formats:
        raise ConfigError("command line", "--int8", "int8 LiteRT files are not written yet: export litert in fp32 "
                                                    "(leave --int8 out, or ask for onnx,openvino)")
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        if int8:
            raise ConfigError("command line", "--data", "int8 needs images to calibrate on: give --data DATA.yaml")
        gen = torch.Generator().manual_seed(0)
        check = [torch.rand(1, 3, imgsz, imgsz, generator=gen).numpy()]
        evaluate = False
    else:
        check = _images(data, "val", imgsz, CHECK_IMAGES)
    onnx_path = export_onnx(model, imgsz, out / "model.onnx")
    calibration = [(x,) for x in _images(data, "train", imgsz, calibration_images)] if int8 and data else []
    results = []
    with tempfile.TemporaryDirectory(prefix="nas-deploy-") as tmp:
        for fmt in formats:
            path = _write(fmt, onnx_path, out / "model", model, torch.zeros(1, 3, imgsz, imgsz))
            folder = Path(tmp) / fmt
            folder.mkdir()
            diff = check_raw(model, fmt, check, folder)
            fp32 = _score(RuntimeDetector(fmt, path), data, imgsz) if evaluate else {}
            results.append(Deployed(fmt, "fp32", path, diff, fp32.get("map50_95"), fp32.get("map50")))
            if not int8:
                continue
            q = quantize_model(BACKEND[fmt], onnx_path, calibration,
                               out / ("model.int8.onnx" if fmt == "onnx" else "model.int8.xml"), decodes=True)
            m = _score(RuntimeDetector(fmt, q), data, imgsz) if evaluate else {}
            drop = fp32["map50_95"] - m["map50_95"] if evaluate else None
            if drop is not None and not math.isfinite(drop):
                log.warning("%s int8: mAP50-95 is not finite (fp32 %s, int8 %s)", fmt, fp32["map50_95"], m["map50_95"])
            results.append(Deployed(fmt, "int8", q, None, m.get("map50_95"), m.get("map50"), drop))
    return results


def summary_lines(exports: Sequence[dict[str, Any]]) -> list[str]:
    """One line per exported file: where, the check against torch, the val mAP through the runtime, the int8 drop."""
    lines = []
    for d in exports:
        check = f"raw head max |diff| vs PyTorch {d['max_diff']:.1e}" if d.get("max_diff") is not None else ""
        score = f"val mAP50-95 {d['map50_95']:.4f} in its runtime" if d.get("map50_95") is not None else ""
        drop = f"drop vs fp32 {d['map50_95_drop']:+.4f}" if d.get("map50_95_drop") is not None else ""
        notes = "; ".join(x for x in (check, score, drop) if x)
        lines.append(f"{d['format'] + ' ' + d['dtype'] + ':':14s} {d['path']}" + (f" ({notes})" if notes else ""))
    return lines
