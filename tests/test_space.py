"""Search spaces: size, fixed Optuna parameters, reproducible sampling, op coverage, precise errors."""
import random
from pathlib import Path

import optuna
import pytest
import torch

from nas.arch.backbone import build_backbone
from nas.config import load_yaml
from nas.errors import ConfigError
from nas.space import load_space, rng_chooser, space_from_dict, trial_chooser

ROOT = Path(__file__).resolve().parents[1]
SPACE_FILE = ROOT / "search_spaces" / "uib_yolo.yaml"


@pytest.fixture(scope="module")
def space():
    return load_space(SPACE_FILE)


def test_size_is_large(space):
    assert space.log10_size() >= 15


def test_size_counts_exactly_on_a_tiny_space():
    d = {"format": "nas/space@1", "name": "tiny", "resolution": [64], "stem": {"out": [8], "act": ["relu"]},
         "stages": [{"name": "a", "stride": 2, "depth": [1, 2], "out": [8], "ops": ["ib", "ffn"], "kernels": [3, 5],
                     "expand": [2.0], "se": [False], "act": ["relu"]}],
         "features": ["a"]}
    space = space_from_dict(d, "tiny")
    # enumerate by brute force over every parameter combination
    import itertools
    params = space.parameters()
    archs = set()
    for combo in itertools.product(*params.values()):
        v = dict(zip(params, combo))
        archs.add(space.sample(lambda name, choices: v[name], name="x"))
    assert len(archs) == round(10 ** space.log10_size())
    # every block of every architecture is among the ops the table must cover
    ops = set(space.ops())
    for a in archs:
        for _, _, b, cin in a.blocks():
            assert any(o == b and s[0] == cin for o, s in ops)


def test_optuna_parameters_are_fixed(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names = None
    for _ in range(5):
        trial = study.ask()
        space.sample(trial_chooser(trial), name=f"t{trial.number}")
        study.tell(trial, 0.0)
        assert set(trial.params) == set(space.parameters())
        names = names or list(trial.params)
        assert list(trial.params) == names
    dists = study.trials[0].distributions
    for t in study.trials[1:]:
        assert t.distributions == dists


def test_sampling_is_reproducible_and_valid(space):
    a = [space.random(s) for s in range(10)]
    b = [space.random(s) for s in range(10)]
    assert a == b
    assert len({x for x in a}) == 10
    ops = {(o, s) for o, s in space.ops()}
    for arch in a:
        strides = arch.stage_strides()
        assert [strides[f] for f in arch.features] == [8, 16, 32]
        h = arch.resolution // 2
        for _, _, blk, cin in arch.blocks():
            assert (blk, (cin, h, h)) in ops
            h //= blk.stride
    net = build_backbone(a[0]).eval()
    feats = net(torch.randn(1, 3, a[0].resolution, a[0].resolution))
    assert [f.shape[1] for f in feats] == a[0].feature_channels()


def _bad(tmp_path, mutate):
    d = load_yaml(SPACE_FILE)
    mutate(d)
    p = tmp_path / "space.yaml"
    import yaml
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("mutate,field,words", [
    (lambda d: d["stages"][0].update(out=[20]), "stages.s1.out[0]", "multiples of 8"),
    (lambda d: d["stages"][0].update(ops=["ib", "uib"]), "stages.s1.ops[1]", "unknown op"),
    (lambda d: d["stages"][0].update(kernels=[3, 4]), "stages.s1.kernels[1]", "odd"),
    (lambda d: d["stages"][0].update(depth=[]), "stages.s1.depth", "at least one"),
    (lambda d: d["stages"][0].update(act=["relu", "swsh"]), "stages.s1.act[1]", "unknown activation"),
    (lambda d: d.update(features=["s2", "s7"]), "features[1]", "no stage named"),
    (lambda d: d["stages"][0].update(expnd=[2.0]), "stages[0].expnd", 'did you mean "expand"'),
    (lambda d: d.update(resolution=[250]), "resolution[0]", "multiple of 32"),
    (lambda d: d.update(format="nas/arch@1"), "format", "search space"),
    (lambda d: d["stages"][1].update(ops=["ffn"]), "stages.s2.ops", "depthwise"),
])
def test_bad_space_files(tmp_path, mutate, field, words):
    p = _bad(tmp_path, mutate)
    with pytest.raises(ConfigError) as e:
        load_space(p)
    assert e.value.field == field, str(e.value)
    assert words in str(e.value) and str(p) in str(e.value)


def test_rng_and_trial_choosers_agree_on_parameter_set(space):
    seen = []
    space.sample(lambda n, c: seen.append(n) or c[0])
    assert seen == list(space.parameters())
    space.sample(rng_chooser(random.Random(1)))
