"""Detector: the YOLOv8-n parameter count, output shapes of both necks on zoo and sampled backbones, loss
backward, stride validation, bias init, ONNX export, checkpoints with the old neck keys."""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from nas.arch.detector import Detector
from nas.arch.headconfig import HeadConfig
from nas.arch.zoo import get_arch
from nas.detect.checkpoint import load_checkpoint, load_detector, model_meta, save_checkpoint
from nas.detect.loss import DetectionLoss
from nas.errors import ConfigError, NasError
from nas.latency.onnx import check_onnx, export_onnx
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[1]
NC = 10


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_yolov8n_parameter_count_matches_ultralytics():
    model = Detector(get_arch("yolov8n_csp"), HeadConfig(neck="yolov8", width=0.25, depth=0.33, num_classes=80))
    # the YOLOv8n YAML summary (unfused) says 3,157,200; it includes the 16 frozen bin weights (0..15) of
    # ultralytics' DFL conv, which our decode computes as a softmax-weighted sum without a module
    assert n_params(model) + 16 == 3_157_200
    assert n_params(model.backbone) == 1_272_656  # ultralytics layers 0-9
    assert model.neck.out_channels == [64, 128, 256]


def _archs():
    space = load_space(ROOT / "search_spaces" / "uib_yolo.yaml")
    return [get_arch("mobilenet_v3_small_100"), get_arch("mobilenet_v4_conv_small")] + \
        [space.random(seed) for seed in (1, 7)]


@pytest.mark.parametrize("neck", ["yolov8", "dw"])
@pytest.mark.parametrize("arch", _archs(), ids=lambda a: a.name)
def test_shapes_and_backward(arch, neck):
    torch.manual_seed(0)
    model = Detector(arch, HeadConfig(neck=neck, num_classes=NC))
    x = torch.rand(2, 3, 64, 64)
    preds = model(x)
    assert [tuple(p.shape) for p in preds] == [(2, 64 + NC, 8, 8), (2, 64 + NC, 4, 4), (2, 64 + NC, 2, 2)]
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.4, 0.5], [1, 7, 0.3, 0.6, 0.2, 0.3]])
    loss, parts = DetectionLoss(NC)(preds, targets, 64)
    loss.backward()
    assert torch.isfinite(loss) and parts.shape == (3,)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 64 + 16 + 4, 4 + NC)
    assert torch.isfinite(out).all() and 0 <= out[..., 4:].min() and out[..., 4:].max() <= 1
    assert (out[..., 2] >= out[..., 0]).all() and (out[..., 3] >= out[..., 1]).all()


def test_dw_neck_is_lighter_than_yolov8_neck():
    arch = get_arch("mobilenet_v3_small_100")
    light = Detector(arch, HeadConfig(neck="dw", num_classes=NC))
    full = Detector(arch, HeadConfig(neck="yolov8", num_classes=NC))
    assert n_params(light.neck) * 5 < n_params(full.neck)
    assert light.neck.out_channels == [64, 64, 64]


def test_head_widths_and_bias_init():
    m = Detector(get_arch("mobilenet_v3_small_100"), HeadConfig(neck="dw", num_classes=NC))
    box, cls = m.head.box[0], m.head.cls[0]
    assert box[0][0].out_channels == max(16, 64 // 4, 64) and cls[0][0].out_channels == max(64, NC)
    for level, s in enumerate((8, 16, 32)):
        assert torch.all(m.head.box[level][-1].bias == 1.0)
        assert m.head.cls[level][-1].bias[0].item() == pytest.approx(math.log(5 / NC / (640 / s) ** 2))


def test_features_must_be_strides_8_16_32():
    arch = get_arch("mobilenet_v3_small_100")
    bad = replace(arch, features=arch.features[:2] + (arch.stages[0].name,))
    with pytest.raises(ConfigError, match="strides 8, 16, 32"):
        Detector(bad, HeadConfig(neck="yolov8", num_classes=NC))
    with pytest.raises(ConfigError, match="neck"):
        Detector(arch, HeadConfig(neck="bifpn", num_classes=NC))
    with pytest.raises(ValueError, match="multiples of 32"):
        Detector(arch, HeadConfig(neck="yolov8", num_classes=NC))(torch.zeros(1, 3, 64, 80))


def test_models_share_no_state():
    arch = get_arch("mobilenet_v3_small_100")
    relu = Detector(arch, HeadConfig(neck="dw", num_classes=NC, act="relu"))
    silu = Detector(arch, HeadConfig(neck="dw", num_classes=NC))
    assert any(isinstance(m, nn.ReLU) for m in relu.neck.modules())
    assert not any(isinstance(m, nn.ReLU) for m in silu.neck.modules())
    assert all(isinstance(m[-1], nn.SiLU) for m in silu.head.box[0][:2])


def _calibrated(seed: int) -> Detector:
    """A fresh model whose BN running statistics have seen data: at init, eval-mode activations vanish with depth
    and every output would equal the bias-only one."""
    torch.manual_seed(seed)
    model = Detector(get_arch("mobilenet_v3_small_100"), HeadConfig(neck="dw", num_classes=NC))
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 64, 64))
    return model


def test_onnx_export_matches_torch(tmp_path):
    model = _calibrated(0)
    path = export_onnx(model, 64, tmp_path / "m.onnx")
    assert model.training  # mode restored
    diff = check_onnx(model, path, 64)
    assert diff <= 1e-4
    other = _calibrated(1)  # different weights
    with pytest.raises(NasError, match="differs from PyTorch"):
        check_onnx(other, path, 64)


def test_checkpoints_with_the_old_neck_keys_still_load(tmp_path):
    # before the dw neck's fusion blocks were DepthwiseSeparable, their children were ".0"/".1", not ".dw"/".pw"
    model = _calibrated(0).eval()
    old = OrderedDict((re.sub(r"^(neck\.(?:td4|td3|bu4|bu5)\.\d+)\.(dw|pw)\.",
                              lambda m: f"{m[1]}.{'01'[m[2] == 'pw']}.", k), v) for k, v in model.state_dict().items())
    assert sum(a != b for a, b in zip(old, model.state_dict())) == 48  # 4 fusions x 3 blocks x (dw, pw) x 2 tensors
    path = save_checkpoint({"model": old, "ema": old, "meta": model_meta(model, [str(i) for i in range(NC)])},
                           tmp_path / "old.pt")
    ckpt = load_checkpoint(path)
    assert list(ckpt["model"]) == list(ckpt["ema"]) == list(model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_detector(path)(x), model(x))
