"""The building blocks: conv-BN-act, MobileNetV1 separable conv, the Universal Inverted Bottleneck family,
FusedIB, squeeze-excite and Mobile MQA. Each block gets concrete widths; no rounding happens here."""
from __future__ import annotations

import torch
from torch import nn

from nas.arch.spec import BlockSpec

ACT_LAYERS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU,
}


def make_act(name: str | None) -> nn.Module:
    """A fresh activation module (never shared, never a class-level default)."""
    if name is None:
        return nn.Identity()
    return ACT_LAYERS[name]()


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional activation, 'same' padding for odd kernels."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: str | None = None):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            make_act(act),
        )


class SqueezeExcite(nn.Module):
    """MobileNetV3 SE: pool -> 1x1 (bias) -> ReLU -> 1x1 (bias) -> hard-sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (MobileNetV4 hybrid models)."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise kxk + BN + act, pointwise 1x1 + BN + act; no shortcut."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.dw = ConvBN(cin, cin, kernel, stride, groups=cin, act=act)
        self.pw = ConvBN(cin, cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class UniversalInvertedBottleneck(nn.Module):
    """UIB: [start dw] -> [expand 1x1] -> [middle dw] -> [SE] -> project 1x1 (linear) -> [layer scale] (+ x).

    IB = middle dw only, ConvNext = start dw only, ExtraDW = both, FFN = neither. The stride sits on the
    middle dw when there is one, otherwise on the start dw. The start dw has no activation (MobileNetV4).
    `mid=None` leaves the expansion conv out (expand 1 with a depthwise conv, as in MobileNetV2's first block).
    """

    def __init__(self, cin: int, cout: int, mid: int | None, start_k: int, mid_k: int, stride: int, se: int,
                 act: str, layer_scale: float | None = None):
        super().__init__()
        if stride != 1 and not (start_k or mid_k):
            raise ValueError("a UIB block without depthwise convs cannot have stride 2")
        self.dw_start = ConvBN(cin, cin, start_k, 1 if mid_k else stride, groups=cin) if start_k else nn.Identity()
        self.expand = ConvBN(cin, mid, 1, act=act) if mid is not None else nn.Identity()
        mid = cin if mid is None else mid
        self.dw_mid = ConvBN(mid, mid, mid_k, stride, groups=mid, act=act) if mid_k else nn.Identity()
        self.se = SqueezeExcite(mid, se) if se else nn.Identity()
        self.project = ConvBN(mid, cout, 1)
        self.scale = LayerScale(cout, layer_scale) if layer_scale else nn.Identity()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale(self.project(self.se(self.dw_mid(self.expand(self.dw_start(x))))))
        return x + y if self.residual else y


class FusedIB(nn.Module):
    """Fused inverted bottleneck: full kxk conv expands (BN + act), [SE], 1x1 projects (linear)."""

    def __init__(self, cin: int, cout: int, mid: int, kernel: int, stride: int, se: int, act: str):
        super().__init__()
        self.conv = ConvBN(cin, mid, kernel, stride, act=act)
        self.se = SqueezeExcite(mid, se) if se else nn.Identity()
        self.project = ConvBN(mid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.conv(x)))
        return x + y if self.residual else y


class MobileMQA(nn.Module):
    """Mobile multi-query attention (MobileNetV4 hybrid): pre-norm BN, per-head queries, one shared key
    and value projection, keys/values optionally downsampled by a depthwise conv + BN, residual."""

    def __init__(self, cin: int, cout: int, heads: int, key_dim: int, value_dim: int, kv_stride: int,
                 kernel: int, layer_scale: float | None = None):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.norm = nn.BatchNorm2d(cin)
        self.query = nn.Conv2d(cin, heads * key_dim, 1, bias=False)
        down = (lambda: ConvBN(cin, cin, kernel, kv_stride, groups=cin)) if kv_stride > 1 else nn.Identity
        self.key_down, self.value_down = down(), down()
        self.key = nn.Conv2d(cin, key_dim, 1, bias=False)
        self.value = nn.Conv2d(cin, value_dim, 1, bias=False)
        self.out = nn.Conv2d(heads * value_dim, cout, 1, bias=False)
        self.scale = LayerScale(cout, layer_scale) if layer_scale else nn.Identity()
        self.residual = cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.norm(x)
        q = self.query(t).reshape(b, self.heads, self.key_dim, h * w).transpose(2, 3)   # b, heads, hw, kd
        k = self.key(self.key_down(t)).flatten(2).unsqueeze(1)                           # b, 1, kd, hw'
        v = self.value(self.value_down(t)).flatten(2).transpose(1, 2).unsqueeze(1)       # b, 1, hw', vd
        attn = torch.softmax((q @ k) * self.key_dim ** -0.5, dim=-1)                     # b, heads, hw, hw'
        o = (attn @ v).transpose(2, 3).reshape(b, self.heads * self.value_dim, h, w)
        y = self.scale(self.out(o))
        return x + y if self.residual else y


class C2f(nn.Module):
    """YOLOv8 CSP block: 1x1 conv splits into two halves, `repeats` 3x3-3x3 bottlenecks chain on the second,
    every intermediate output is concatenated and fused by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, repeats: int, shortcut: bool, act: str):
        super().__init__()
        self.hidden = cout // 2
        self.split = ConvBN(cin, 2 * self.hidden, 1, act=act)
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(ConvBN(self.hidden, self.hidden, 3, act=act), ConvBN(self.hidden, self.hidden, 3, act=act))
            for _ in range(repeats))
        self.shortcut = shortcut
        self.fuse = ConvBN((2 + repeats) * self.hidden, cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.split(x).chunk(2, 1))
        for m in self.bottlenecks:
            y = m(ys[-1])
            ys.append(ys[-1] + y if self.shortcut else y)
        return self.fuse(torch.cat(ys, 1))


class SPPF(nn.Module):
    """YOLOv8 fast spatial pyramid pooling: three chained max-pools of one kernel, concatenated."""

    def __init__(self, cin: int, cout: int, kernel: int, act: str):
        super().__init__()
        self.reduce = ConvBN(cin, cin // 2, 1, act=act)
        self.pool = nn.MaxPool2d(kernel, 1, kernel // 2)
        self.fuse = ConvBN(cin // 2 * 4, cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.reduce(x)]
        for _ in range(3):
            ys.append(self.pool(ys[-1]))
        return self.fuse(torch.cat(ys, 1))


def build_block(spec: BlockSpec, cin: int) -> nn.Module:
    """The nn.Module for one BlockSpec given its input width; an explicit map, no name lookups."""
    op = spec.op
    if op == "conv":
        return ConvBN(cin, spec.out, spec.kernel, spec.stride, act=spec.act)
    if op == "dsconv":
        return DepthwiseSeparable(cin, spec.out, spec.kernel, spec.stride, spec.act)
    if op in ("ib", "convnext", "extra_dw", "ffn"):
        skip_expand = spec.expand == 1.0 and (spec.start_kernel or spec.mid_kernel)
        return UniversalInvertedBottleneck(cin, spec.out, None if skip_expand else spec.mid(cin),
                                           spec.start_kernel, spec.mid_kernel,
                                           spec.stride, spec.se_width(cin), spec.act, spec.layer_scale)
    if op == "fused_ib":
        return FusedIB(cin, spec.out, spec.mid(cin), spec.kernel, spec.stride, spec.se_width(cin), spec.act)
    if op == "mqa":
        return MobileMQA(cin, spec.out, spec.heads, spec.key_dim, spec.value_dim, spec.kv_stride, spec.kernel,
                         spec.layer_scale)
    if op == "c2f":
        return C2f(cin, spec.out, spec.repeats, spec.shortcut, spec.act)
    if op == "sppf":
        return SPPF(cin, spec.out, spec.kernel, spec.act)
    raise ValueError(f"unknown op {op!r}")
