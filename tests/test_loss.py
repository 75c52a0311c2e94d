"""Box geometry, task-aligned assignment and the YOLOv8 detection loss."""
from __future__ import annotations

import math

import pytest
import torch

from nas.arch.decode import dist2bbox, make_anchors
from nas.detect.boxes import bbox2dist, bbox_iou, box_iou, xywh2xyxy, xyxy2xywh
from nas.detect.loss import DetectionLoss, TaskAlignedAssigner, dfl_loss

T = torch.tensor


# ---------------------------------------------------------------- boxes


def test_xywh_xyxy_round_trip():
    xywh = T([[5.0, 6.0, 4.0, 2.0]])
    xyxy = xywh2xyxy(xywh)
    assert torch.equal(xyxy, T([[3.0, 5.0, 7.0, 7.0]]))
    assert torch.equal(xyxy2xywh(xyxy), xywh)


def test_iou_identical_disjoint_and_hand_worked():
    a = T([0.0, 0.0, 2.0, 2.0])
    assert bbox_iou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert bbox_iou(a, T([5.0, 5.0, 6.0, 6.0])).item() == 0.0
    # a=(0,0,2,2), b=(1,1,3,3): intersection 1, union 4+4-1=7 -> IoU 1/7
    b = T([1.0, 1.0, 3.0, 3.0])
    assert bbox_iou(a, b).item() == pytest.approx(1 / 7, abs=1e-6)
    # GIoU: enclosing box (0,0,3,3) area 9 -> 1/7 - (9-7)/9
    assert bbox_iou(a, b, kind="giou").item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    # CIoU: centres (1,1),(2,2) -> rho²=2; enclosing diagonal² = 3²+3² = 18; same aspect -> v=0
    assert bbox_iou(a, b, kind="ciou").item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-6)
    # identical boxes: CIoU 1; disjoint: GIoU and CIoU negative
    assert bbox_iou(a, a, kind="ciou").item() == pytest.approx(1.0, abs=1e-6)
    assert bbox_iou(a, T([5.0, 5.0, 6.0, 6.0]), kind="giou").item() < 0


def test_ciou_aspect_term_hand_worked():
    # a=(0,0,2,2) w/h=1, b=(0,0,4,2) w/h=2: inter 4, union 8 -> IoU 0.5
    # centres (1,1),(2,1): rho²=1; enclosing (0,0,4,2): c²=16+4=20
    # v = 4/pi² (atan 2 - atan 1)², alpha = v / (v - IoU + 1)
    a, b = T([0.0, 0.0, 2.0, 2.0]), T([0.0, 0.0, 4.0, 2.0])
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (v - 0.5 + 1)
    assert bbox_iou(a, b, kind="ciou").item() == pytest.approx(0.5 - 1 / 20 - alpha * v, abs=1e-6)


def test_box_iou_matrix_matches_elementwise():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 2, generator=g) * 10
    b1 = torch.cat((p, p + torch.rand(5, 2, generator=g) * 5 + 0.1), 1)
    p = torch.rand(4, 2, generator=g) * 10
    b2 = torch.cat((p, p + torch.rand(4, 2, generator=g) * 5 + 0.1), 1)
    m = box_iou(b1, b2)
    assert m.shape == (5, 4)
    assert torch.allclose(m, bbox_iou(b1[:, None], b2[None]), atol=1e-6)


def test_make_anchors_order_and_strides():
    pts, strides = make_anchors([(2, 3), (1, 1)], (8, 16))
    # level 0: 2 rows x 3 cols, x fastest; level 1: one cell
    expected = T([[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]])
    assert torch.equal(pts, expected)
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0]
    feats = [torch.zeros(1, 3, 2, 3, dtype=torch.float64), torch.zeros(1, 3, 1, 1, dtype=torch.float64)]
    pts2, _ = make_anchors(feats, (8, 16), offset=0.0)
    assert pts2.dtype == torch.float64 and torch.equal(pts2, expected - 0.5)
    with pytest.raises(ValueError):
        make_anchors([(2, 2)], (8, 16))


def test_dist_bbox_round_trip_and_clamp():
    anchors = T([[4.0, 4.0], [10.0, 2.0]])
    dist = T([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    boxes = dist2bbox(dist, anchors)
    assert torch.equal(boxes[0], T([3.0, 2.0, 7.0, 8.0]))
    assert torch.equal(bbox2dist(anchors, boxes), dist)
    assert torch.equal(dist2bbox(dist, anchors, xywh=True)[0], T([5.0, 5.0, 4.0, 6.0]))
    # anchor outside the box: negative side clamped to 0, long side to the max
    far = bbox2dist(T([[0.0, 0.0]]), T([[1.0, 1.0, 30.0, 30.0]]), max_dist=14.99)
    assert far.tolist() == [[0.0, 0.0, pytest.approx(14.99), pytest.approx(14.99)]]


# ---------------------------------------------------------------- assigner


def _grid(n: int, stride: float) -> torch.Tensor:
    pts, s = make_anchors([(n, n)], (stride,))
    return pts * s


def test_assigner_picks_topk_inside_gt():
    anchors = _grid(8, 8.0)  # 64 anchor centres at 4, 12, ..., 60 px
    a = anchors.shape[0]
    nc = 3
    gt = T([[[0.0, 0.0, 40.0, 40.0]]])  # anchors with centre < 40 in both axes: 5x5 = 25 inside
    labels = T([[[2]]])
    mask = T([[[True]]])
    # predictions: every anchor predicts a 20 px box around itself; class-2 scores all differ, so no ties
    pd_boxes = torch.cat((anchors - 10, anchors + 10), 1)[None]
    pd_scores = torch.zeros(1, a, nc)
    pd_scores[0, :, 2] = torch.linspace(0.1, 0.9, a)
    tb, ts, fg, gi = TaskAlignedAssigner(nc, topk=10)(pd_scores, pd_boxes, anchors, labels, gt, mask)

    inside = (anchors < 40).all(1)
    assert inside.sum() == 25
    assert fg.sum() == 10  # exactly top-k
    assert not (fg[0] & ~inside).any()  # never outside the gt
    # the chosen ones are the 10 inside anchors with the highest metric score^0.5 * CIoU^6
    ciou = bbox_iou(gt[0, 0].expand(a, 4), pd_boxes[0], kind="ciou").clamp(min=0)
    metric = pd_scores[0, :, 2].sqrt() * ciou**6
    metric[~inside] = -1
    assert set(fg[0].nonzero().flatten().tolist()) == set(metric.topk(10).indices.tolist())
    # targets: gt box, class 2 one-hot, max soft score equals the gt's best CIoU among positives
    assert torch.equal(tb[0, fg[0]], gt[0, 0].expand(10, 4))
    assert (ts[0, :, :2] == 0).all() and (ts[0, ~fg[0]] == 0).all()
    assert ts[0, :, 2].max().item() == pytest.approx(ciou[fg[0]].max().item(), rel=1e-4)
    assert (gi[0, fg[0]] == 0).all()


def test_assigner_small_gt_gets_only_its_inside_anchors_and_padding_is_ignored():
    anchors = _grid(4, 8.0)  # centres at 4, 12, 20, 28
    a = anchors.shape[0]
    gt = T([[[0.0, 0.0, 14.0, 14.0], [0.0, 0.0, 0.0, 0.0]]])  # second row is padding
    labels = T([[[0], [0]]])
    mask = T([[[True], [False]]])
    pd_boxes = torch.cat((anchors - 6, anchors + 6), 1)[None]
    pd_scores = torch.full((1, a, 1), 0.5)
    _, ts, fg, gi = TaskAlignedAssigner(1, topk=10)(pd_scores, pd_boxes, anchors, labels, gt, mask)
    # only 4 anchors (4,4),(12,4),(4,12),(12,12) lie inside, fewer than topk: all of them, nothing else
    assert fg[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert (gi[0, fg[0]] == 0).all()


def test_assigner_overlapping_gts_resolved_by_highest_iou():
    anchors = T([[10.0, 10.0]])
    gts = T([[[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0]]])  # anchor inside both
    labels = T([[[0], [1]]])
    mask = T([[[True], [True]]])
    pd_scores = torch.full((1, 1, 2), 0.5)
    pd_box = T([[[5.5, 5.5, 14.5, 14.5]]])  # much closer to the small gt
    tb, ts, fg, gi = TaskAlignedAssigner(2, topk=10)(pd_scores, pd_box, anchors, labels, gts, mask)
    assert fg.item() and gi.item() == 1
    assert torch.equal(tb[0, 0], gts[0, 1])
    assert ts[0, 0, 0] == 0 and ts[0, 0, 1] > 0


def test_assigner_no_gts():
    anchors = _grid(2, 8.0)
    out = TaskAlignedAssigner(2)(
        torch.rand(2, 4, 2), torch.rand(2, 4, 4), anchors,
        torch.zeros(2, 0, 1, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0, 1, dtype=torch.bool),
    )
    assert not out[2].any() and (out[1] == 0).all()


# ---------------------------------------------------------------- loss


def test_dfl_loss_minimal_at_interpolated_target():
    # target 2.3 between bins 2 and 3: loss = -(0.7 log p2 + 0.3 log p3), smallest when p = (.., 0.7, 0.3, ..)
    target = T([[2.3, 2.3, 2.3, 2.3]])
    good = torch.full((1, 4, 16), -30.0)
    good[..., 2], good[..., 3] = math.log(0.7), math.log(0.3)
    bad = torch.zeros(1, 4, 16)
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert dfl_loss(good, target).item() == pytest.approx(entropy, abs=1e-4)
    assert dfl_loss(bad, target).item() == pytest.approx(math.log(16), abs=1e-4)


def _preds(batch: int, nc: int, imgsz: int, reg_max: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 4 * reg_max + nc, imgsz // s, imgsz // s, generator=g) * 0.1).requires_grad_()
        for s in (8, 16, 32)
    ]


def test_loss_decreases_when_fitting_a_prediction_tensor(one_thread):
    torch.manual_seed(0)
    nc, imgsz = 3, 64
    preds = _preds(2, nc, imgsz)
    targets = T([
        [0, 0, 0.30, 0.30, 0.25, 0.25],
        [0, 2, 0.70, 0.60, 0.40, 0.30],
        [1, 1, 0.50, 0.50, 0.60, 0.60],
    ])
    crit = DetectionLoss(nc)
    opt = torch.optim.Adam(preds, lr=0.05)
    first = None
    for _ in range(50):
        total, parts = crit(preds, targets, imgsz)
        if first is None:
            first = parts.clone()
            first_total = total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    total, parts = crit(preds, targets, imgsz)
    assert total.item() < 0.5 * first_total
    assert (parts < first).all(), (first, parts)  # box, cls and dfl all improve
    assert total.item() == pytest.approx(parts.sum().item() * 2, rel=1e-5)  # sum of gained parts x batch


def test_loss_finite_with_empty_targets():
    nc, imgsz = 2, 64
    crit = DetectionLoss(nc)
    for targets in (torch.zeros(0, 6), T([[1, 0, 0.5, 0.5, 0.3, 0.3]])):  # whole batch empty; image 0 empty
        preds = _preds(2, nc, imgsz, seed=1)
        total, parts = crit(preds, targets, imgsz)
        assert torch.isfinite(total) and torch.isfinite(parts).all()
        total.backward()
        for p in preds:
            assert p.grad is not None and torch.isfinite(p.grad).all()
    # no targets: only the classification term (pushes every score down)
    total, parts = crit(_preds(2, nc, imgsz), torch.zeros(0, 6), imgsz)
    assert parts[0] == 0 and parts[2] == 0 and parts[1] > 0


def test_loss_rejects_wrong_shapes_and_classes():
    crit = DetectionLoss(3)
    with pytest.raises(ValueError, match="4\\*reg_max"):
        crit(_preds(1, 2, 64), torch.zeros(0, 6), 64)
    with pytest.raises(ValueError, match="classes"):
        crit(_preds(1, 3, 64), T([[0, 3, 0.5, 0.5, 0.1, 0.1]]), 64)
    with pytest.raises(ValueError, match="batch_idx"):
        crit(_preds(1, 3, 64), T([[1, 0, 0.5, 0.5, 0.1, 0.1]]), 64)
