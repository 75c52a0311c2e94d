"""The zoo matches the reference implementations' parameter counts and the published multiply-adds."""
import pytest
import torch

from nas.arch.backbone import build_backbone
from nas.arch.cost import arch_cost, count_params
from nas.arch.spec import dumps_arch, loads_arch
from nas.arch.zoo import ZOO, get_arch, get_reference

# Exact counts derived by hand from the layer tables (../shared/reference/mobilenet.md §1.4); they equal
# torchvision's num_params for V2/V3 and round to timm's param_count for the others.
ANALYTIC_PARAMS = {
    "mobilenet_v1_100": 4_231_976, "mobilenet_v2_100": 3_504_872, "mobilenet_v3_large_100": 5_483_032,
    "mobilenet_v3_small_100": 2_542_856, "mobilenet_v4_conv_small": 3_774_024, "mobilenet_v4_conv_medium": 9_715_512,
    "mobilenet_v4_conv_large": 32_590_864, "mobilenet_v4_hybrid_medium": 11_074_648,
}


CLASSIFIERS = [n for n in ZOO if get_reference(n) is not None]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_params_and_macs_match_references(name):
    arch, ref = get_arch(name), get_reference(name)
    cost = arch_cost(arch, ref.resolution, classifier=True)
    assert abs(cost.params / ref.params - 1) < 0.005, (cost.params, ref.params)
    assert abs(cost.macs / ref.macs - 1) < 0.05, (cost.macs, ref.macs)
    assert cost.params == ANALYTIC_PARAMS[name]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_zoo_builds_runs_and_round_trips(name):
    arch = get_arch(name)
    text = dumps_arch(arch)
    assert loads_arch(text) == arch and dumps_arch(loads_arch(text)) == text
    net = build_backbone(arch, classifier=True).eval()
    assert count_params(net) == ANALYTIC_PARAMS[name]  # real module, not the meta-device count
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    feats = build_backbone(arch).eval()(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats] == [16, 8, 4]  # strides 8, 16, 32
    assert [f.shape[1] for f in feats] == arch.feature_channels()


def test_v3_large_details():
    arch = get_arch("mobilenet_v3_large_100")
    blocks = [b for _, _, b, _ in arch.blocks()]
    cins = [c for _, _, _, c in arch.blocks()]
    # expanded widths of the paper's table, from the expansion ratios and make_divisible
    assert [b.mid(c) for b, c in zip(blocks, cins)] == [16, 64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960]
    assert [b.se_width(c) for b, c in zip(blocks, cins) if b.se] == [24, 32, 32, 120, 168, 168, 240, 240]
    assert blocks[0].residual(16)  # the first bneck (16 -> 16, stride 1) keeps its shortcut


def test_v4_stride_sits_on_middle_dw():
    net = build_backbone(get_arch("mobilenet_v4_conv_medium"))
    first = net.stages[1][0]  # ExtraDW 3/5, stride 2
    assert first.dw_start[0].stride == (1, 1) and first.dw_mid[0].stride == (2, 2)
