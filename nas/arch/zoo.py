"""Reference architectures (MobileNet V1-V4) written as ArchSpecs, with the published figures they must match.

Stages group blocks by output stride, so `features` names the stride 8/16/32 stages for detection.
Block tables follow the papers and the reference code (timm / TF Model Garden); see docs/ZOO.md for sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nas.arch.spec import ArchSpec, BlockSpec, HeadSpec, StageSpec
from nas.config import suggest
from nas.errors import NasError


# Short constructors keep each table close to the paper's rows.
def conv(k: int, out: int, s: int = 1, act: str = "relu") -> BlockSpec:
    return BlockSpec("conv", out=out, stride=s, kernel=k, act=act)


def ds(k: int, out: int, s: int = 1, act: str = "relu6") -> BlockSpec:
    return BlockSpec("dsconv", out=out, stride=s, kernel=k, act=act)


def ib(k: int, e: float, out: int, s: int = 1, se: float = 0.0, act: str = "relu", ls: float | None = None) -> BlockSpec:
    return BlockSpec("ib", out=out, stride=s, kernel=k, expand=float(e), se=se, act=act, layer_scale=ls)


def cn(k: int, e: float, out: int, s: int = 1, act: str = "relu", ls: float | None = None) -> BlockSpec:
    return BlockSpec("convnext", out=out, stride=s, kernel=k, expand=float(e), se=0.0, act=act, layer_scale=ls)


def xdw(a: int, k: int, e: float, out: int, s: int = 1, act: str = "relu", ls: float | None = None) -> BlockSpec:
    return BlockSpec("extra_dw", out=out, stride=s, kernels=(a, k), expand=float(e), se=0.0, act=act, layer_scale=ls)


def ffn(e: float, out: int, act: str = "relu", ls: float | None = None) -> BlockSpec:
    return BlockSpec("ffn", out=out, expand=float(e), se=0.0, act=act, layer_scale=ls)


def fused(k: int, e: float, out: int, s: int = 1, act: str = "relu") -> BlockSpec:
    return BlockSpec("fused_ib", out=out, stride=s, kernel=k, expand=float(e), se=0.0, act=act)


def mqa(heads: int, key_dim: int, kv_stride: int, out: int, ls: float | None = None) -> BlockSpec:
    return BlockSpec("mqa", out=out, heads=heads, key_dim=key_dim, value_dim=key_dim, kv_stride=kv_stride,
                     kernel=3, layer_scale=ls)


def _arch(name: str, stem: BlockSpec, stages: list[list[BlockSpec]], head: HeadSpec, resolution: int = 224,
          features: tuple[str, ...] | None = None) -> ArchSpec:
    st = tuple(StageSpec(f"s{i + 1}", tuple(b)) for i, b in enumerate(stages))
    arch = ArchSpec(name=name, stem=stem, stages=st, features=(), resolution=resolution, head=head)
    if features is None:  # last stage at each of strides 8, 16, 32
        strides = arch.stage_strides()
        features = tuple(next(n for n in reversed(list(strides)) if strides[n] == s) for s in (8, 16, 32))
    return ArchSpec(name=name, stem=stem, stages=st, features=features, resolution=resolution, head=head)


def mobilenet_v1_100() -> ArchSpec:
    return _arch("mobilenet_v1_100", conv(3, 32, 2, "relu6"), [
        [ds(3, 64)],
        [ds(3, 128, 2), ds(3, 128)],
        [ds(3, 256, 2), ds(3, 256)],
        [ds(3, 512, 2)] + [ds(3, 512)] * 5,
        [ds(3, 1024, 2), ds(3, 1024)],
    ], HeadSpec(dropout=0.2))


def mobilenet_v2_100() -> ArchSpec:
    a = "relu6"
    return _arch("mobilenet_v2_100", conv(3, 32, 2, a), [
        [ib(3, 1, 16, act=a)],
        [ib(3, 6, 24, 2, act=a), ib(3, 6, 24, act=a)],
        [ib(3, 6, 32, 2, act=a)] + [ib(3, 6, 32, act=a)] * 2,
        [ib(3, 6, 64, 2, act=a)] + [ib(3, 6, 64, act=a)] * 3 + [ib(3, 6, 96, act=a)] * 3,
        [ib(3, 6, 160, 2, act=a)] + [ib(3, 6, 160, act=a)] * 2 + [ib(3, 6, 320, act=a)],
    ], HeadSpec(conv=1280, act=a, dropout=0.2))


def mobilenet_v3_large_100() -> ArchSpec:
    re, hs = "relu", "hswish"
    return _arch("mobilenet_v3_large_100", conv(3, 16, 2, hs), [
        [ib(3, 1, 16, act=re)],
        [ib(3, 4, 24, 2, act=re), ib(3, 3, 24, act=re)],
        [ib(5, 3, 40, 2, 0.25, re)] + [ib(5, 3, 40, 1, 0.25, re)] * 2,
        [ib(3, 6, 80, 2, act=hs), ib(3, 2.5, 80, act=hs), ib(3, 2.3, 80, act=hs), ib(3, 2.3, 80, act=hs),
         ib(3, 6, 112, 1, 0.25, hs), ib(3, 6, 112, 1, 0.25, hs)],
        [ib(5, 6, 160, 2, 0.25, hs)] + [ib(5, 6, 160, 1, 0.25, hs)] * 2,
    ], HeadSpec(conv=960, hidden=1280, hidden_norm=False, act=hs, dropout=0.2))


def mobilenet_v3_small_100() -> ArchSpec:
    re, hs = "relu", "hswish"
    return _arch("mobilenet_v3_small_100", conv(3, 16, 2, hs), [
        [ib(3, 1, 16, 2, 0.25, re)],
        [ib(3, 4.5, 24, 2, act=re), ib(3, 3.67, 24, act=re)],
        [ib(5, 4, 40, 2, 0.25, hs)] + [ib(5, 6, 40, 1, 0.25, hs)] * 2 + [ib(5, 3, 48, 1, 0.25, hs)] * 2,
        [ib(5, 6, 96, 2, 0.25, hs)] + [ib(5, 6, 96, 1, 0.25, hs)] * 2,
    ], HeadSpec(conv=576, hidden=1024, hidden_norm=False, act=hs, dropout=0.2))


V4_HEAD = HeadSpec(conv=960, hidden=1280, hidden_norm=True, act="relu", dropout=0.2)


def mobilenet_v4_conv_small() -> ArchSpec:
    # Reference code builds the paper's two "FusedIB" rows as plain conv-BN-ReLU pairs (both with activation).
    return _arch("mobilenet_v4_conv_small", conv(3, 32, 2), [
        [conv(3, 32, 2), conv(1, 32)],
        [conv(3, 96, 2), conv(1, 64)],
        [xdw(5, 5, 3, 96, 2)] + [ib(3, 2, 96)] * 4 + [cn(3, 4, 96)],
        [xdw(3, 3, 6, 128, 2), xdw(5, 5, 4, 128), ib(5, 4, 128), ib(5, 3, 128), ib(3, 4, 128), ib(3, 4, 128)],
    ], HeadSpec(conv=960, hidden=1280, hidden_norm=True, act="relu", dropout=0.3))


def mobilenet_v4_conv_medium() -> ArchSpec:
    return _arch("mobilenet_v4_conv_medium", conv(3, 32, 2), [
        [fused(3, 4, 48, 2)],
        [xdw(3, 5, 4, 80, 2), xdw(3, 3, 2, 80)],
        [xdw(3, 5, 6, 160, 2), xdw(3, 3, 4, 160), xdw(3, 3, 4, 160), xdw(3, 5, 4, 160), xdw(3, 3, 4, 160),
         cn(3, 4, 160), ffn(2, 160), cn(3, 4, 160)],
        [xdw(5, 5, 6, 256, 2), xdw(5, 5, 4, 256), xdw(3, 5, 4, 256), xdw(3, 5, 4, 256), ffn(4, 256),
         cn(3, 4, 256), xdw(3, 5, 2, 256), xdw(5, 5, 4, 256), ffn(4, 256), ffn(4, 256), cn(5, 2, 256)],
    ], V4_HEAD, resolution=256)


def mobilenet_v4_conv_large() -> ArchSpec:
    return _arch("mobilenet_v4_conv_large", conv(3, 24, 2), [
        [fused(3, 4, 48, 2)],
        [xdw(3, 5, 4, 96, 2), xdw(3, 3, 4, 96)],
        [xdw(3, 5, 4, 192, 2)] + [xdw(3, 3, 4, 192)] * 3 + [xdw(3, 5, 4, 192)] + [xdw(5, 3, 4, 192)] * 5
        + [cn(3, 4, 192)],
        [xdw(5, 5, 4, 512, 2)] + [xdw(5, 5, 4, 512)] * 3 + [cn(5, 4, 512), xdw(5, 3, 4, 512)]
        + [cn(5, 4, 512)] * 2 + [xdw(5, 3, 4, 512), xdw(5, 5, 4, 512)] + [cn(5, 4, 512)] * 3,
    ], V4_HEAD, resolution=384)


def mobilenet_v4_hybrid_medium() -> ArchSpec:
    # Follows the released block specs (TF Model Garden == timm), which differ from the paper's Table 14.
    ls = 1e-5  # layer scale on every UIB and MQA block of the hybrid models
    return _arch("mobilenet_v4_hybrid_medium", conv(3, 32, 2), [
        [fused(3, 4, 48, 2)],
        [xdw(3, 5, 4, 80, 2, ls=ls), xdw(3, 3, 2, 80, ls=ls)],
        [xdw(3, 5, 6, 160, 2, ls=ls), ffn(2, 160, ls=ls), xdw(3, 3, 4, 160, ls=ls), xdw(3, 5, 4, 160, ls=ls),
         mqa(4, 64, 2, 160, ls), xdw(3, 3, 4, 160, ls=ls), mqa(4, 64, 2, 160, ls), cn(3, 4, 160, ls=ls),
         mqa(4, 64, 2, 160, ls), xdw(3, 3, 4, 160, ls=ls), mqa(4, 64, 2, 160, ls), cn(3, 4, 160, ls=ls)],
        [xdw(5, 5, 6, 256, 2, ls=ls), xdw(5, 5, 4, 256, ls=ls), xdw(3, 5, 4, 256, ls=ls), xdw(3, 5, 4, 256, ls=ls),
         ffn(2, 256, ls=ls), xdw(3, 5, 2, 256, ls=ls), ffn(2, 256, ls=ls), ffn(4, 256, ls=ls),
         mqa(4, 64, 1, 256, ls), cn(3, 4, 256, ls=ls), mqa(4, 64, 1, 256, ls), xdw(5, 5, 4, 256, ls=ls),
         mqa(4, 64, 1, 256, ls), cn(5, 4, 256, ls=ls), mqa(4, 64, 1, 256, ls), cn(5, 4, 256, ls=ls)],
    ], V4_HEAD, resolution=256)


def yolov8n_csp() -> ArchSpec:
    """The YOLOv8-n backbone (width 0.25, depth 0.33): the "stock YOLO" baseline. No ImageNet head."""
    c = lambda out: conv(3, out, 2, "silu")  # noqa: E731
    c2f = lambda out, n: BlockSpec("c2f", out=out, repeats=n, shortcut=True, act="silu")  # noqa: E731
    st = [[c(32), c2f(32, 1)], [c(64), c2f(64, 2)], [c(128), c2f(128, 2)],
          [c(256), c2f(256, 1), BlockSpec("sppf", out=256, kernel=5, act="silu")]]
    stages = tuple(StageSpec(f"s{i + 1}", tuple(b)) for i, b in enumerate(st))
    return ArchSpec(name="yolov8n_csp", stem=conv(3, 16, 2, "silu"), stages=stages, features=("s2", "s3", "s4"),
                    resolution=640)


@dataclass(frozen=True)
class Reference:
    """Published figures a zoo model must match (params with the 1000-class head, MACs at `resolution`)."""

    params: int
    params_source: str
    macs: float            # multiply-adds
    macs_source: str
    resolution: int


ZOO: dict[str, tuple[Callable[[], ArchSpec], Reference | None]] = {
    "mobilenet_v1_100": (mobilenet_v1_100, Reference(
        4_230_000, "timm mobilenetv1_100 param_count 4.23M", 569e6, "MobileNetV1 paper Table 6 (569M)", 224)),
    "mobilenet_v2_100": (mobilenet_v2_100, Reference(
        3_504_872, "torchvision mobilenet_v2 num_params", 300e6, "MobileNetV2 paper Table 4 (300M)", 224)),
    "mobilenet_v3_large_100": (mobilenet_v3_large_100, Reference(
        5_483_032, "torchvision mobilenet_v3_large num_params", 219e6, "MobileNetV3 paper Table 3 (219M)", 224)),
    "mobilenet_v3_small_100": (mobilenet_v3_small_100, Reference(
        2_542_856, "torchvision mobilenet_v3_small num_params", 56e6, "MobileNetV3 paper Table 3, final version (56M)", 224)),
    "mobilenet_v4_conv_small": (mobilenet_v4_conv_small, Reference(
        3_770_000, "timm mobilenetv4_conv_small param_count 3.77M", 0.19e9,
        "timm benchmark infer_gmacs 0.19 @224 (paper Table 6: '0.2G')", 224)),
    "mobilenet_v4_conv_medium": (mobilenet_v4_conv_medium, Reference(
        9_720_000, "timm mobilenetv4_conv_medium param_count 9.72M", 1.10e9,
        "timm benchmark infer_gmacs 1.10 @256 (paper Table 6: '1.0G')", 256)),
    "mobilenet_v4_conv_large": (mobilenet_v4_conv_large, Reference(
        32_590_000, "timm mobilenetv4_conv_large param_count 32.59M", 6.43e9,
        "timm benchmark infer_gmacs 6.43 @384 (paper Table 6: '5.9G')", 384)),
    "mobilenet_v4_hybrid_medium": (mobilenet_v4_hybrid_medium, Reference(
        11_070_000, "timm mobilenetv4_hybrid_medium param_count 11.07M", 1.29e9,
        "timm benchmark infer_gmacs 1.29 @256 (paper Table 6: '1.2G')", 256)),
    # Detection baseline without an ImageNet head; the whole YOLOv8-n detector is checked in tests/test_model.py.
    "yolov8n_csp": (yolov8n_csp, None),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def get_arch(name: str) -> ArchSpec:
    """A zoo model by name; an unknown name raises NasError listing the valid ones."""
    if name not in ZOO:
        raise NasError(f"unknown zoo model {name!r}{suggest(name, ZOO)}; available: {', '.join(ZOO)}")
    return ZOO[name][0]()


def get_reference(name: str) -> Reference | None:
    return ZOO[name][1]
