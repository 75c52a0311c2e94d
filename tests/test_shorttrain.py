"""The short-training evaluator: per-epoch reports for pruners, score = stored mAP50-95, quiet trial folders,
DigitsDet generated once per run, divergence recorded as the trial's fail reason."""
import math
import threading

import optuna
import yaml
from optuna.trial import TrialState

import nas.detect.digits as digits_mod
import nas.detect.train as train_mod
from nas.search.experiment import experiment_from_dict
from nas.search.objective import short_schedule
from nas.search.study import run

# The shared TINY space has features at strides 4/8/16; the detector needs 8/16/32.
EVALUATOR = {"kind": "train", "epochs": 2, "imgsz": 64, "train_batch": 8, "train_images": 16, "val_images": 8,
             "pruner": "median"}


def _exp(det_space, tmp_path, **kw):
    space, table = det_space
    d = {"format": "nas/experiment@1", "name": "st", "space": str(space), "table": str(table), "budget_ms": 1000.0,
         "scope": "backbone", "mode": "constraint", "sampler": "random", "trials": 2, "evaluator": dict(EVALUATOR),
         "output": str(tmp_path / "runs")}
    d.update(kw)
    return experiment_from_dict(d, "exp.yaml")


def test_short_training_reports_each_epoch_and_scores_map(det_space, tmp_path):
    exp = _exp(det_space, tmp_path)
    study = run(exp, progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2 and len(study.trials) == 2
    for t in done:
        assert sorted(t.intermediate_values) == [1, 2]  # one report per epoch, counted from 1
        assert all(0 <= v <= 1 for v in t.intermediate_values.values())
        assert t.value == t.user_attrs["map50_95"] == t.user_attrs["score"]
        assert t.user_attrs["evaluated"] is True and t.user_attrs["train_s"] > 0
        trial_dir = exp.run_dir / "trials" / str(t.number)
        assert (trial_dir / "weights" / "best.pt").is_file() and (trial_dir / "results.csv").is_file()
        assert not list(trial_dir.glob("events.out.tfevents.*")) and not list(trial_dir.glob("*.onnx"))
        assert len((trial_dir / "results.csv").read_text().splitlines()) == 3
    data = yaml.safe_load((exp.run_dir / "digits" / "data.yaml").read_text())
    assert data["nc"] == 10 and len(list((exp.run_dir / "digits" / "images" / "train").glob("*.png"))) == 16


def test_digits_are_generated_once_by_concurrent_workers(det_space, tmp_path, monkeypatch):
    exp = _exp(det_space, tmp_path)
    real, calls = digits_mod.generate_digits, []

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(digits_mod, "generate_digits", counting)
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(short_schedule(exp).dataset(exp.run_dir, "digits")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 2 and out[0] == out[1]


def test_diverged_training_fails_the_trial_with_its_reason(det_space, tmp_path, monkeypatch):
    diverge = {"left": 1}  # only the first trial's training blows up

    class NanOnce(train_mod.DetectionLoss):
        def __call__(self, preds, targets, imgsz):
            loss, parts = super().__call__(preds, targets, imgsz)
            return (loss * float("nan") if diverge["left"] else loss), parts

    real_train = train_mod.train

    def train_once(cfg, on_epoch=None):
        try:
            return real_train(cfg, on_epoch)
        finally:
            diverge["left"] = 0

    monkeypatch.setattr(train_mod, "DetectionLoss", NanOnce)
    monkeypatch.setattr(train_mod, "train", train_once)
    exp = _exp(det_space, tmp_path, trials=1, evaluator={**EVALUATOR, "epochs": 1})
    study = run(exp, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 1
    reason = failed[0].user_attrs["fail_reason"]
    assert reason.startswith("TrainingDiverged: training diverged: the loss became nan at epoch 1"), reason
    assert failed[0].user_attrs["evaluated"] is False and "fail_traceback" not in failed[0].user_attrs


def test_pareto_mode_trains_without_pruning_reports(det_space, tmp_path):
    exp = _exp(det_space, tmp_path, mode="pareto", budget_ms=None, trials=1, evaluator={**EVALUATOR, "epochs": 1})
    (t,) = run(exp, progress=False).trials
    assert t.state == TrialState.COMPLETE and t.intermediate_values == {}  # Optuna cannot prune multi-objective
    assert t.values[0] == t.user_attrs["map50_95"]
    assert math.isclose(t.values[1], t.user_attrs["predicted_ms"], abs_tol=1e-4)  # the stored ms is rounded


def test_pruned_trial_stops_after_the_reported_epoch(det_space, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)  # a pruner that stops everyone
    exp = _exp(det_space, tmp_path, trials=1)
    (t,) = run(exp, progress=False).trials
    assert t.state == TrialState.PRUNED and sorted(t.intermediate_values) == [1]
    assert len((exp.run_dir / "trials" / "0" / "results.csv").read_text().splitlines()) == 2  # epoch 2 never ran
