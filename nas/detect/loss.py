"""YOLOv8-style detection loss: task-aligned assignment, CIoU box loss, distribution focal loss, BCE classification.

Works on the head's raw training output (per-level maps) and YOLO targets (batch_idx, cls, cx, cy, w, h in [0, 1]).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nas.arch.decode import dfl_expectation, dist2bbox, make_anchors
from nas.detect.boxes import bbox2dist, bbox_iou, xywh2xyxy


class TaskAlignedAssigner:
    """Task-aligned label assignment (TOOD, Feng et al. 2021) as used by YOLOv8.

    For each gt, candidates are anchors whose centre lies strictly inside the box; the `topk` candidates with the
    largest alignment metric t = score^alpha * CIoU^beta become positives. An anchor claimed by several gts keeps
    the one it overlaps most. Target scores are one-hot class vectors scaled by t, normalised per gt so that the
    gt's best anchor gets the gt's best overlap.
    """

    def __init__(self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: Tensor,
        pd_bboxes: Tensor,
        anc_points: Tensor,
        gt_labels: Tensor,
        gt_bboxes: Tensor,
        mask_gt: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Assign gts to anchors.

        Args: pd_scores (B, A, nc) class probabilities; pd_bboxes (B, A, 4) xyxy; anc_points (A, 2) in the same
        units as the boxes; gt_labels (B, M, 1) int; gt_bboxes (B, M, 4) xyxy; mask_gt (B, M, 1) bool, False on
        padding rows.
        Returns: target_bboxes (B, A, 4), target_scores (B, A, nc), fg_mask (B, A) bool, target_gt_idx (B, A).
        """
        b, a, nc = pd_scores.shape
        m = gt_bboxes.shape[1]
        dev = pd_scores.device
        if m == 0:
            return (
                torch.zeros_like(pd_bboxes),
                torch.zeros_like(pd_scores),
                torch.zeros(b, a, dtype=torch.bool, device=dev),
                torch.zeros(b, a, dtype=torch.long, device=dev),
            )
        labels = gt_labels.long().squeeze(-1)  # (B, M)
        valid = mask_gt.bool().squeeze(-1)  # (B, M)

        # candidates: anchor centre strictly inside a real gt box (per-axis tests keep tensors at (B, M, A))
        ax, ay = anc_points[:, 0], anc_points[:, 1]
        x1, y1, x2, y2 = (gt_bboxes[..., i, None] for i in range(4))
        cand = (ax > x1 + self.eps) & (ax < x2 - self.eps) & (ay > y1 + self.eps) & (ay < y2 - self.eps)
        cand &= valid[..., None]  # (B, M, A)

        # metric only on candidate (gt, anchor) pairs: the dense (B, M, A) grid is mostly empty at 640 px
        bi, mi, ai = cand.nonzero(as_tuple=True)
        pair_iou = bbox_iou(gt_bboxes[bi, mi], pd_bboxes[bi, ai], kind="ciou").clamp(min=0)
        pair_score = pd_scores[bi, ai, labels[bi, mi].clamp(0, nc - 1)]
        overlaps = torch.zeros(b, m, a, dtype=pd_bboxes.dtype, device=dev)
        align = torch.zeros_like(overlaps)
        overlaps[bi, mi, ai] = pair_iou.to(overlaps.dtype)
        align[bi, mi, ai] = (pair_score.pow(self.alpha) * pair_iou.pow(self.beta)).to(align.dtype)

        # top-k per gt among its candidates (-1 ranks non-candidates last, so in-box anchors with metric 0 still
        # fill the k slots of a small gt)
        k = min(self.topk, a)
        top_idx = align.masked_fill(~cand, -1.0).topk(k, dim=-1).indices
        is_top = torch.zeros_like(cand).scatter_(-1, top_idx, True)
        pos = is_top & cand  # (B, M, A)

        # an anchor claimed by several gts keeps the gt with the highest overlap
        multi = pos.sum(1, keepdim=True) > 1  # (B, 1, A)
        if multi.any():
            best = overlaps.masked_fill(~pos, -1.0).argmax(1, keepdim=True)  # (B, 1, A)
            best_onehot = torch.zeros_like(pos).scatter_(1, best, True)
            pos = torch.where(multi, best_onehot & pos, pos)

        fg_mask = pos.any(1)  # (B, A)
        target_gt_idx = pos.to(torch.uint8).argmax(1)  # (B, A); 0 for background, masked out below
        batch_off = torch.arange(b, device=dev)[:, None] * m
        flat_idx = (target_gt_idx + batch_off).view(-1)
        target_labels = labels.view(-1)[flat_idx].view(b, a).clamp(0, nc - 1)
        target_bboxes = gt_bboxes.reshape(-1, 4)[flat_idx].view(b, a, 4)

        # soft targets: t / max_t(gt) * max_overlap(gt), taken for each anchor from its assigned gt
        align = align * pos
        max_align = align.amax(-1, keepdim=True)
        max_overlap = (overlaps * pos).amax(-1, keepdim=True)
        norm = (align * max_overlap / (max_align + self.eps)).amax(1) * fg_mask  # (B, A)
        target_scores = torch.zeros_like(pd_scores).scatter_(-1, target_labels[..., None], norm[..., None])
        return target_bboxes, target_scores, fg_mask, target_gt_idx


def dfl_loss(pred_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss (GFL, Li et al. 2020) for (n, 4, reg_max) logits and continuous targets (n, 4).

    Cross-entropy on the two bins around the target, weighted by linear interpolation; returns (n,) mean over sides.
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = 1.0 - w_left
    logp = pred_logits.log_softmax(-1)
    nll_left = -logp.gather(-1, left[..., None]).squeeze(-1)
    nll_right = -logp.gather(-1, right[..., None]).squeeze(-1)
    return (nll_left * w_left + nll_right * w_right).mean(-1)


class DetectionLoss:
    """YOLOv8 detection loss over the raw head output.

    `__call__(preds, targets, imgsz)` returns (total, components): total = (box*7.5 + cls*0.5 + dfl*1.5) * batch
    size (the ultralytics scale, so the usual learning rates apply), components = detached [box, cls, dfl] after
    gains. Box and DFL terms are weighted by the soft target scores; all terms are divided by their sum (>= 1).
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int] = (8, 16, 32),
        reg_max: int = 16,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ):
        self.nc = num_classes
        self.strides = tuple(strides)
        self.reg_max = reg_max
        self.gains = (box, cls, dfl)
        self.assigner = TaskAlignedAssigner(num_classes, topk=topk, alpha=alpha, beta=beta)

    def _check(self, preds: Sequence[Tensor]) -> None:
        if len(preds) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} prediction levels (strides {self.strides}), got {len(preds)}")
        want = 4 * self.reg_max + self.nc
        for i, p in enumerate(preds):
            if p.dim() != 4 or p.shape[1] != want:
                raise ValueError(
                    f"prediction level {i} has shape {tuple(p.shape)}; expected (B, {want}, H, W) "
                    f"= 4*reg_max ({self.reg_max}) + num_classes ({self.nc}) channels"
                )

    def _pad_targets(self, targets: Tensor, batch: int, imgsz: int) -> tuple[Tensor, Tensor, Tensor]:
        """(N, 6) normalised rows -> labels (B, M, 1), xyxy pixel boxes (B, M, 4), validity mask (B, M, 1)."""
        dev = targets.device
        bi = targets[:, 0].long()
        if targets.shape[0] and (bi.min() < 0 or bi.max() >= batch):
            raise ValueError(f"targets batch_idx must be in [0, {batch}); got range [{bi.min()}, {bi.max()}]")
        cls = targets[:, 1].long()
        if targets.shape[0] and (cls.min() < 0 or cls.max() >= self.nc):
            raise ValueError(f"target classes must be in [0, {self.nc}); got range [{cls.min()}, {cls.max()}]")
        counts = torch.bincount(bi, minlength=batch)
        m = int(counts.max()) if targets.shape[0] else 0
        labels = torch.zeros(batch, m, 1, dtype=torch.long, device=dev)
        boxes = torch.zeros(batch, m, 4, dtype=torch.float32, device=dev)
        mask = torch.zeros(batch, m, 1, dtype=torch.bool, device=dev)
        if m:
            order = torch.argsort(bi, stable=True)
            bi_sorted = bi[order]
            starts = torch.cumsum(counts, 0) - counts  # first row of each image in the sorted order
            slot = torch.arange(bi.numel(), device=dev) - starts[bi_sorted]
            labels[bi_sorted, slot, 0] = cls[order]
            boxes[bi_sorted, slot] = xywh2xyxy(targets[order, 2:6].float() * imgsz)
            mask[bi_sorted, slot, 0] = True
        return labels, boxes, mask

    def __call__(self, preds: Sequence[Tensor], targets: Tensor, imgsz: int) -> tuple[Tensor, Tensor]:
        self._check(preds)
        batch = preds[0].shape[0]
        flat = torch.cat([p.flatten(2) for p in preds], dim=2).transpose(1, 2)  # (B, A, C)
        box_logits, cls_logits = flat.split((4 * self.reg_max, self.nc), dim=-1)
        points, stride_col = make_anchors(preds, self.strides)  # grid units of each level
        points, stride_col = points.float(), stride_col.float()
        pred_dist = dfl_expectation(box_logits.float(), self.reg_max)  # (B, A, 4), stride units
        pred_boxes = dist2bbox(pred_dist, points) * stride_col  # pixels

        labels, gt_boxes, mask = self._pad_targets(targets.to(flat.device), batch, imgsz)
        target_boxes, target_scores, fg, _ = self.assigner(
            cls_logits.detach().sigmoid().float(), pred_boxes.detach(), points * stride_col, labels, gt_boxes, mask
        )
        score_sum = target_scores.sum().clamp(min=1.0)

        loss_cls = F.binary_cross_entropy_with_logits(cls_logits.float(), target_scores, reduction="sum") / score_sum
        if fg.any():
            weight = target_scores.sum(-1)[fg]  # (n,)
            ciou = bbox_iou(pred_boxes[fg], target_boxes[fg], kind="ciou")
            loss_box = ((1.0 - ciou) * weight).sum() / score_sum
            target_dist = bbox2dist(points, target_boxes / stride_col, self.reg_max - 1 - 0.01)  # stride units
            bins = box_logits[fg].float().unflatten(-1, (4, self.reg_max))
            loss_dfl = (dfl_loss(bins, target_dist[fg]) * weight).sum() / score_sum
        else:
            # keep the box branch in the graph so every parameter gets a (zero) gradient, not None
            loss_box = loss_dfl = box_logits.sum() * 0.0

        parts = torch.stack((loss_box * self.gains[0], loss_cls * self.gains[1], loss_dfl * self.gains[2]))
        return parts.sum() * batch, parts.detach()
