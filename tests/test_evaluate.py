"""DFL decode, NMS and COCO mAP through pycocotools, checked against hand-computed values."""
from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings
from torch import nn

from nas.arch.decode import DFL, decode, dfl_expectation
from nas.detect.evaluate import coco_map, evaluate, targets_to_gts
from nas.detect.postprocess import batched_nms, nms, non_max_suppression

T = torch.tensor


# ---------------------------------------------------------------- decode


def _one_hot_logits(bins: list[int], reg_max: int = 16) -> torch.Tensor:
    logits = torch.full((4, reg_max), -50.0)
    for side, k in enumerate(bins):
        logits[side, k] = 50.0
    return logits.flatten()


def test_dfl_of_one_hot_distribution_returns_the_bin():
    logits = _one_hot_logits([0, 3, 7, 15])
    assert dfl_expectation(logits, 16).tolist() == pytest.approx([0.0, 3.0, 7.0, 15.0], abs=1e-4)
    # half/half between bins 2 and 3 -> 2.5
    two = torch.full((1, 16), -50.0)
    two[0, 2] = two[0, 3] = 0.0
    assert dfl_expectation(two.repeat(4, 1).flatten(), 16).tolist() == pytest.approx([2.5] * 4, abs=1e-4)
    # the conv module computes the same thing on (B, 4*reg_max, A)
    x = torch.randn(2, 64, 5)
    assert torch.allclose(DFL(16)(x), dfl_expectation(x.transpose(1, 2), 16).transpose(1, 2), atol=1e-5)
    assert not any(p.requires_grad for p in DFL(16).parameters())


def test_decode_places_box_in_pixels():
    nc, reg_max, imgsz = 2, 16, 64
    preds = [torch.full((1, 4 * reg_max + nc, imgsz // s, imgsz // s), -50.0) for s in (8, 16, 32)]
    for p in preds:
        p[:, 0 : 4 * reg_max : reg_max] = 50.0  # every side at bin 0 by default
        p[:, 4 * reg_max :] = 0.0  # class logits 0 -> probability 0.5
    # stride-16 level, row 1, column 2: anchor (2.5, 1.5) grid units; distances l,t,r,b = 1,2,3,4 bins
    preds[1][0, : 4 * reg_max, 1, 2] = _one_hot_logits([1, 2, 3, 4])
    preds[1][0, 4 * reg_max + 1, 1, 2] = 2.0
    out = decode(preds, (8, 16, 32), reg_max)
    assert out.shape == (1, 64 + 16 + 4, 4 + nc)
    a = 64 + 1 * 4 + 2  # 64 stride-8 anchors first, then row-major
    # (2.5-1, 1.5-2, 2.5+3, 1.5+4) * 16
    assert out[0, a, :4].tolist() == pytest.approx([24.0, -8.0, 88.0, 88.0], abs=1e-3)
    assert out[0, a, 4:].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2.0))], abs=1e-6)
    # every other anchor has all distances at bin 0: a zero-size box at its own centre
    assert out[0, 0, :4].tolist() == pytest.approx([4.0, 4.0, 4.0, 4.0], abs=1e-3)


# ---------------------------------------------------------------- NMS


def test_nms_hand_made_case():
    # input order C, D, A, B
    boxes = T([
        [20.0, 20.0, 30.0, 30.0],  # C, far from the rest
        [0.0, 0.0, 10.0, 10.0],  # D, identical to A
        [0.0, 0.0, 10.0, 10.0],  # A, best score
        [1.0, 1.0, 11.0, 11.0],  # B, IoU with A = 81 / 119 = 0.68
    ])
    scores = T([0.7, 0.6, 0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [2, 0]
    assert nms(boxes, scores, 0.7).tolist() == [2, 3, 0]
    assert nms(boxes, scores, 0.5, block=1).tolist() == [2, 0]  # cross-block path gives the same answer
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def _iou_py(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _nms_reference(boxes: list, scores: list, thr: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(_iou_py(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


_f32 = lambda lo, hi: st.floats(lo, hi, width=32)  # noqa: E731  values the float32 tensors hold exactly
_box = st.tuples(_f32(0, 60), _f32(0, 60), _f32(1, 40), _f32(1, 40)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(_box, st.sampled_from([0.1, 0.5, 0.9]) | _f32(0, 1)), max_size=40),
    thr=st.sampled_from([0.3, 0.45, 0.6, 0.8]),
)
def test_nms_matches_brute_force(data, thr):
    boxes = [b for b, _ in data]
    scores = [s for _, s in data]
    # float32 vs float64 can disagree only for an IoU within rounding of the threshold
    assume(all(abs(_iou_py(a, b) - thr) > 1e-4 for a in boxes for b in boxes))
    bt = T(boxes, dtype=torch.float32).reshape(-1, 4)
    st_ = T(scores, dtype=torch.float32)
    # the reference ranks the scores nms sees: 0.9 and float32(0.9) differ in float64 but tie in float32
    expected = _nms_reference(boxes, st_.tolist(), thr)
    assert nms(bt, st_, thr).tolist() == expected
    assert nms(bt, st_, thr, block=3).tolist() == expected


def test_batched_nms_keeps_classes_apart():
    boxes = T([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.0, 10.0]])
    scores = T([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, T([0, 1, 0]), 0.5).tolist() == [0, 1]  # box 2 loses to box 0 only
    assert batched_nms(boxes, scores, T([0, 0, 0]), 0.5).tolist() == [0]


def test_non_max_suppression_format_thresholds_and_multi_label():
    # image 0: anchors 0/1 overlap (class 0), anchor 2 is elsewhere and scores for both classes
    dec = torch.zeros(2, 3, 6)
    dec[0, :, :4] = T([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60]])
    dec[0, :, 4:] = T([[0.9, 0.0], [0.8, 0.0], [0.3, 0.6]])
    dec[1, :, :4] = T([[0, 0, 5, 5]] * 3)
    dec[1, :, 4:] = 0.0005  # below conf_thres everywhere
    out = non_max_suppression(dec, conf_thres=0.001, iou_thres=0.7)
    assert len(out) == 2 and out[1].shape == (0, 6)
    rows = out[0].tolist()
    assert [v for r in rows for v in r[4:]] == pytest.approx([0.9, 0, 0.6, 1, 0.3, 0])
    assert rows[0][:4] == [0, 0, 10, 10]
    single = non_max_suppression(dec, multi_label=False)[0]
    assert single[:, 4:].flatten().tolist() == pytest.approx([0.9, 0, 0.6, 1])
    assert non_max_suppression(dec, max_det=1)[0].shape == (1, 6)
    assert non_max_suppression(dec, conf_thres=0.95)[0].shape == (0, 6)


# ---------------------------------------------------------------- coco_map


def test_perfect_detections_give_map_one():
    gts = [
        T([[0, 10, 10, 50, 60], [1, 70, 20, 90, 90]]),
        T([[1, 0, 0, 30, 30]]),
        torch.zeros(0, 5),  # background image
    ]
    dets = [torch.cat((g[:, 1:], torch.full((len(g), 1), 0.9), g[:, :1]), 1) for g in gts]
    m = coco_map(gts, dets, num_classes=3)
    assert m["map50"] == pytest.approx(1.0, abs=1e-9)
    assert m["map50_95"] == pytest.approx(1.0, abs=1e-9)
    assert m["ap50_95_per_class"][:2] == pytest.approx([1.0, 1.0])
    assert math.isnan(m["ap50_95_per_class"][2])  # class 2 has no gt: excluded
    assert m["num_images"] == 3 and m["num_gts"] == 3


def test_hand_computed_ap_with_a_false_positive_ranked_above_a_true_positive():
    # 2 gts (one per image), 3 detections sorted by score:
    #   0.9 TP (gt a)   -> recall 1/2, precision 1/1
    #   0.8 FP          -> recall 1/2, precision 1/2
    #   0.7 TP (gt b)   -> recall 2/2, precision 2/3
    # precision envelope (max to the right): [1, 2/3, 2/3]
    # 101 recall thresholds 0, .01, ..., 1: thresholds <= 0.50 (51 of them) first reach recall at the 1st det
    # -> 1; thresholds 0.51..1.00 (50) at the 3rd det -> 2/3.  AP = (51 * 1 + 50 * 2/3) / 101 = 253/303
    gts = [T([[0, 0, 0, 10, 10]]), T([[0, 20, 20, 40, 40]])]
    dets = [
        T([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0]]),
        T([[20, 20, 40, 40, 0.7, 0]]),
    ]
    m = coco_map(gts, dets, num_classes=1)
    assert m["map50"] == pytest.approx(253 / 303, abs=1e-6)
    assert m["map50_95"] == pytest.approx(253 / 303, abs=1e-6)  # exact boxes: same at every IoU threshold


def test_iou_between_thresholds_gives_partial_map50_95():
    # gt (0,0,10,10) vs det (0,0,10,6.2): IoU = 62/100 = 0.62 (kept off the 0.60 boundary)
    # a TP at IoU thresholds 0.50, 0.55, 0.60 (AP 1) and a FP at 0.65 ... 0.95 (AP 0)
    # mAP50 = 1, mAP75 = 0, mAP50-95 = 3/10
    m = coco_map([T([[0, 0, 0, 10, 10]])], [T([[0, 0, 10, 6.2, 0.8, 0]])], num_classes=1)
    assert m["map50"] == pytest.approx(1.0, abs=1e-9)
    assert m["map75"] == pytest.approx(0.0, abs=1e-9)
    assert m["map50_95"] == pytest.approx(0.3, abs=1e-9)


def test_background_images_count_false_positives_and_classes_average():
    # class 0: FP (0.9) on a background image ranked above the TP (0.5): envelope [1/2, 1/2] -> AP 0.5
    # class 1: one gt, no detection -> AP 0, still in the mean; class 2: only a FP, no gt -> excluded
    gts = [T([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]]), torch.zeros(0, 5)]
    dets = [T([[0, 0, 10, 10, 0.5, 0]]), T([[0, 0, 10, 10, 0.9, 0], [5, 5, 9, 9, 0.9, 2]])]
    m = coco_map(gts, dets, num_classes=3)
    assert m["ap50_95_per_class"][:2] == pytest.approx([0.5, 0.0], abs=1e-6)
    assert math.isnan(m["ap50_95_per_class"][2])
    assert m["map50_95"] == pytest.approx(0.25, abs=1e-6)
    assert m["map50"] == pytest.approx(0.25, abs=1e-6)


def test_no_detections_and_no_gts():
    m = coco_map([T([[0, 0, 0, 10, 10]])], [torch.zeros(0, 6)], num_classes=1)
    assert m["map50"] == 0.0 and m["map50_95"] == 0.0
    m = coco_map([torch.zeros(0, 5)], [T([[0, 0, 10, 10, 0.5, 0]])], num_classes=1)
    assert math.isnan(m["map50_95"])  # undefined without any ground truth
    with pytest.raises(ValueError, match="class"):
        coco_map([T([[3, 0, 0, 10, 10]])], [torch.zeros(0, 6)], num_classes=1)


# ---------------------------------------------------------------- evaluate


class BrightBoxDetector(nn.Module):
    """Finds the bright rectangle in an image; plus one low-score false positive in the corner."""

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(imgs.shape[0], 2, 5)
        for i, img in enumerate(imgs):
            mask = img.mean(0) > 0.5
            out[i, 1] = T([0.0, 0.0, 2.0, 2.0, 0.01])
            if mask.any():
                ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
                out[i, 0] = T([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1, 0.95])
        return out


def _image_with_box(x1: int, y1: int, x2: int, y2: int, size: int = 32) -> torch.Tensor:
    img = torch.zeros(3, size, size)
    img[:, y1:y2, x1:x2] = 1.0
    return img


def test_evaluate_runs_model_nms_and_coco():
    s = 32
    boxes = [(4, 8, 12, 20), (10, 10, 30, 26), (0, 16, 16, 32)]
    imgs = torch.stack([_image_with_box(*b) for b in boxes] + [torch.zeros(3, s, s)])
    targets = T([[i, 0, (b[0] + b[2]) / 2 / s, (b[1] + b[3]) / 2 / s, (b[2] - b[0]) / s, (b[3] - b[1]) / s]
                 for i, b in enumerate(boxes)])
    loader = [
        (imgs[:2], targets[targets[:, 0] < 2], ["a.jpg", "b.jpg"]),
        (imgs[2:], targets[targets[:, 0] >= 2] - T([2, 0, 0, 0, 0, 0]), ["c.jpg", "d.jpg"]),
    ]
    model = BrightBoxDetector().train()
    m = evaluate(model, loader, "cpu", conf_thres=0.001, iou_thres=0.7)
    assert model.training  # mode restored
    assert m["num_images"] == 4 and m["num_gts"] == 3
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert set(m["speed"]) == {"preprocess", "inference", "nms"} and all(v >= 0 for v in m["speed"].values())
    gts = targets_to_gts(targets, 4, s, s)
    assert gts[0].tolist() == [[0, 4, 8, 12, 20]] and gts[3].shape == (0, 5)
