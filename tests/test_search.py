"""The search engine: experiment configs, the three modes, seeded samplers, resume, storages, failed candidates."""
import math
import socket
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import median_budget
from optuna.trial import TrialState

from nas.arch.spec import loads_arch
from nas.errors import ConfigError
from nas.search.experiment import apply_overrides, experiment_from_dict
from nas.search.storage import make_storage, mask_url
from nas.search.study import run


def _exp(tiny_dir, tiny_table, tmp_path, **kw):
    d = {"format": "nas/experiment@1", "name": "t", "space": str(tiny_dir / "space.yaml"),
         "table": str(tiny_table.path), "budget_ms": median_budget(tiny_dir, tiny_table),
         "mode": "constraint",
         "scope": "backbone", "sampler": "tpe", "trials": 6, "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
         "output": str(tmp_path / "runs")}
    d.update(kw)
    return experiment_from_dict(d, "exp.yaml")


def _study(exp):
    return optuna.load_study(study_name=exp.study_name, storage=make_storage(exp.storage_url()))


def test_constraint_mode_never_evaluates_over_budget(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path, trials=16, sampler="random")
    study = run(exp, progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 16
    over = [t for t in trials if t.user_attrs["predicted_ms"] > exp.budget_ms]
    under = [t for t in trials if t.user_attrs["predicted_ms"] <= exp.budget_ms]
    assert over and under  # the budget is the median: both kinds occur
    for t in over:
        assert t.user_attrs["evaluated"] is False and "score" not in t.user_attrs and t.value == -math.inf
        assert t.system_attrs["constraints:latency_ms"] > 0
    for t in under:
        assert t.user_attrs["evaluated"] is True and t.value == t.user_attrs["score"]
        assert math.isclose(t.value, math.log(t.user_attrs["params"]))  # the params proxy is log #params
    best = study.best_trial
    assert best.user_attrs["predicted_ms"] <= exp.budget_ms
    assert best.value == max(t.value for t in under)
    # every stored arch rebuilds and predicts the stored latency
    for t in trials:
        arch = loads_arch(t.user_attrs["arch"])
        assert math.isclose(tiny_table.predict(arch).total_ms, t.user_attrs["predicted_ms"], rel_tol=1e-3)
    assert (exp.run_dir / "config.yaml").exists()


def test_same_seed_same_first_trials(tiny_dir, tiny_table, tmp_path):
    params = []
    for i in range(2):
        exp = _exp(tiny_dir, tiny_table, tmp_path / str(i), trials=5, sampler="tpe", seed=7)
        params.append([t.params for t in run(exp, progress=False).trials])
    assert params[0] == params[1]
    other = run(_exp(tiny_dir, tiny_table, tmp_path / "2", trials=5, sampler="tpe", seed=8), progress=False)
    assert [t.params for t in other.trials] != params[0]


def test_rerun_resumes(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path, trials=4, sampler="nsga2")
    first = [(t.number, t.params, t.values) for t in run(exp, progress=False).trials]
    study = run(apply_overrides(exp, {"trials": 7}), progress=False)
    assert len(study.trials) == 7
    assert [(t.number, t.params, t.values) for t in study.trials[:4]] == first
    assert len(run(apply_overrides(exp, {"trials": 7}), progress=False).trials) == 7  # nothing left to do


def test_pareto_and_mnas_modes(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path, mode="pareto", budget_ms=None, trials=8, sampler="random")
    study = run(exp, progress=False)
    assert len(study.directions) == 2
    front = study.best_trials
    assert front
    for t in front:  # non-dominated: nobody is better on both
        assert not any(o.values[0] >= t.values[0] and o.values[1] < t.values[1] for o in study.trials)
    exp = _exp(tiny_dir, tiny_table, tmp_path, name="m", mode="mnas", trials=5, sampler="random")
    for t in run(exp, progress=False).trials:
        lat, score = t.user_attrs["predicted_ms"], t.user_attrs["score"]
        # proxies are logarithms: ACC·(LAT/T)^w becomes log ACC + w·ln(LAT/T)
        assert math.isclose(t.value, score - 0.07 * math.log(lat / exp.budget_ms), rel_tol=1e-5)  # stored ms is rounded


def test_failed_candidates_are_recorded_and_the_study_goes_on(tiny_dir, tiny_table, tmp_path, monkeypatch):
    from nas.search import objective

    real = objective.Objective.evaluate
    calls = {"n": 0}

    def flaky(self, arch, trial):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        if calls["n"] % 3 == 0:
            return float("nan"), {}
        return real(self, arch, trial)

    monkeypatch.setattr(objective.Objective, "evaluate", flaky)
    exp = _exp(tiny_dir, tiny_table, tmp_path, mode="mnas", trials=4, sampler="random")
    study = run(exp, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4 and failed
    reasons = {t.user_attrs["fail_reason"] for t in failed}
    assert any("out of memory" in r for r in reasons) and any("score is nan" in r for r in reasons)


def test_a_cause_that_fails_every_candidate_stops_the_search(tiny_dir, tiny_table, tmp_path, monkeypatch, capsys):
    from nas.errors import NasError
    from nas.search import objective
    from nas.search.study import MAX_FAILED_IN_A_ROW

    def broken(self, arch, trial):
        raise RuntimeError("data set missing (simulated)")

    monkeypatch.setattr(objective.Objective, "evaluate", broken)
    exp = _exp(tiny_dir, tiny_table, tmp_path, mode="mnas", trials=4, sampler="random")
    with pytest.raises(NasError, match="in a row failed, the last with: RuntimeError: data set missing"):
        run(exp, progress=True)
    study = _study(exp)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == MAX_FAILED_IN_A_ROW
    assert "trial    0" in capsys.readouterr().err  # the live line per trial


def _postgres_url():
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return None
    return "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.skipif(_postgres_url() is None, reason="PostgreSQL is not reachable on 127.0.0.1:5432")
def test_postgresql_storage(tiny_dir, tiny_table, tmp_path):
    name = f"nas-test-{tmp_path.name}"
    exp = _exp(tiny_dir, tiny_table, tmp_path, storage=_postgres_url(), study=name, trials=3, sampler="random")
    try:
        assert len(run(exp, progress=False).trials) == 3
        assert len(run(apply_overrides(exp, {"trials": 5}), progress=False).trials) == 5
    finally:
        optuna.delete_study(study_name=name, storage=_postgres_url())


def test_journal_storage_with_two_workers(tiny_dir, tiny_table, tmp_path):
    exp = _exp(tiny_dir, tiny_table, tmp_path, trials=8, workers=2, sampler="random")
    assert exp.storage_url().startswith("journal://")
    study = run(exp, progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 8 and len({t.number for t in study.trials}) == len(study.trials)
    assert all(t.system_attrs["nas:worker"].rsplit(":", 1)[1].isdigit() for t in done)  # who ran it, for dead-worker checks


@pytest.mark.parametrize("change,field,words", [
    (dict(mode="constrain"), "mode", 'did you mean "constraint"'),
    (dict(budget_ms=None), "budget_ms", "needs a latency budget"),
    (dict(sampler="tpee"), "sampler", 'did you mean "tpe"'),
    (dict(evaluator={"kind": "proxy", "proxy": "synflw"}), "evaluator.proxy", 'did you mean "synflow"'),
    (dict(evaluator={"kind": "proxy", "proxi": "synflow"}), "evaluator.proxi", 'did you mean "proxy"'),
    (dict(trials=0), "trials", "positive"),
    (dict(budgt_ms=3), "budgt_ms", 'did you mean "budget_ms"'),
    (dict(name="../x"), "name", "plain folder name"),
])
def test_bad_experiments(tiny_dir, tiny_table, tmp_path, change, field, words):
    with pytest.raises(ConfigError) as e:
        _exp(tiny_dir, tiny_table, tmp_path, **change)
    assert e.value.field == field and words in str(e.value)


def test_passwords_are_masked():
    assert mask_url("postgresql://nas:s3cret@db.example:5432/nas") == "postgresql://nas:***@db.example:5432/nas"
    assert mask_url("sqlite:///runs/x/study.db") == "sqlite:///runs/x/study.db"


def test_search_command_line(tiny_dir, tiny_table, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "cli", "space": str(tiny_dir / "space.yaml"), "table": str(tiny_table.path),
        "budget_ms": 100.0, "trials": 3, "evaluator": {"kind": "proxy", "proxy": "macs"}, "output": "runs"}))
    r = subprocess.run([sys.executable, "-m", "nas", "search", str(exp), "--quiet", "--trials", "4", "--sampler", "random",
                        "--budget-scope", "backbone", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["trials"]["complete"] == 4 and out["best"]["trial"] in range(4)
    assert (tmp_path / "runs" / "cli" / "study.db").exists()
    resolved = yaml.safe_load((tmp_path / "runs" / "cli" / "config.yaml").read_text())
    assert resolved["trials"] == 4 and resolved["sampler"] == "random"
