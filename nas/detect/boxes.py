"""Box geometry shared by the loss, the head decode and evaluation: formats, IoU family, anchor grids, distances.

Boxes are (..., 4) tensors; `xyxy` = corners, `xywh` = centre and size. Anchor points are in grid units of their level.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

EPS = 1e-7


def xywh2xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    xy, wh = boxes[..., :2], boxes[..., 2:4]
    return torch.cat((xy - wh / 2, xy + wh / 2), dim=-1)


def xyxy2xywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    p1, p2 = boxes[..., :2], boxes[..., 2:4]
    return torch.cat(((p1 + p2) / 2, p2 - p1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes; inverted boxes count as empty."""
    wh = (boxes[..., 2:4] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise IoU matrix (N, M) between xyxy boxes (N, 4) and (M, 4)."""
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:4], boxes2[None, :, 2:4])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / (union + eps)


def bbox_iou(
    boxes1: Tensor, boxes2: Tensor, kind: Literal["iou", "giou", "ciou"] = "iou", eps: float = EPS
) -> Tensor:
    """Element-wise (broadcast) IoU, GIoU or CIoU of xyxy boxes (..., 4) -> (...).

    CIoU (Zheng et al. 2020) = IoU - centre distance² / enclosing diagonal² - alpha * v, where v measures the
    aspect-ratio mismatch; alpha is treated as a constant in the gradient, as the paper prescribes.
    """
    b1x1, b1y1, b1x2, b1y2 = boxes1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = boxes2.unbind(-1)
    w1, h1 = b1x2 - b1x1, (b1y2 - b1y1).clamp(min=eps)  # clamp h: it divides in the aspect term
    w2, h2 = b2x2 - b2x1, (b2y2 - b2y1).clamp(min=eps)
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)  # enclosing box
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    if kind == "ciou":
        c2 = cw**2 + ch**2 + eps
        rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
        v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (rho2 / c2 + alpha * v)
    raise ValueError(f"kind must be 'iou', 'giou' or 'ciou', got {kind!r}")


def bbox2dist(anchor_points: Tensor, boxes: Tensor, max_dist: float | None = None) -> Tensor:
    """xyxy boxes -> (left, top, right, bottom) distances from anchor points, clamped to [0, max_dist] if given."""
    dist = torch.cat((anchor_points - boxes[..., :2], boxes[..., 2:4] - anchor_points), -1)
    return dist.clamp(0, max_dist) if max_dist is not None else dist
