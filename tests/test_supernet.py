"""The weight-sharing supernet: extracted subnets compute what the supernet computes for them, sampling reaches every
block kind and elastic dimension, BatchNorm recalibration touches statistics only, supernet training resumes where
it stopped, and the `supernet` evaluator scores a real 3-trial search."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import DET
from optuna.trial import TrialState

from nas.arch.elastic import ArchDoesNotFit, Supernet, check_fits
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import BlockSpec, dumps_arch, save_arch
from nas.commands.main import main
from nas.detect.bnstats import calibration_loader, recalibrate_bn
from nas.detect.checkpoint import load_checkpoint, load_detector
from nas.detect.digits import generate_digits
from nas.detect.inherit import inherited_subnet, load_supernet
from nas.detect.loss import DetectionLoss
from nas.detect.supernet import largest_arch, sandwich_loss, smallest_arch, supernet_spec, torch_chooser, train_supernet
from nas.detect.trainconfig import TrainConfig
from nas.errors import ConfigError, NasError
from nas.search.experiment import experiment_from_dict
from nas.search.study import run
from nas.space import rng_chooser, space_from_dict

# Every searchable op (FusedIB beside UIB at s1 and s3), kernels 3/5, expansions incl. 1 (no expansion conv), SE on
# and off, two activations, two depths, two widths per stage; features at strides 8/16/32 for the detector.
RICH = {
    "format": "nas/space@1", "name": "rich", "resolution": [64], "stem": {"out": [8, 16], "act": ["relu", "hswish"]},
    "stages": [
        {"name": "s1", "stride": 2, "depth": [1, 2], "out": [8, 16], "ops": ["fused_ib", "ib", "ffn"], "kernels": [3, 5],
         "expand": [1.0, 2.0], "se": [False, True], "act": ["relu"]},
        {"name": "s2", "stride": 2, "depth": [1, 2], "out": [16, 24], "ops": ["ib", "convnext", "extra_dw", "ffn"],
         "kernels": [3, 5], "expand": [2.0, 4.0], "se": [False, True], "act": ["relu", "hswish"]},
        {"name": "s3", "stride": 2, "depth": [1, 2], "out": [24, 32], "ops": ["ib", "extra_dw", "fused_ib"],
         "kernels": [3, 5], "expand": [2.0, 3.0], "se": [False, True], "act": ["hswish"]},
        {"name": "s4", "stride": 2, "depth": [1, 2], "out": [32, 40], "ops": ["convnext", "ib", "ffn"], "kernels": [3, 5],
         "expand": [2.0], "se": [True], "act": ["relu"]},
    ],
    "features": ["s2", "s3", "s4"],
}
SPACE = space_from_dict(RICH, "rich.yaml")


def _features(arch) -> set[tuple]:
    """What a subnet exercises: (op, start k, middle k, expand) per block, depths and widths per stage."""
    out = set()
    for st in arch.stages:
        out.add(("depth", st.name, len(st.blocks)))
        out.add(("out", st.name, st.blocks[0].out))
        for b in st.blocks:
            out |= {("op", b.op), ("k", b.op, b.start_kernel, b.mid_kernel or b.kernel), ("e", b.expand), ("se", bool(b.se))}
    return out


def _jitter(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and affine weights, so a wrong slice of them shows in the output."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight.data, 0.5, 1.5),
                              (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


@pytest.mark.parametrize("neck", ["dw", "yolov8"])
def test_extracted_subnet_computes_the_supernets_forward(neck):
    torch.manual_seed(0)
    sn = Supernet(supernet_spec(SPACE), largest_arch(SPACE), HeadConfig(neck=neck, num_classes=3))
    _jitter(sn)
    sn.eval()
    archs, seen, rng = [largest_arch(SPACE), smallest_arch(SPACE)], set(), random.Random(0)
    target = set().union(*(_features(SPACE.sample(rng_chooser(random.Random(i)))) for i in range(400)))
    while not target <= seen and len(archs) < 40:  # random subnets until every op, kernel, expansion, depth is in
        a = SPACE.sample(rng_chooser(rng))
        if not _features(a) <= seen:
            archs.append(a)
        seen |= _features(a)
    assert target <= seen | _features(archs[0]) | _features(archs[1])
    assert {f[1] for f in target if f[0] == "op"} == {"ib", "convnext", "extra_dw", "ffn", "fused_ib"}
    if neck == "yolov8":  # the concatenating neck: a few subnets of other feature widths are enough
        archs = archs[:4]
    x = torch.rand(2, 3, 64, 64)
    outs = []
    with torch.no_grad():
        for a in archs:
            y = sn(x, a)
            sub = sn.extract(a)
            assert type(sub).__name__ == "Detector" and sub.arch == a
            assert torch.allclose(y, sub(x), atol=1e-5, rtol=0), a
            outs.append(y)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the subnets differ: the check above is not vacuous


def test_sampling_reaches_every_block_kind_and_elastic_dimension():
    torch.manual_seed(0)
    sn = Supernet(supernet_spec(SPACE), largest_arch(SPACE), HeadConfig(num_classes=3))
    draws = [SPACE.sample(torch_chooser()) for _ in range(300)]
    for st in SPACE.stages:
        blocks = [b for a in draws for s in a.stages if s.name == st.name for b in s.blocks]
        assert {len(s.blocks) for a in draws for s in a.stages if s.name == st.name} == set(st.depth)
        assert {b.op for b in blocks} == set(st.ops), st.name
        assert {b.out for b in blocks} == set(st.out) and {b.expand for b in blocks} == set(st.expand)
        assert {bool(b.se) for b in blocks} == set(st.se) and {b.act for b in blocks} == set(st.act)
        for op in st.ops:
            ks = {(b.start_kernel, b.mid_kernel or (b.kernel if op == "fused_ib" else 0)) for b in blocks if b.op == op}
            assert ks == set(st.kernel_configs(op)), (st.name, op)
    assert {a.stem.out for a in draws} == set(SPACE.stem_out)
    # every shared weight is trained by some subnet: a few sandwich steps' losses reach each parameter
    loss, criterion = sandwich_loss(SPACE, n_random=2), DetectionLoss(3, sn.strides, sn.reg_max)
    sn.train()
    imgs, targets = torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 2, 0.4, 0.6, 0.2, 0.4]])
    for step in range(30):
        loss(sn, criterion, imgs, targets, 64)[0].backward()
        dead = [n for n, p in sn.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        if not dead:
            break
    assert dead == [] and step > 0  # one step's four subnets do not reach them all
    # and an arch the supernet does not hold is refused, naming the block
    big = largest_arch(SPACE)
    wide = replace(big.stages[1], blocks=(replace(big.stages[1].blocks[0], out=48),) + big.stages[1].blocks[1:])
    with pytest.raises(ArchDoesNotFit, match=r"stages.s2.blocks\[0\]"):
        check_fits(sn.spec, replace(big, stages=(big.stages[0], wide, *big.stages[2:])))
    k7 = BlockSpec("ib", out=40, stride=2, kernel=7, expand=2.0, se=0.25, act="relu")
    with pytest.raises(ArchDoesNotFit, match="kernel"):
        check_fits(sn.spec, replace(big, stages=(*big.stages[:3], replace(big.stages[3], blocks=(k7,)))))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sn_digits")
    return str(generate_digits(root, 24, 8, imgsz=64, min_size=10, max_size=28, progress=False, workers=0))


def test_bn_recalibration_changes_only_running_statistics(digits):
    torch.manual_seed(0)
    sn = Supernet(supernet_spec(SPACE), largest_arch(SPACE), HeadConfig(num_classes=10))
    _jitter(sn)
    model = sn.extract(SPACE.sample(rng_chooser(random.Random(3))))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    loader = calibration_loader(digits, 64, 10, 4)
    assert recalibrate_bn(model, loader) == 10
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    changed = {n for n, b in model.named_buffers() if n in stats and not torch.equal(b, stats[n])}
    assert changed == set(stats)
    first = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    recalibrate_bn(model, loader)  # reset, then the same images: the same cumulative average
    for n, b in model.named_buffers():
        if "running" in n:
            assert torch.allclose(b, first[n], atol=1e-6), n


def _exp(det_space, tmp_path, digits, **ev):
    space, table = det_space
    evaluator = {"kind": "supernet", "epochs": 2, "imgsz": 64, "train_batch": 8, "calib_images": 16, "data": digits,
                 **ev}
    return experiment_from_dict({
        "format": "nas/experiment@1", "name": "sn", "space": str(space), "table": str(table), "budget_ms": 1000.0,
        "scope": "backbone", "sampler": "random", "trials": 3, "evaluator": evaluator,
        "output": str(tmp_path / "runs")}, str(tmp_path / "exp.yaml"))


def _config(exp, **kw) -> TrainConfig:
    from nas.search.inherited import supernet_config

    return supernet_config(exp, workers=0, progress=False, threads=1, close_mosaic=1, **kw)


class Stop(Exception):
    pass


def test_supernet_training_resumes_where_it_stopped(det_space, digits, tmp_path):
    exp = _exp(det_space, tmp_path, digits)
    full = train_supernet(exp.space, _config(exp, name="full", tensorboard=False), calib_images=16)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_supernet(exp.space, _config(exp, name="part", tensorboard=False), calib_images=16,
                       on_epoch=stop_after_first)
    assert load_checkpoint(tmp_path / "runs" / "sn" / "part" / "weights" / "last.pt")["epoch"] == 1
    resumed = train_supernet(exp.space, _config(exp, name="part", tensorboard=False), calib_images=16)
    assert resumed.epochs == 2 and [r["epoch"] for r in resumed.history] == [1, 2]
    a, b = load_checkpoint(full.last), load_checkpoint(resumed.last)
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for ha, hb in zip(full.history, resumed.history):
        assert {k: v for k, v in ha.items() if "time" not in k} == {k: v for k, v in hb.items() if "time" not in k}
    with pytest.raises(NasError, match="already finished"):
        train_supernet(exp.space, _config(exp, name="part"), calib_images=16)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**DET, "name": "other"}))
    with pytest.raises(ConfigError, match="another search space"):
        train_supernet(other, _config(exp, name="part"), calib_images=16)


def test_supernet_evaluator_scores_a_three_trial_search(det_space, digits, tmp_path, capsys):
    exp = _exp(det_space, tmp_path, digits)
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump({**{k: v for k, v in exp.to_dict().items() if v is not None},
                                        "evaluator": {k: v for k, v in exp.to_dict()["evaluator"].items()
                                                      if v is not None}}))
    assert main(["supernet", "train", str(exp_file), "--quiet", "--threads", "1", "--workers", "0", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["epochs"] == 2 and list((tmp_path / "runs" / "sn" / "supernet").glob("events.out.tfevents.*"))
    study = run(exp, progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    for t in done:
        assert 0 <= t.value <= 1 and t.value == t.user_attrs["map50_95"] == t.user_attrs["score"]
        assert t.user_attrs["calib_images"] == 16 and t.user_attrs["eval_s"] < 30
    cache = list((exp.run_dir / "supernet_scores").glob("*.json"))
    assert 1 <= len(cache) <= 3
    # a second look at an architecture is a cache hit with the same score
    from nas.search.inherited import SupernetEvaluator

    ev = SupernetEvaluator(exp, space_from_dict(DET))
    arch = yaml.safe_load(done[0].user_attrs["arch"])
    from nas.arch.spec import arch_from_dict

    score, extras = ev(arch_from_dict(arch))
    assert extras["cached"] and score == done[0].value
    # the same subnet extracted to a checkpoint loads as an ordinary detector with the evaluator's weights
    arch_file = save_arch(arch_from_dict(arch), tmp_path / "sub.yaml")
    assert main(["supernet", "extract", str(tmp_path / "runs" / "sn" / "supernet"), str(arch_file), "--out",
                 str(tmp_path / "sub"), "--calib-images", "16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["map50_95"] == pytest.approx(done[0].value, abs=1e-9)
    det = load_detector(tmp_path / "sub" / "weights" / "best.pt")
    ref = inherited_subnet(load_supernet(tmp_path / "runs" / "sn" / "supernet"), arch_from_dict(arch), 16)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, det.state_dict()[k]), k
    assert dumps_arch(det.arch).split("info:")[0] == dumps_arch(arch_from_dict(arch)).split("info:")[0]
