"""From raw head maps to detections: DFL decode to pixel boxes + class probabilities, and non-maximum suppression.

Pure torch (no torchvision) so the decode exports to ONNX and NMS runs anywhere.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nas.detect.boxes import box_iou


def nms(boxes: Tensor, scores: Tensor, iou_thres: float, block: int = 1024) -> Tensor:
    """Greedy NMS: indices of kept boxes, highest score first; a box is dropped if IoU > iou_thres with a kept one.

    Boxes are visited in blocks of `block` sorted rows: earlier kept boxes suppress a block in one vectorised IoU,
    then the block is resolved sequentially on its own IoU matrix. Memory stays O(block * kept) for any N.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)  # stable: ties keep input order
    sorted_boxes = boxes[order].float()
    kept_pos: list[np.ndarray] = []
    kept_boxes = sorted_boxes[:0]
    for start in range(0, n, block):
        blk = sorted_boxes[start : start + block]
        alive = torch.ones(blk.shape[0], dtype=torch.bool, device=blk.device)
        if kept_boxes.shape[0]:
            alive &= ~(box_iou(kept_boxes, blk) > iou_thres).any(0)
        over = (box_iou(blk, blk) > iou_thres).triu(1).cpu().numpy()
        alive_np = alive.cpu().numpy()
        for i in range(blk.shape[0]):
            if alive_np[i]:
                alive_np &= ~over[i]  # over[i] is False at and before i, so i itself survives
        idx = np.flatnonzero(alive_np)
        kept_pos.append(idx + start)
        kept_boxes = torch.cat((kept_boxes, blk[torch.from_numpy(idx).to(blk.device)]))
    return order[torch.from_numpy(np.concatenate(kept_pos)).to(order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_thres: float) -> Tensor:
    """Per-class NMS in one pass: boxes of different classes are shifted apart so they never overlap."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    span = (boxes.max() - boxes.min()).item() + 1.0
    shifted = boxes.float() + (classes.to(torch.float32) * span)[:, None]
    return nms(shifted, scores, iou_thres)


def non_max_suppression(
    decoded: Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.7,
    max_det: int = 300,
    *,
    multi_label: bool = True,
    agnostic: bool = False,
    max_nms: int = 30000,
) -> list[Tensor]:
    """Decoded (B, A, 4+nc) -> per image a (n, 6) tensor [x1, y1, x2, y2, score, cls], best first.

    multi_label keeps every (box, class) pair above conf_thres (the evaluation setting: better recall); otherwise
    only each box's best class. At most max_nms candidates, by score, enter NMS.
    """
    if decoded.dim() != 3 or decoded.shape[-1] < 5:
        raise ValueError(f"expected decoded predictions (B, A, 4+nc), got shape {tuple(decoded.shape)}")
    out = []
    for pred in decoded:
        boxes, cls_scores = pred[:, :4], pred[:, 4:]
        if multi_label:
            anchor_idx, cls_idx = (cls_scores > conf_thres).nonzero(as_tuple=True)
            scores = cls_scores[anchor_idx, cls_idx]
        else:
            scores, cls_idx = cls_scores.max(1)
            anchor_idx = (scores > conf_thres).nonzero(as_tuple=True)[0]
            scores, cls_idx = scores[anchor_idx], cls_idx[anchor_idx]
        if scores.numel() > max_nms:
            top = scores.topk(max_nms).indices
            anchor_idx, cls_idx, scores = anchor_idx[top], cls_idx[top], scores[top]
        cand = boxes[anchor_idx]
        keep = nms(cand, scores, iou_thres) if agnostic else batched_nms(cand, scores, cls_idx, iou_thres)
        keep = keep[:max_det]
        out.append(torch.cat((cand[keep], scores[keep, None], cls_idx[keep, None].to(cand.dtype)), dim=1))
    return out
