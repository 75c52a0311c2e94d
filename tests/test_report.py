"""Pareto fronts, hypervolume, knee, TensorBoard events of a search, `nas pareto` and `nas export`."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import median_budget
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.util import tensor_util

from nas.arch.backbone import build_backbone
from nas.arch.spec import dumps_arch, load_arch, loads_arch
from nas.commands.main import main
from nas.report.baselines import Baseline
from nas.report.fronts import Point, front, hypervolume, knee, pareto_indices, trial_points
from nas.report.tensorboard import tensorboard_callbacks
from nas.search.experiment import experiment_from_dict
from nas.search.study import run

ALL = {"images": 0, "scalars": 0, "tensors": 0}


def _exp(tiny_dir, tiny_table, out, **kw):
    d = {"format": "nas/experiment@1", "name": "p", "space": str(tiny_dir / "space.yaml"),
         "table": str(tiny_table.path),
         "budget_ms": median_budget(tiny_dir, tiny_table), "mode": "pareto",
         "sampler": "random", "trials": 10,
         "scope": "backbone",
         "tensorboard_every": 4, "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
         "output": str(out)}
    d.update(kw)
    return experiment_from_dict(d, "exp.yaml")


@pytest.fixture(scope="module")
def searched(tiny_dir, tiny_table, tmp_path_factory):
    """A 10-trial pareto search with a median budget: about half the trials are over it and never evaluated."""
    exp = _exp(tiny_dir, tiny_table, tmp_path_factory.mktemp("report") / "runs")
    return exp, run(exp, progress=False, callbacks=tensorboard_callbacks(exp))


# ---------------------------------------------------------------- pure functions

def test_hypervolume_hand_computed():
    pts = [(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]                 # (score, latency ms)
    # latency 1-2 at height 1, 2-4 at height 2, 4-5 at height 3: 1 + 4 + 3
    assert hypervolume(pts, (0.0, 5.0)) == pytest.approx(8.0)
    extra = pts + [(1.5, 3.0), (-1.0, 0.5), (9.0, 6.0)]        # dominated, below the reference score, past its latency
    assert hypervolume(extra, (0.0, 5.0)) == pytest.approx(8.0)
    assert hypervolume(pts, (2.0, 3.0)) == pytest.approx(0.0)  # nothing strictly better on both
    assert hypervolume([], (0.0, 1.0)) == 0.0
    with pytest.raises(ValueError):
        hypervolume(pts, (0.0, math.inf))
    from optuna._hypervolume import compute_hypervolume  # private: a cross-check only

    rng = np.random.default_rng(0)
    pts = [(float(s), float(t)) for s, t in rng.uniform(0, 1, size=(30, 2))]
    ours = hypervolume(pts, (0.0, 1.0))
    assert ours == pytest.approx(compute_hypervolume(np.array([(-s, t) for s, t in pts]), np.array([0.0, 1.0])))


def test_knee_hand_made():
    def pts(*pairs):
        return [Point(i, lat, s) for i, (lat, s) in enumerate(pairs)]

    # scaled to [0, 1]: (0, 0), (1/3, .8), (2/3, .9), (1, 1); distances to the diagonal .47, .23 -> the second
    assert knee(pts((1.0, 0.0), (2.0, 0.8), (3.0, 0.9), (4.0, 1.0))).trial == 1
    assert knee(pts((1.0, 0.0), (2.0, 0.1), (3.0, 0.2), (4.0, 1.0))).trial == 3  # no bulge: extremes tie, higher score
    assert knee(pts((1.0, 0.5), (2.0, 0.6))).trial == 1    # two members: the higher score
    assert knee(pts((1.0, 0.5))).trial == 0
    with pytest.raises(ValueError):
        knee([])


def test_pareto_indices_keep_duplicates_and_drop_dominated():
    pairs = [(1.0, 1.0), (1.0, 1.0), (0.5, 2.0), (2.0, 2.0), (2.0, 3.0), (3.0, 3.0)]
    assert pareto_indices(pairs) == [0, 1, 3, 5]


# ---------------------------------------------------------------- fronts of real studies

def test_front_matches_optuna_best_trials(searched):
    exp, study = searched
    members = front(study)
    assert {m.trial for m in members} == {t.number for t in study.best_trials}
    lat = [m.predicted_ms for m in members]
    assert lat == sorted(lat) and all(m.predicted_ms <= exp.budget_ms and m.feasible for m in members)
    points = trial_points(study)
    assert len(points) == 10 and any(not p.feasible and p.score is None for p in points)  # over budget, unscored


def test_single_objective_front_from_user_attrs(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path / "runs", name="c", mode="constraint", trials=6, tensorboard_every=0)
    study = run(exp, progress=False, callbacks=tensorboard_callbacks(exp))
    assert not (exp.run_dir / "tb").exists()  # tensorboard_every: 0 turns it off
    ok = [p for p in trial_points(study) if p.feasible]
    members = front(study)
    assert members
    for p in ok:  # brute force: a member is beaten by nobody, a non-member by somebody
        beaten = any(q.score >= p.score and q.predicted_ms <= p.predicted_ms and
                     (q.score, q.predicted_ms) != (p.score, p.predicted_ms) for q in ok)
        assert beaten == (p not in members)


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_scalars_figure_hparams_and_front_yaml(searched):
    exp, study = searched
    tb = exp.run_dir / "tb"
    acc = EventAccumulator(str(tb), size_guidance=ALL).Reload()
    tags = acc.Tags()
    for name in ("score", "predicted_ms", "params", "macs", "feasible"):
        assert f"trial/{name}" in tags["scalars"]
    assert [e.step for e in acc.Scalars("trial/predicted_ms")] == list(range(10))
    evaluated = [t for t in study.trials if t.user_attrs.get("evaluated")]
    assert len(acc.Scalars("trial/score")) == len(evaluated)
    feasible = {e.step: e.value for e in acc.Scalars("trial/feasible")}
    assert feasible == {t.number: float(bool(t.user_attrs.get("evaluated"))) for t in study.trials}

    images = acc.Images("pareto/front")  # every 4 trials and at the end
    assert [i.step for i in images] == [4, 8, 10]
    assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and images[-1].width >= 600

    exp_info = hp_metadata.parse_experiment_plugin_data(acc.PluginTagToContent("hparams")[hp_metadata.EXPERIMENT_TAG])
    assert {h.name for h in exp_info.hparam_infos} == set(study.trials[0].params)
    assert {m.name.tag for m in exp_info.metric_infos} >= {"hparam/score", "hparam/predicted_ms", "hparam/feasible"}
    sessions = sorted(p.name for p in (tb / "hparams").iterdir())
    assert sessions == [f"trial-{i:05d}" for i in range(10)]
    t = evaluated[0]
    sacc = EventAccumulator(str(tb / "hparams" / f"trial-{t.number:05d}"), size_guidance=ALL).Reload()
    start = hp_metadata.parse_session_start_info_plugin_data(
        sacc.PluginTagToContent("hparams")[hp_metadata.SESSION_START_INFO_TAG])
    for k, v in t.params.items():
        got = start.hparams[k]
        assert (got.string_value == v) if isinstance(v, str) else got.number_value == pytest.approx(float(v))
    assert sacc.Scalars("hparam/score")[0].value == pytest.approx(t.user_attrs["score"])

    members = front(study)
    text = tensor_util.make_ndarray(acc.Tensors(f"front/trial-{members[0].trial:05d}/text_summary")[0].tensor_proto)
    yaml_text = "\n".join(line[4:] for line in text.item().decode().split("\n\n", 1)[1].splitlines())
    assert dumps_arch(loads_arch(yaml_text)) == study.trials[members[0].trial].user_attrs["arch"]


def test_resumed_search_does_not_log_trials_twice(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path / "runs", name="r", trials=2)
    run(exp, progress=False, callbacks=tensorboard_callbacks(exp))
    exp2 = _exp(tiny_dir, tiny_table, tmp_path / "runs", name="r", trials=4)
    run(exp2, progress=False, callbacks=tensorboard_callbacks(exp2))
    acc = EventAccumulator(str(exp.run_dir / "tb"), size_guidance=ALL).Reload()
    assert [e.step for e in acc.Scalars("trial/predicted_ms")] == [0, 1, 2, 3]


# ---------------------------------------------------------------- nas pareto, nas export

def test_pareto_command(searched, capsys, tmp_path):
    exp, study = searched
    assert main(["pareto", str(exp.run_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(set(r) == {"trial", "predicted_ms", "score", "params", "macs"} for r in rows)
    assert [r["trial"] for r in rows] == [m.trial for m in front(study)]
    with open(exp.run_dir / "front.csv") as f:
        assert [int(r["trial"]) for r in csv.DictReader(f)] == [r["trial"] for r in rows]
    assert (exp.run_dir / "front.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["pareto", str(exp.run_dir), "--json", "--measure"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["measured_ms"] > 0 for r in rows)

    # any storage, without the run folder; text output states the hypervolume's reference point
    url = f"sqlite:///{exp.run_dir / 'study.db'}"
    assert main(["pareto", "--storage", url, "--study", "p", "--out", str(tmp_path), "--ref-score", "0"]) == 0
    out = capsys.readouterr().out
    assert "hypervolume" in out and "score 0 = given" in out and f"{exp.budget_ms:.6g} ms = the budget" in out
    assert (tmp_path / "front.csv").exists() and (tmp_path / "front.png").exists()


def test_export_yaml_and_onnx(searched, tiny_table, capsys):
    import onnxruntime as ort

    exp, study = searched
    assert main(["export", str(exp.run_dir), "--pick", "knee", "--onnx", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    arch = load_arch(res["arch"])
    k = knee(front(study))
    assert res["trial"] == k.trial and arch.stages == loads_arch(k.arch).stages
    info = arch.info
    assert (info["study"], info["trial"], info["pick"], info["table"]) == ("p", k.trial, "knee", tiny_table.name)
    assert tiny_table.predict(arch).total_ms == pytest.approx(info["predicted_ms"], rel=1e-3)
    assert info["measured_ms"] > 0 and "measured_on" in info
    assert dumps_arch(load_arch(res["arch"])) == open(res["arch"]).read()  # exact round trip

    assert res["onnx_max_diff"] <= 1e-4
    with torch.random.fork_rng():  # the export seeds the untrained weights with 0
        torch.manual_seed(0)
        model = build_backbone(arch).eval()
    x = torch.rand(1, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        ref = model(x)
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in sess.get_outputs()] == ["stride4", "stride8", "stride16"]
    assert len(outs) == len(ref) == 3
    for o, r in zip(outs, ref):
        np.testing.assert_allclose(o, r.numpy(), atol=1e-4, rtol=0)

    assert main(["export", str(exp.run_dir), "--pick", "best", "--no-measure", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["trial"] == max(front(study), key=lambda m: m.score).trial and best["measured_ms"] is None


@pytest.mark.parametrize("argv,words", [
    (["export", "{run}", "--pick", "worst"], "use best, knee or trial:N"),
    (["export", "{run}", "--pick", "trial:999"], "trial 999 of study 'p' does not exist"),
    (["pareto", "{tmp}"], "not a run folder"),
    (["pareto", "{run}", "--study", "nope"], "no study 'nope'"),
    (["pareto"], "give a run folder"),
])
def test_user_errors_are_one_line(searched, tmp_path, capsys, argv, words):
    exp, _ = searched
    argv = [a.format(run=exp.run_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_zoo_baselines_use_the_table_and_the_evaluator(tiny_table, tmp_path):
    from nas.arch.zoo import get_arch
    from nas.latency.coverage import arch_ops
    from nas.latency.table import LatencyTable
    from nas.report.baselines import zoo_baselines
    from nas.report.figures import figure_to_array, pareto_figure

    table = LatencyTable(header=dict(tiny_table.header), entries=dict(tiny_table.entries))
    small = get_arch("mobilenet_v3_small_100").with_resolution(64)
    table.extend([(b, s) for _, b, s in arch_ops(small)], progress=False)
    got, notes = zoo_baselines(table, [64], score_fn=lambda arch: float(len(arch.blocks())))
    assert [b.name for b in got] == ["mobilenet_v3_small_100"]
    assert got[0].predicted_ms == pytest.approx(table.predict(small).total_ms) and got[0].score == len(small.blocks())
    assert len(notes) == 3 and all("skipped" in n and "nas lut extend" in n for n in notes)
    fig = pareto_figure([Point(0, 1.0, 2.0)], [Point(0, 1.0, 2.0)], budget_ms=1.5, baselines=got)
    assert figure_to_array(fig).shape[2] == 3
    assert fig.axes[0].get_xlabel() == "predicted latency (ms)"
    near = [Baseline(f"zoo-{i}", 1.0 + 0.01 * i, 2.0) for i in range(4)]  # four stars nearly on top of each other
    fig = pareto_figure([Point(0, 1.0, 2.0)], [], baselines=near, scope="detector")
    assert fig.axes[0].get_xlabel() == "predicted latency, whole detector (ms)"
    offsets = [t.xyann[1] for t in fig.axes[0].texts]
    assert len(set(offsets)) == 4  # each label at its own height: none printed over another
