"""Detector = backbone (from an ArchSpec) + PAN neck ("yolov8" C2f or lightweight "dw") + YOLOv8 anchor-free head;
`HeadConfig` is the one type for what follows the backbone. Training mode returns the raw per-level maps the loss
takes; eval mode the decoded (B, A, 4+nc) tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nas.arch.backbone import build_backbone
from nas.arch.blocks import C2f, ConvBN
from nas.arch.decode import decode
from nas.arch.spec import ACTIVATIONS, ArchSpec
from nas.errors import ConfigError

NECKS = ("yolov8", "dw")


@dataclass(frozen=True)
class HeadConfig:
    """What follows the backbone in a Detector: the neck type, its width and depth multipliers, and the number of
    classes. With the backbone's three feature channel counts and the input resolution it fixes the neck+head's
    latency (a latency table stores it as one op, see nas.latency.table.NeckHeadOp)."""

    neck: str = "dw"
    width: float = 0.25
    depth: float = 0.33
    num_classes: int = 10

    def __post_init__(self) -> None:
        src = "detector head"
        if self.neck not in NECKS:
            raise ConfigError(src, "neck", f"unknown neck {self.neck!r}; choose one of {', '.join(NECKS)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(src, "num_classes", f"must be a positive integer, got {self.num_classes!r}")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 4:
                raise ConfigError(src, name, f"must be a number in (0, 4], got {v!r}")


STRIDES = (8, 16, 32)


MAX_CHANNELS = 1024  # ultralytics' max_channels for the n/s scales


def scale_width(channels: int, width: float, max_channels: int = MAX_CHANNELS) -> int:
    """Ultralytics channel scaling: cap, multiply, round *up* to a multiple of 8."""
    return int(math.ceil(min(channels, max_channels) * width / 8) * 8)


def scale_depth(repeats: int, depth: float) -> int:
    return max(round(repeats * depth), 1) if repeats > 1 else repeats


def _upsample() -> nn.Module:
    return nn.Upsample(scale_factor=2.0, mode="nearest")


class YoloV8Neck(nn.Module):
    """YOLOv8 PAN-FPN: top-down (upsample, concat, C2f) then bottom-up (3x3 stride-2 conv, concat, C2f).

    Widths (256, 512, 1024) * width for P3/P4/P5, C2f repeats 3 * depth, no shortcuts (ultralytics head layers).
    """

    def __init__(self, in_channels: list[int], width: float, depth: float, act: str):
        super().__init__()
        c3, c4, c5 = (scale_width(c, width) for c in (256, 512, 1024))
        n = scale_depth(3, depth)
        i3, i4, i5 = in_channels
        self.up = _upsample()
        self.td4 = C2f(i5 + i4, c4, n, False, act)       # P5 up + P4
        self.td3 = C2f(c4 + i3, c3, n, False, act)       # -> P3 out
        self.down3 = ConvBN(c3, c3, 3, 2, act=act)
        self.bu4 = C2f(c3 + c4, c4, n, False, act)       # -> P4 out
        self.down4 = ConvBN(c4, c4, 3, 2, act=act)
        self.bu5 = C2f(c4 + i5, c5, n, False, act)       # -> P5 out
        self.out_channels = [c3, c4, c5]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        o3 = self.td3(torch.cat((self.up(t4), p3), 1))
        o4 = self.bu4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.bu5(torch.cat((self.down4(o4), p5), 1))
        return [o3, o4, o5]


class DSBlock(nn.Sequential):
    """Depthwise-separable fusion: depthwise 3x3 + BN + act, pointwise 1x1 + BN + act."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__(ConvBN(cin, cin, 3, groups=cin, act=act), ConvBN(cin, cout, 1, act=act))


def _fusion(cin: int, cout: int, repeats: int, act: str) -> nn.Sequential:
    return nn.Sequential(DSBlock(cin, cout, act), *(DSBlock(cout, cout, act) for _ in range(repeats - 1)))


class DepthwiseNeck(nn.Module):
    """Lightweight PAN for mobile budgets: 1x1 laterals to one small width, nearest upsample, depthwise 3x3
    stride-2 downsample, concat + depthwise-separable fusion. Width 256 * width (64 at width 0.25)."""

    def __init__(self, in_channels: list[int], width: float, depth: float, act: str):
        super().__init__()
        c = scale_width(256, width)
        n = scale_depth(3, depth)
        self.lateral = nn.ModuleList(ConvBN(ci, c, 1, act=act) for ci in in_channels)
        self.up = _upsample()
        self.td4 = _fusion(2 * c, c, n, act)
        self.td3 = _fusion(2 * c, c, n, act)
        self.down3 = ConvBN(c, c, 3, 2, groups=c, act=act)
        self.bu4 = _fusion(2 * c, c, n, act)
        self.down4 = ConvBN(c, c, 3, 2, groups=c, act=act)
        self.bu5 = _fusion(2 * c, c, n, act)
        self.out_channels = [c, c, c]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        p3, p4, p5 = (m(f) for m, f in zip(self.lateral, feats))
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        o3 = self.td3(torch.cat((self.up(t4), p3), 1))
        o4 = self.bu4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.bu5(torch.cat((self.down4(o4), p5), 1))
        return [o3, o4, o5]


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


def build_neck_head(in_channels: list[int], num_classes: int, neck: str, width: float, depth: float, reg_max: int,
                    act: str) -> tuple[nn.Module, DetectHead]:
    neck_cls = YoloV8Neck if neck == "yolov8" else DepthwiseNeck
    neck_module = neck_cls(list(in_channels), width, depth, act)
    return neck_module, DetectHead(neck_module.out_channels, num_classes, reg_max, act)


class NeckHead(nn.Module):
    """Neck + head + box decoding as one module: (P3, P4, P5) -> decoded (B, A, 4+nc), exactly the part of a
    Detector's eval forward after the backbone. A latency table times it as one op, so backbone + this = detector."""

    def __init__(self, in_channels: list[int] | tuple[int, ...], cfg: HeadConfig, reg_max: int = 16,
                 act: str = "silu"):
        super().__init__()
        self.reg_max = reg_max
        self.neck, self.head = build_neck_head(list(in_channels), cfg.num_classes, cfg.neck, cfg.width, cfg.depth,
                                               reg_max, act)
        self.head.init_bias(STRIDES)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> Tensor:
        return decode(self.head(self.neck([p3, p4, p5])), STRIDES, self.reg_max)


class Detector(nn.Module):
    """backbone -> neck -> head. `forward` returns raw level maps (B, 4*reg_max+nc, H, W) in training mode and
    decoded (B, A, 4+nc) detections (xyxy pixels, class probabilities) in eval mode.

    The input side must be a multiple of 32 (the neck concatenates upsampled and lateral maps).
    """

    def __init__(self, arch: ArchSpec, num_classes: int, neck: str = "yolov8", width: float = 0.25,
                 depth: float = 0.33, reg_max: int = 16, act: str = "silu"):
        super().__init__()
        check_detector_args(arch, num_classes, neck, width, depth, reg_max, act)
        self.arch, self.nc, self.reg_max = arch, num_classes, reg_max
        self.neck_name, self.width, self.depth, self.act = neck, width, depth, act
        self.strides = STRIDES
        self.backbone = build_backbone(arch)
        self.neck, self.head = build_neck_head(list(self.backbone.out_channels), num_classes, neck, width, depth,
                                               reg_max, act)
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
        model = Detector(arch, head.num_classes, neck=head.neck, width=head.width, depth=head.depth).eval()
    return count_params(model), macs_and_output(model, torch.empty(1, arch.channels, imgsz, imgsz, device="meta"))[0]


def check_detector_args(arch: ArchSpec, num_classes: int, neck: str, width: float, depth: float,
                        reg_max: int, act: str = "silu") -> None:
    """ConfigError unless the arch feeds three feature maps at strides 8/16/32 and the sizes make sense."""
    if neck not in NECKS:
        raise ConfigError(arch.name, "neck", f"unknown neck {neck!r}; choose one of {', '.join(NECKS)}")
    strides = arch.stage_strides()
    got = [strides[f] for f in arch.features]
    if tuple(got) != STRIDES:
        listing = ", ".join(f"{n} (stride {s})" for n, s in strides.items())
        raise ConfigError(arch.name, "features",
                          f"the detector needs three feature stages at strides 8, 16, 32; got {list(arch.features)} "
                          f"at strides {got}. Stages: {listing}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(arch.name, "num_classes", f"must be a positive integer, got {num_classes!r}")
    if not 0 < width <= 4 or not 0 < depth <= 4:
        raise ConfigError(arch.name, "width/depth", f"must be in (0, 4], got width={width}, depth={depth}")
    if act not in ACTIVATIONS:
        raise ConfigError(arch.name, "act", f"unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}")
    if not 2 <= reg_max <= 64:
        raise ConfigError(arch.name, "reg_max", f"must be in [2, 64], got {reg_max}")
