"""Decoding the YOLOv8 head: anchor points per level, distribution focal loss (DFL) expectation, distances to boxes.
Part of a Detector's eval forward, so it lives with the model."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def make_anchors(
    feats_or_shapes: Sequence[Tensor] | Sequence[tuple[int, int]],
    strides: Sequence[int | float],
    offset: float = 0.5,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Cell-centre anchor points of every level, concatenated level by level, row-major (x varies fastest).

    `feats_or_shapes` holds per-level feature maps (..., H, W) or (H, W) pairs. Returns points (A, 2) as (x, y)
    in grid units of their own level and the matching strides (A, 1); multiply the two to get pixels.
    """
    if len(feats_or_shapes) != len(strides):
        raise ValueError(f"got {len(feats_or_shapes)} feature levels but {len(strides)} strides")
    points, stride_col = [], []
    for f, s in zip(feats_or_shapes, strides):
        if isinstance(f, Tensor):
            h, w = f.shape[-2:]
            dt, dev = dtype or f.dtype, device or f.device
        else:
            h, w = f
            dt, dev = dtype or torch.float32, device or "cpu"
        xs = torch.arange(w, dtype=dt, device=dev) + offset
        ys = torch.arange(h, dtype=dt, device=dev) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), dim=-1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(s), dtype=dt, device=dev))
    return torch.cat(points), torch.cat(stride_col)


def dist2bbox(distance: Tensor, anchor_points: Tensor, xywh: bool = False) -> Tensor:
    """(left, top, right, bottom) distances from anchor points -> xyxy (or xywh) boxes, same units."""
    lt, rb = distance[..., :2], distance[..., 2:4]
    p1, p2 = anchor_points - lt, anchor_points + rb
    return torch.cat(((p1 + p2) / 2, p2 - p1), -1) if xywh else torch.cat((p1, p2), -1)


def dfl_expectation(logits: Tensor, reg_max: int) -> Tensor:
    """(..., 4*reg_max) bin logits -> (..., 4) distances: expected bin index under the softmax distribution."""
    bins = torch.arange(reg_max, dtype=logits.dtype, device=logits.device)
    probs = logits.unflatten(-1, (4, reg_max)).softmax(-1)
    return probs @ bins  # Softmax + MatMul: both export to ONNX as plain ops


class DFL(nn.Module):
    """Distribution focal loss integral as a module: (B, 4*reg_max, A) logits -> (B, 4, A) distances.

    A frozen 1x1 convolution whose weights are the bin indices 0..reg_max-1, applied after a softmax over bins.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, _, a = x.shape
        # (B, 4, R, A) -> bins on the channel axis so the conv sums prob * index
        probs = x.view(b, 4, self.reg_max, a).transpose(1, 2).softmax(1)
        return self.conv(probs).view(b, 4, a)


def decode(preds: Sequence[Tensor], strides: Sequence[int], reg_max: int = 16) -> Tensor:
    """Raw per-level head maps (B, 4*reg_max+nc, H, W) -> (B, A, 4+nc): xyxy boxes in pixels + sigmoid class scores.

    Anchors are ordered level by level (stride 8 first), row-major inside a level, like `make_anchors`.
    """
    if len(preds) != len(strides):
        raise ValueError(f"got {len(preds)} prediction levels but {len(strides)} strides")
    flat = torch.cat([p.flatten(2) for p in preds], dim=2).transpose(1, 2)  # (B, A, C)
    box_logits, cls_logits = flat.split((4 * reg_max, flat.shape[-1] - 4 * reg_max), dim=-1)
    points, stride_col = make_anchors(preds, strides)
    boxes = dist2bbox(dfl_expectation(box_logits, reg_max), points) * stride_col
    return torch.cat((boxes, cls_logits.sigmoid()), dim=-1)
