"""Every op variant x stride x SE x activation builds, runs, has the right shape and follows the residual rules."""
import itertools

import pytest
import torch

from nas.arch.blocks import FusedIB, MobileMQA, SqueezeExcite, UniversalInvertedBottleneck, build_block
from nas.arch.spec import ACTIVATIONS, BlockSpec

UIB_VARIANTS = {
    "ib": dict(kernel=3), "convnext": dict(kernel=5), "extra_dw": dict(kernels=(3, 5)), "ffn": {},
    "fused_ib": dict(kernel=3),
}


def _spec(op, stride, se, act, out):
    return BlockSpec(op, out=out, stride=stride, expand=4.0, se=se, act=act, **UIB_VARIANTS[op])


@pytest.mark.parametrize("op,stride,se,act", [
    (op, s, se, a) for op, s, se, a in itertools.product(UIB_VARIANTS, (1, 2), (0.0, 0.25), ACTIVATIONS)
    if not (op == "ffn" and s == 2)
])
def test_variant_shapes_and_residual(op, stride, se, act):
    torch.manual_seed(0)
    cin = 16
    for out in (16, 24):
        spec = _spec(op, stride, se, act, out)
        m = build_block(spec, cin).eval()
        x = torch.randn(2, cin, 12, 12)
        y = m(x)
        assert y.shape == (2, out, 12 // stride, 12 // stride)
        assert torch.isfinite(y).all()
        assert m.residual == (stride == 1 and out == cin) == spec.residual(cin)
        if m.residual:
            # zero the projection BN's gamma and beta: the branch vanishes, the block becomes the identity
            bn = m.project[1]
            torch.nn.init.zeros_(bn.weight)
            torch.nn.init.zeros_(bn.bias)
            assert torch.allclose(m(x), x)
        has_se = any(isinstance(c, SqueezeExcite) for c in m.modules())
        assert has_se == (se > 0)


def test_uib_variant_structure():
    """IB = middle dw only, ConvNext = start dw only, ExtraDW = both, FFN = none; stride on the middle dw."""
    def dws(m):
        return [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.groups > 1]
    ib = build_block(BlockSpec("ib", out=32, stride=2, kernel=5, expand=4.0, se=0.0, act="relu"), 16)
    cn = build_block(BlockSpec("convnext", out=32, stride=2, kernel=7, expand=4.0, se=0.0, act="relu"), 16)
    xd = build_block(BlockSpec("extra_dw", out=32, stride=2, kernels=(3, 5), expand=4.0, se=0.0, act="relu"), 16)
    ff = build_block(BlockSpec("ffn", out=32, expand=4.0, se=0.0, act="relu"), 16)
    assert [(c.kernel_size[0], c.stride[0], c.in_channels) for c in dws(ib)] == [(5, 2, 64)]
    assert [(c.kernel_size[0], c.stride[0], c.in_channels) for c in dws(cn)] == [(7, 2, 16)]
    assert [(c.kernel_size[0], c.stride[0], c.in_channels) for c in dws(xd)] == [(3, 1, 16), (5, 2, 64)]
    assert dws(ff) == []
    # linear bottleneck: the projection ends in BN, no activation
    for m in (ib, cn, xd, ff):
        assert isinstance(m.project[2], torch.nn.Identity)
    # ConvNext's start dw has no activation (MobileNetV4)
    assert isinstance(cn.dw_start[2], torch.nn.Identity)


def test_se_width_follows_mobilenet_v3():
    # 72 expanded channels -> 18 -> rounded to 24 (not 16, not 18)
    spec = BlockSpec("ib", out=40, stride=2, kernel=5, expand=3.0, se=0.25, act="relu")
    m = build_block(spec, 24)
    se = next(c for c in m.modules() if isinstance(c, SqueezeExcite))
    assert se.reduce.out_channels == 24 and se.reduce.in_channels == 72
    assert isinstance(se.gate, torch.nn.Hardsigmoid)


def test_expand_one_has_no_expansion_conv():
    m = build_block(BlockSpec("ib", out=16, stride=1, kernel=3, expand=1.0, se=0.0, act="relu6"), 32)
    assert isinstance(m, UniversalInvertedBottleneck) and isinstance(m.expand, torch.nn.Identity)
    assert sum(1 for c in m.modules() if isinstance(c, torch.nn.Conv2d)) == 2


def test_fused_ib():
    m = build_block(BlockSpec("fused_ib", out=48, stride=2, kernel=3, expand=4.0, se=0.0, act="relu"), 32)
    assert isinstance(m, FusedIB)
    assert m.conv[0].out_channels == 128 and m.conv[0].kernel_size == (3, 3) and m.conv[0].stride == (2, 2)
    assert m(torch.randn(1, 32, 16, 16)).shape == (1, 48, 8, 8)


@pytest.mark.parametrize("kv_stride", [1, 2])
def test_mobile_mqa(kv_stride):
    torch.manual_seed(0)
    spec = BlockSpec("mqa", out=32, heads=4, key_dim=16, value_dim=16, kv_stride=kv_stride, kernel=3, layer_scale=1e-5)
    m = build_block(spec, 32).eval()
    assert isinstance(m, MobileMQA)
    # one shared key and value projection, one query per head
    assert m.query.out_channels == 64 and m.key.out_channels == 16 and m.value.out_channels == 16
    assert (m.key_down.__class__.__name__ == "Identity") == (kv_stride == 1)
    x = torch.randn(2, 32, 8, 8)
    y = m(x)
    assert y.shape == x.shape
    # layer scale 1e-5 on the branch: output is within a hair of the input
    assert (y - x).abs().max() < 1e-3
    # attention mixes positions: changing one pixel changes outputs elsewhere
    torch.nn.init.ones_(m.scale.gamma)
    x2 = x.clone()
    x2[:, :, 0, 0] += 5
    d = (m(x2) - m(x)).abs()
    assert d[:, :, 7, 7].max() > 0


def test_dsconv_and_conv_have_no_residual():
    for spec in (BlockSpec("dsconv", out=16, stride=1, kernel=3, act="relu6"),
                 BlockSpec("conv", out=16, stride=1, kernel=3, act="relu")):
        m = build_block(spec, 16).eval()
        assert not spec.residual(16)
        assert m(torch.randn(1, 16, 8, 8)).min() >= 0  # ends in an activation, no shortcut
