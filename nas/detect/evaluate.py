"""Detector evaluation: COCO mAP50 / mAP50-95 through pycocotools on in-memory structures, plus per-image speed.

Decoding and NMS live in `nas.detect.postprocess`; this module only scores their output.
"""
from __future__ import annotations

import contextlib
import io
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from nas.detect.boxes import xywh2xyxy
from nas.detect.postprocess import non_max_suppression


def _as_array(x: Tensor | np.ndarray | Sequence, cols: int) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    a = a.astype(np.float64).reshape(-1, cols) if a.size else np.zeros((0, cols))
    return a


def _xyxy_to_coco(b: np.ndarray) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def _build_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def coco_map(
    gts: Sequence[Tensor | np.ndarray],
    dets: Sequence[Tensor | np.ndarray],
    num_classes: int,
    max_dets: int = 100,
) -> dict[str, Any]:
    """COCO box AP for one list of images.

    gts: per image an (n, 5) array [cls, x1, y1, x2, y2] in pixels (empty for background images).
    dets: per image an (n, 6) array [x1, y1, x2, y2, score, cls], as from `non_max_suppression`.
    Returns {"map50", "map75", "map50_95", "ap50_95_per_class", "ap50_per_class", "num_images", "num_gts"}.
    Classes without ground truth are NaN in the per-class lists and excluded from the means (COCO rule); the
    means are NaN when no class has ground truth. `max_dets` is COCO's per-image cap (100 in the standard metric).
    """
    if len(gts) != len(dets):
        raise ValueError(f"got ground truth for {len(gts)} images but detections for {len(dets)}")
    # 1-based ids throughout: COCOeval treats a matched id of 0 as "unmatched"
    images = [{"id": i + 1} for i in range(len(gts))]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    gt_anns: list[dict] = []
    dt_anns: list[dict] = []
    for img_id, (g, d) in enumerate(zip(gts, dets), start=1):
        g, d = _as_array(g, 5), _as_array(d, 6)
        for cls, *box in g:
            _check_cls(cls, num_classes, "ground truth")
            bbox = _xyxy_to_coco(np.asarray(box))
            gt_anns.append(
                {"id": len(gt_anns) + 1, "image_id": img_id, "category_id": int(cls) + 1, "bbox": bbox,
                 "area": max(bbox[2], 0.0) * max(bbox[3], 0.0), "iscrowd": 0}  # box area: no masks here
            )
        for *box, score, cls in d:
            _check_cls(cls, num_classes, "detection")
            bbox = _xyxy_to_coco(np.asarray(box))
            dt_anns.append(
                {"id": len(dt_anns) + 1, "image_id": img_id, "category_id": int(cls) + 1, "bbox": bbox,
                 "area": max(bbox[2], 0.0) * max(bbox[3], 0.0), "iscrowd": 0, "score": float(score)}
            )

    nan = float("nan")
    result: dict[str, Any] = {
        "map50": nan, "map75": nan, "map50_95": nan,
        "ap50_95_per_class": [nan] * num_classes, "ap50_per_class": [nan] * num_classes,
        "num_images": len(images), "num_gts": len(gt_anns),
    }
    if not images or num_classes == 0:
        return result
    # results built directly instead of COCO.loadRes, which fails on an empty list and prints
    coco_gt = _build_coco(images, categories, gt_anns)
    coco_dt = _build_coco(images, categories, dt_anns)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.maxDets = [1, 10, max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    # precision: (iou thresholds, recall thresholds, classes, area ranges, max dets); -1 marks "no gt"
    prec = ev.eval["precision"][:, :, :, 0, -1]
    iou_thrs = ev.params.iouThrs

    def mean_valid(p: np.ndarray) -> float:
        v = p[p > -1]
        return float(v.mean()) if v.size else nan

    result["map50_95"] = mean_valid(prec)
    result["map50"] = mean_valid(prec[np.isclose(iou_thrs, 0.5)])
    result["map75"] = mean_valid(prec[np.isclose(iou_thrs, 0.75)])
    result["ap50_95_per_class"] = [mean_valid(prec[:, :, k]) for k in range(num_classes)]
    result["ap50_per_class"] = [mean_valid(prec[np.isclose(iou_thrs, 0.5), :, k]) for k in range(num_classes)]
    return result


def _check_cls(cls: float, num_classes: int, what: str) -> None:
    if not (0 <= cls < num_classes) or cls != int(cls):
        raise ValueError(f"{what} class {cls} is not an integer in [0, {num_classes})")


def targets_to_gts(targets: Tensor, batch: int, height: int, width: int) -> list[Tensor]:
    """YOLO targets (N, 6) [batch_idx, cls, cx, cy, w, h] normalised -> per image (n, 5) [cls, x1, y1, x2, y2] px."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    t = targets.detach().float().cpu()
    boxes = xywh2xyxy(t[:, 2:6] * scale)
    rows = torch.cat((t[:, 1:2], boxes), 1)
    return [rows[t[:, 0].long() == i] for i in range(batch)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    conf_thres: float = 0.001,
    iou_thres: float = 0.7,
    max_det: int = 300,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Run `model` (eval mode returns decoded (B, A, 4+nc)) over `loader` and score it with `coco_map`.

    The loader yields (imgs (B, 3, H, W) float in [0, 1] or uint8, targets (N, 6), paths, ...). Boxes are scored in
    the loader's image pixels, detections clipped to the image. Adds "speed": mean ms per image for preprocess
    (transfer + dtype), inference and nms. num_classes defaults to the model's output width.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gts: list[Tensor] = []
    dets: list[Tensor] = []
    t_pre = t_inf = t_nms = 0.0
    seen = 0
    nc = num_classes
    try:
        for batch in loader:
            imgs, targets = batch[0], batch[1]
            sync()
            t0 = time.perf_counter()
            imgs = imgs.to(device, non_blocking=True)
            imgs = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
            sync()
            t1 = time.perf_counter()
            out = model(imgs)
            if isinstance(out, (tuple, list)):  # tolerate (decoded, raw) style returns
                out = out[0]
            if out.dim() != 3:
                raise ValueError(
                    f"model returned shape {tuple(out.shape)} in eval mode; expected decoded (B, A, 4+nc)"
                )
            sync()
            t2 = time.perf_counter()
            batch_dets = non_max_suppression(out, conf_thres, iou_thres, max_det)
            sync()
            t3 = time.perf_counter()
            b, _, h, w = imgs.shape
            nc = nc if nc is not None else out.shape[-1] - 4
            for d in batch_dets:
                d = d.cpu().clone()
                d[:, 0:4:2] = d[:, 0:4:2].clamp(0, w)
                d[:, 1:4:2] = d[:, 1:4:2].clamp(0, h)
                dets.append(d)
            gts.extend(targets_to_gts(targets, b, h, w))
            t_pre, t_inf, t_nms = t_pre + t1 - t0, t_inf + t2 - t1, t_nms + t3 - t2
            seen += b
    finally:
        model.train(was_training)
    metrics = coco_map(gts, dets, nc or 0)
    per_img = 1000.0 / max(seen, 1)
    metrics["speed"] = {"preprocess": t_pre * per_img, "inference": t_inf * per_img, "nms": t_nms * per_img}
    return metrics

