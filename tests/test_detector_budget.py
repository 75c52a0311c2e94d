"""Whole-detector budgets: the neck+head as one latency-table op, predictions of backbone + neck+head, `nas lut extend
--detector`, detector-scope searches and the exports that measure the whole detector."""
import copy
import json
import math

import pytest
import torch
import yaml
from conftest import DET, FAST

from nas.arch.detector import Detector, NeckHead
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import dumps_arch, load_arch, loads_arch
from nas.commands.main import main
from nas.errors import ConfigError
from nas.latency.coverage import neckhead_op, space_neckhead_ops
from nas.latency.profile import measure
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable, LatencyTableError
from nas.search.experiment import experiment_from_dict
from nas.search.study import run
from nas.space import space_from_dict

# DET (conftest) feeds a detector (features at strides 8/16/32) and has two P3 widths, so two neck+head ops.
HEAD = HeadConfig(neck="dw", width=0.25, depth=0.33, num_classes=3)


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """(folder, space, table with backbone ops only, table with the neck+head ops too)."""
    d = tmp_path_factory.mktemp("det")
    (d / "space.yaml").write_text(yaml.safe_dump(DET))
    space = space_from_dict(DET, str(d / "space.yaml"))
    backbone = LatencyTable.new(FAST, "det-backbone")
    backbone.extend(space.ops(), path=d / "backbone.csv", progress=False)
    full = LatencyTable.loads(backbone.dumps(), "full")
    n = full.extend(space_neckhead_ops(space, HEAD), path=d / "full.csv", progress=False)
    assert n == 2
    return d, space, LatencyTable.load(d / "backbone.csv"), LatencyTable.load(d / "full.csv")


def test_neckhead_op_key_shapes_and_module_equal_the_detector_after_its_backbone(det):
    _, space, _, _ = det
    arch = space.random(0)
    op = neckhead_op(arch, HEAD)
    c3 = arch.feature_channels()[0]
    assert op.key == f"neckhead neck=dw width=0.25 depth=0.33 classes=3 in={c3}/24/32 res=64"
    assert op.shapes == ((c3, 8, 8), (24, 4, 4), (32, 2, 2))
    torch.manual_seed(0)
    detector = Detector(arch, HEAD).eval()
    module = op.build().eval()
    assert isinstance(module, NeckHead)
    module.load_state_dict({k: v for k, v in detector.state_dict().items() if not k.startswith("backbone.")})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(module(*detector.backbone(x)), detector(x), atol=1e-5)


def test_detector_prediction_is_backbone_plus_the_neckhead_entry(det):
    _, space, _, full = det
    full = copy.deepcopy(full)  # the calibration (fitted on backbones) scales the backbone, not the neck+head entry
    full.header["calibration"] = {"scale": 1.1, "archs": 3, "seed": 0, "fitted": "test"}
    for seed in range(5):
        arch = space.random(seed)
        backbone, whole = full.predict(arch), full.predict(arch, HEAD)
        name, key, us = whole.blocks[-1]
        assert name == "neck+head" and key == neckhead_op(arch, HEAD).key
        assert whole.blocks[:-1] == backbone.blocks
        assert whole.total_us == pytest.approx(backbone.total_us + getattr(full.entries[key], full.column))


def test_missing_neckhead_entry_names_the_command_that_adds_it(det):
    _, space, backbone, _ = det
    with pytest.raises(LatencyTableError) as e:
        backbone.predict(space.random(0), HEAD)
    msg = str(e.value)
    assert "neck+head: neckhead neck=dw" in msg
    assert "nas lut extend" in msg and "--detector --neck dw --classes 3" in msg and "--width" not in msg


def test_space_with_features_at_other_strides_is_refused(tiny_space):
    with pytest.raises(ConfigError, match="strides 8, 16, 32"):
        list(space_neckhead_ops(tiny_space, HEAD))
    with pytest.raises(ConfigError, match="neck"):
        HeadConfig(neck="fpn")


def test_neckhead_measures_on_onnxruntime(det):
    _, space, _, _ = det
    op = neckhead_op(space.random(1), HEAD)
    m = measure(op.build(), op.shapes, Protocol(backend="onnxruntime-cpu", warmup_runs=1, warmup_s=0.0, repeats=3,
                                                min_time_s=0.0, reference=False))
    assert m.n >= 3 and m.median_us > 0


def test_lut_extend_and_show_detector_command_line(det, tmp_path, capsys):
    d, space, backbone, full = det
    path = tmp_path / "t.csv"
    path.write_text(backbone.dumps())  # not save(): it would repoint the shared fixture at this file
    argv = ["lut", "extend", str(path), "--space", str(d / "space.yaml"), "--detector", "--classes", "3", "--quiet"]
    assert main(argv) == 0
    assert "2 ops added" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 ops added" in capsys.readouterr().out
    (tmp_path / "a.yaml").write_text(dumps_arch(space.random(2)))
    assert main(["lut", "show", str(path), "--arch", str(tmp_path / "a.yaml"), "--detector", "--classes", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scope"] == "detector" and out["blocks"][-1]["block"] == "neck+head"
    assert main(["lut", "extend", str(path), "--space", str(d / "space.yaml"), "--detector", "--classes", "0"]) == 2
    assert "--classes" in capsys.readouterr().err


def _exp(d, table, out, **kw):
    spec = {"format": "nas/experiment@1", "name": "det", "space": str(d / "space.yaml"), "table": str(table.path),
            "budget_ms": 1e4, "mode": "pareto", "sampler": "random", "trials": 4, "num_classes": 3,
            "tensorboard_every": 0, "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
            "output": str(out)}
    spec.update(kw)
    return experiment_from_dict(spec, "exp.yaml")


def test_detector_is_the_default_scope(det, tmp_path):
    d, _, _, full = det
    exp = _exp(d, full, tmp_path)
    assert exp.scope == "detector" and exp.head == HEAD
    assert _exp(d, full, tmp_path, scope="backbone").head is None


def test_detector_scope_search_predicts_the_whole_detector_and_export_measures_it(det, tmp_path, capsys):
    d, space, _, full = det
    exp = _exp(d, full, tmp_path / "runs")
    study = run(exp, progress=False)
    for t in study.trials:
        a = t.user_attrs
        assert a["scope"] == "detector" and a["detector"] == {"neck": "dw", "width": 0.25, "depth": 0.33,
                                                              "num_classes": 3}
        assert a["latency_breakdown_us"][-1][0] == "neck+head"
        assert math.isclose(a["predicted_ms"], full.predict(loads_arch(a["arch"]), HEAD).total_ms, rel_tol=1e-3)
    assert main(["export", str(exp.run_dir), "--pick", "knee", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    info = load_arch(out["arch"]).info
    assert info["scope"] == "detector" and info["neck"] == "dw" and info["num_classes"] == 3
    assert out["measured_ms"] > 0  # the whole detector: far above the backbone alone
    assert out["measured_ms"] > 0.5 * out["predicted_ms"]


def test_detector_scope_refuses_before_the_first_trial(det, tiny_dir, tiny_table, tmp_path, capsys):
    d, _, backbone, _ = det
    with pytest.raises(LatencyTableError, match="--detector --neck dw --classes 3"):
        run(_exp(d, backbone, tmp_path / "a"), progress=False)
    bad = experiment_from_dict({"format": "nas/experiment@1", "name": "s", "space": str(tiny_dir / "space.yaml"),
                                "table": str(tiny_table.path), "budget_ms": 10.0, "trials": 1,
                                "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
                                "output": str(tmp_path / "b")}, "exp.yaml")
    with pytest.raises(ConfigError) as e:
        run(bad, progress=False)
    assert e.value.field == "scope" and "--budget-scope backbone" in e.value.message
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump({**bad.to_dict(), "output": str(tmp_path / "c")}))
    for flag in ("--budget-scope", "--scope"):  # the name, and the old one
        assert main(["search", str(exp_file), "--quiet", flag, "backbone", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["trials"]["complete"] == 1


def test_validate_whole_detectors(det):
    from nas.latency.validate import validate

    _, space, _, full = det
    archs = [space.random(i) for i in range(3)]
    report = validate(full, archs, FAST, progress=False, head=HEAD)
    assert report.n == 3
    for arch, row in zip(archs, report.rows):
        assert row["predicted_us"] == pytest.approx(full.predict(arch, HEAD).total_us, abs=0.1)
        assert row["blocks"] == len(full.predict(arch).blocks) + 1 and row["measured_us"] > 0


def test_short_training_data_must_match_the_budgeted_classes(det, tmp_path):
    d, _, _, full = det
    exp = _exp(d, full, tmp_path, evaluator={"kind": "train", "epochs": 1, "imgsz": 64})  # DigitsDet: 10 classes
    with pytest.raises(ConfigError) as e:
        run(exp, progress=False)
    assert e.value.field == "num_classes" and "set num_classes: 10" in e.value.message
