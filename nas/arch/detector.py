"""Detector = backbone (from an ArchSpec) + PAN neck ("yolov8" C2f or lightweight "dw") + YOLOv8 anchor-free head;
`HeadConfig` is the one type for what follows the backbone. Training mode returns the raw per-level maps the loss
takes; eval mode the decoded (B, A, 4+nc) tensor."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nas.arch.backbone import build_backbone
from nas.arch.blocks import C2f, ConvBN, DepthwiseSeparable
from nas.arch.decode import decode
from nas.arch.headconfig import STRIDES, HeadConfig
from nas.arch.spec import ArchSpec
from nas.errors import ConfigError

MAX_CHANNELS = 1024  # ultralytics' max_channels for the n/s scales


def scale_width(channels: int, width: float, max_channels: int = MAX_CHANNELS) -> int:
    """Ultralytics channel scaling: cap, multiply, round *up* to a multiple of 8."""
    return int(math.ceil(min(channels, max_channels) * width / 8) * 8)


def scale_depth(repeats: int, depth: float) -> int:
    return max(round(repeats * depth), 1) if repeats > 1 else repeats


class PAN(nn.Module):
    """PAN-FPN over (P3, P4, P5): laterals, then top-down (nearest 2x upsample, concat, fuse) and bottom-up (stride-2
    downsample, concat, fuse). Subclasses build the modules; the data flow is this one forward."""

    lateral: nn.ModuleList
    td4: nn.Module     # P5 up + P4
    td3: nn.Module     # T4 up + P3 -> P3 out
    down3: nn.Module
    bu4: nn.Module     # P3 out down + T4 -> P4 out
    down4: nn.Module
    bu5: nn.Module     # P4 out down + P5 -> P5 out
    out_channels: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        p3, p4, p5 = (m(f) for m, f in zip(self.lateral, feats))
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        o3 = self.td3(torch.cat((self.up(t4), p3), 1))
        o4 = self.bu4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.bu5(torch.cat((self.down4(o4), p5), 1))
        return [o3, o4, o5]


class YoloV8Neck(PAN):
    """YOLOv8 PAN-FPN: no laterals, 3x3 stride-2 conv downsample, C2f fusion.

    Widths (256, 512, 1024) * width for P3/P4/P5, C2f repeats 3 * depth, no shortcuts (ultralytics head layers).
    """

    def __init__(self, in_channels: list[int], width: float, depth: float, act: str):
        super().__init__()
        c3, c4, c5 = (scale_width(c, width) for c in (256, 512, 1024))
        n = scale_depth(3, depth)
        i3, i4, i5 = in_channels
        self.lateral = nn.ModuleList(nn.Identity() for _ in in_channels)  # parameter-free: state_dict unchanged
        self.td4 = C2f(i5 + i4, c4, n, False, act)
        self.td3 = C2f(c4 + i3, c3, n, False, act)
        self.down3 = ConvBN(c3, c3, 3, 2, act=act)
        self.bu4 = C2f(c3 + c4, c4, n, False, act)
        self.down4 = ConvBN(c4, c4, 3, 2, act=act)
        self.bu5 = C2f(c4 + i5, c5, n, False, act)
        self.out_channels = [c3, c4, c5]


def _fusion(cin: int, cout: int, repeats: int, act: str) -> nn.Sequential:
    return nn.Sequential(*(DepthwiseSeparable(cin if i == 0 else cout, cout, 3, 1, act) for i in range(repeats)))


class DepthwiseNeck(PAN):
    """Lightweight PAN for mobile budgets: 1x1 laterals to one small width, depthwise 3x3 stride-2 downsample,
    depthwise-separable fusion. Width 256 * width (64 at width 0.25)."""

    def __init__(self, in_channels: list[int], width: float, depth: float, act: str):
        super().__init__()
        c = scale_width(256, width)
        n = scale_depth(3, depth)
        self.lateral = nn.ModuleList(ConvBN(ci, c, 1, act=act) for ci in in_channels)
        self.td4 = _fusion(2 * c, c, n, act)
        self.td3 = _fusion(2 * c, c, n, act)
        self.down3 = ConvBN(c, c, 3, 2, groups=c, act=act)
        self.bu4 = _fusion(2 * c, c, n, act)
        self.down4 = ConvBN(c, c, 3, 2, groups=c, act=act)
        self.bu5 = _fusion(2 * c, c, n, act)
        self.out_channels = [c, c, c]


class DetectHead(nn.Module):
    """YOLOv8 decoupled anchor-free head: per level a box branch (-> 4*reg_max DFL logits) and a class branch
    (-> nc logits), each two 3x3 conv-BN-act then a 1x1 conv with bias (the 'legacy' v8 class branch)."""

    def __init__(self, in_channels: list[int], num_classes: int, reg_max: int, act: str):
        super().__init__()
        self.nc, self.reg_max = num_classes, reg_max
        c2 = max(16, in_channels[0] // 4, 4 * reg_max)
        c3 = max(in_channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(ConvBN(c, c2, 3, act=act), ConvBN(c2, c2, 3, act=act), nn.Conv2d(c2, 4 * reg_max, 1))
            for c in in_channels)
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBN(c, c3, 3, act=act), ConvBN(c3, c3, 3, act=act), nn.Conv2d(c3, num_classes, 1))
            for c in in_channels)

    def init_bias(self, strides: tuple[int, ...], imgsz: int = 640) -> None:
        """Box logits start flat (bias 1); class bias = log prior of ~5 objects per 640 image per level."""
        with torch.no_grad():
            for box, cls, s in zip(self.box, self.cls, strides):
                box[-1].bias.fill_(1.0)
                cls[-1].bias.fill_(math.log(5 / self.nc / (imgsz / s) ** 2))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [torch.cat((b(x), c(x)), 1) for x, b, c in zip(feats, self.box, self.cls)]


def build_neck_head(in_channels: list[int] | tuple[int, ...], head: HeadConfig) -> tuple[PAN, DetectHead]:
    """The neck `head.neck` behind feature maps of `in_channels`, and the detection head behind it."""
    neck_cls = YoloV8Neck if head.neck == "yolov8" else DepthwiseNeck
    neck = neck_cls(list(in_channels), head.width, head.depth, head.act)
    return neck, DetectHead(neck.out_channels, head.num_classes, head.reg_max, head.act)


class NeckHead(nn.Module):
    """Neck + head + box decoding as one module: (P3, P4, P5) -> decoded (B, A, 4+nc), exactly the part of a
    Detector's eval forward after the backbone. A latency table times it as one op, so backbone + this = detector."""

    def __init__(self, in_channels: list[int] | tuple[int, ...], head: HeadConfig):
        super().__init__()
        self.reg_max = head.reg_max
        self.neck, self.head = build_neck_head(in_channels, head)
        self.head.init_bias(STRIDES)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> Tensor:
        return decode(self.head(self.neck([p3, p4, p5])), STRIDES, self.reg_max)


class Detector(nn.Module):
    """backbone -> neck -> head. `forward` returns raw level maps (B, 4*reg_max+nc, H, W) in training mode and
    decoded (B, A, 4+nc) detections (xyxy pixels, class probabilities) in eval mode. `head_config` is what it was
    built with (`head` is the DetectHead module).

    The input side must be a multiple of 32 (the neck concatenates upsampled and lateral maps).
    """

    def __init__(self, arch: ArchSpec, head: HeadConfig = HeadConfig()):
        super().__init__()
        check_detector(arch, head)
        self.arch, self.head_config = arch, head
        self.reg_max, self.strides = head.reg_max, STRIDES  # what the loss and decoding read
        self.backbone = build_backbone(arch)
        self.neck, self.head = build_neck_head(self.backbone.out_channels, head)
        self.head.init_bias(self.strides)

    def forward(self, x: Tensor) -> list[Tensor] | Tensor:
        # else a cryptic size mismatch inside the neck (skipped while tracing for ONNX: shapes are fixed there)
        if not torch.jit.is_tracing() and (x.shape[-1] % 32 or x.shape[-2] % 32):
            raise ValueError(f"input height and width must be multiples of 32, got {tuple(x.shape[-2:])}")
        preds = self.head(self.neck(self.backbone(x)))
        if self.training:
            return preds
        return decode(preds, self.strides, self.reg_max)


def detector_cost(arch: ArchSpec, head: HeadConfig, imgsz: int) -> tuple[int, int]:
    """(params, MACs) of the whole detector at imgsz (MACs as nas.arch.cost counts them), on the meta device."""
    from nas.arch.cost import count_params, macs_and_output

    with torch.device("meta"):
        model = Detector(arch, head).eval()
    return count_params(model), macs_and_output(model, torch.empty(1, arch.channels, imgsz, imgsz, device="meta"))[0]


def check_detector(arch: ArchSpec, head: HeadConfig) -> None:
    """ConfigError unless `arch` can carry `head`: three feature maps at strides 8/16/32. The head's own fields were
    checked when it was made."""
    strides = arch.stage_strides()
    got = [strides[f] for f in arch.features]
    if tuple(got) != STRIDES:
        listing = ", ".join(f"{n} (stride {s})" for n, s in strides.items())
        raise ConfigError(arch.name, "features",
                          f"the detector needs three feature stages at strides 8, 16, 32; got {list(arch.features)} "
                          f"at strides {got}. Stages: {listing}")
