"""Zero-cost proxies: deterministic, finite on real architectures, ordered the way the papers say, and
failing with a clear ProxyError / UnknownProxyError."""
import math
from dataclasses import replace

import pytest
import torch

from nas.arch.cost import arch_cost
from nas.arch.spec import ArchSpec, BlockSpec, StageSpec
from nas.arch.zoo import get_arch
from nas.errors import NasError
from nas.search import proxies as P
from nas.search.proxies import PROXIES, ProxyError, UnknownProxyError, score, score_all
from nas.space import load_space

RES, BATCH = 64, 4       # small enough for the whole file to run in seconds
FORWARD = [n for n in PROXIES if n not in ("params", "macs")]
DETECTOR = ["tse", "zico"]  # these run the whole detector on DigitsDet images
BACKBONE_ONLY = [n for n in FORWARD if n not in DETECTOR]


@pytest.fixture(autouse=True)
def short_tse(monkeypatch):
    """Two training steps are enough to test tse's contract; its real length is a benchmark matter."""
    monkeypatch.setattr(P, "TSE_STEPS", 2)


def toy(width: int = 1, depth: int = 1, act: str = "relu") -> ArchSpec:
    """Stem + four IB stages (strides 4, 8, 16, 32); `width` multiplies channels, `depth` blocks per stage."""
    def stage(name: str, out: int) -> StageSpec:
        first = BlockSpec("ib", out=out * width, stride=2, kernel=3, expand=4.0, act=act)
        rest = [BlockSpec("ib", out=out * width, kernel=3, expand=4.0, act=act)] * (depth - 1)
        return StageSpec(name, (first, *rest))

    stem = BlockSpec("conv", out=16, stride=2, kernel=3, act=act)
    stages = (stage("s1", 16), stage("s2", 24), stage("s3", 32), stage("s4", 48))
    return ArchSpec(name=f"toy-w{width}-d{depth}", stem=stem, stages=stages, features=("s2", "s3", "s4"),
                    resolution=RES)


def run(arch: ArchSpec, proxy: str, **kw) -> float:
    return score(arch, proxy, resolution=kw.pop("resolution", RES), batch=kw.pop("batch", BATCH), **kw)


@pytest.mark.parametrize("proxy", list(PROXIES))
def test_deterministic_and_leaves_global_rng_alone(proxy):
    arch = toy()
    rng = torch.get_rng_state()
    a, b = run(arch, proxy, seed=3), run(arch, proxy, seed=3)
    assert a == b and math.isfinite(a)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("proxy", FORWARD)
def test_seed_changes_the_draw(proxy):
    arch = toy()
    assert run(arch, proxy, seed=0) != run(arch, proxy, seed=1)


@pytest.mark.parametrize("name", ["mobilenet_v3_small_100", "mobilenet_v2_100", "mobilenet_v4_conv_small",
                                  "mobilenet_v4_hybrid_medium"])
def test_finite_on_zoo_models(name):
    scores = score_all(get_arch(name), resolution=RES, batch=BATCH)
    assert list(scores) == list(PROXIES)
    assert all(math.isfinite(v) for v in scores.values()), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finite_on_space_samples(seed):
    arch = load_space("search_spaces/uib_yolo.yaml").random(seed)
    scores = score_all(arch, resolution=RES, batch=BATCH)
    assert all(math.isfinite(v) for v in scores.values()), scores


@pytest.mark.parametrize("proxy", ["synflow", "params", "macs", "entropy"])
def test_wider_and_deeper_score_higher(proxy):
    base = run(toy(), proxy)
    assert run(toy(width=2), proxy) > base
    assert run(toy(depth=2), proxy) > base


def test_naswot_more_relu_units_score_higher():
    assert run(toy(width=4, depth=3), "naswot") > run(toy(), "naswot") + 1.0


def test_baselines_are_log_counts_at_the_arch_resolution_by_default():
    arch = toy()
    cost = arch_cost(arch)
    assert score(arch, "params") == pytest.approx(math.log(cost.params))
    assert score(arch, "macs") == pytest.approx(math.log(cost.macs))
    assert score(replace(arch, resolution=128), "macs") > score(arch, "macs")


@pytest.mark.parametrize("proxy", BACKBONE_ONLY)
def test_nan_forward_raises_proxy_error(proxy, monkeypatch):
    real = P.build_backbone

    def poisoned(arch, **kw):  # a network whose stem emits NaN
        net = real(arch, **kw)
        net.stem.register_forward_hook(lambda _m, _i, out: out * float("nan"))
        return net

    monkeypatch.setattr(P, "build_backbone", poisoned)
    with pytest.raises(ProxyError) as err:
        run(toy(), proxy)
    assert isinstance(err.value, NasError)
    assert repr(proxy) in str(err.value) and "toy-w1-d1" in str(err.value) and "NaN" in str(err.value)
    assert err.value.proxy == proxy and err.value.arch == "toy-w1-d1"


@pytest.mark.parametrize("proxy", DETECTOR)
def test_detector_proxies_fail_on_a_nan_loss(proxy, monkeypatch):
    from nas.arch import detector as M

    batches = P._digits_batches(RES, BATCH, P.TSE_STEPS, 0)
    assert len(batches) == P.TSE_STEPS and batches[0][0].shape == (BATCH, 3, RES, RES)
    assert len(batches[0][1]) >= BATCH and 0 <= float(batches[0][1][:, 2:].min()) <= float(batches[0][1][:, 2:].max()) <= 1
    real = M.build_backbone

    def poisoned(arch, **kw):
        net = real(arch, **kw)
        net.stem.register_forward_hook(lambda _m, _i, out: out * float("nan"))
        return net

    monkeypatch.setattr(M, "build_backbone", poisoned)
    with pytest.raises(ProxyError, match=f"'{proxy}' failed on arch 'toy-w1-d1': training loss is nan at step 1"):
        run(toy(), proxy)


def test_zico_sums_over_layers_so_deeper_scores_higher():
    assert run(toy(depth=3), "zico") > run(toy(), "zico")


def test_naswot_needs_two_images():
    with pytest.raises(ProxyError, match="at least 2"):
        run(toy(), "naswot", batch=1)


def test_unknown_proxy_suggests_and_lists_valid_names():
    with pytest.raises(UnknownProxyError) as err:
        score(toy(), "synflw")
    msg = str(err.value)
    assert isinstance(err.value, NasError) and 'did you mean "synflow"' in msg and "naswot" in msg
    with pytest.raises(UnknownProxyError, match="gradnorm"):
        score_all(toy(), ["params", "gradnorm"])
