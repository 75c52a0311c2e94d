"""A search on a CPU its table was not measured on: one notice with the exact command, or (`--adapt`, the
quickstart) a table adapted here once into the run folder, kept by resumed runs and never mixed with the original."""
import copy
import os

import optuna
import pytest
import yaml
from conftest import DET, FAST
from test_compare import HEAD

from nas.arch.spec import loads_arch
from nas.commands.main import build_parser, main
from nas.latency.coverage import space_neckhead_ops
from nas.latency.table import LatencyTable
from nas.search import hosttable
from nas.space import space_from_dict

OTHER_CPU = "GenuineIntel family 6 model 999"


@pytest.fixture
def foreign_run(tmp_path, monkeypatch):
    """An experiment on a table whose header says it was measured on another CPU (entries measured here 1.5x: a
    slower machine), with few networks for the adaptation so the test stays short."""
    monkeypatch.setattr(hosttable, "NETWORKS", 6)
    monkeypatch.setattr(hosttable, "HELD_OUT", 4)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(DET))
    space = space_from_dict(DET, str(tmp_path / "space.yaml"))
    table = LatencyTable.new(FAST, "elsewhere")
    table.extend([*space.ops(), *space_neckhead_ops(space, HEAD)], progress=False)
    foreign = copy.deepcopy(table)
    foreign.header["device"]["cpu_id"] = OTHER_CPU
    for k, e in table.entries.items():
        foreign.entries[k] = type(e)(e.median_us * 1.5, e.p10_us * 1.5, e.p90_us * 1.5, e.n)
    foreign.save(tmp_path / "table.csv")
    budget = sorted(foreign.predict(space.random(i), HEAD).total_ms for i in range(20))[-3]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "r", "space": "space.yaml", "table": "table.csv", "budget_ms": budget,
        "mode": "pareto", "sampler": "random", "trials": 3, "tensorboard_every": 0,
        "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64}, "output": "runs"}))
    return tmp_path


def _nas(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_table_from_another_cpu_gets_one_notice_with_the_command(foreign_run, capsys):
    code, _, err = _nas(capsys, "search", "exp.yaml", "--quiet")
    assert code == 0, err
    notices = [ln for ln in err.splitlines() if "another CPU" in ln]
    assert len(notices) == 1 and OTHER_CPU in notices[0], err
    assert "--adapt" in notices[0] and "`nas lut adapt table.csv --space space.yaml -n 6 " in notices[0]
    assert "-n 6 --out runs/table-adapted.csv --detector`" in notices[0] and "--table runs/table-adapted.csv" in notices[0]
    assert "Warning:" not in err and "Traceback" not in err and not (foreign_run / "runs/r/latency_table.csv").exists()


def test_search_adapt_writes_the_run_table_and_resumed_runs_keep_it(foreign_run, capsys):
    code, _, err = _nas(capsys, "search", "exp.yaml", "--adapt", "--quiet")
    assert code == 0, err
    path = foreign_run / "runs/r/latency_table.csv"
    adapted = LatencyTable.load(path)
    line = next(ln for ln in err.splitlines() if ln.startswith("adapted table.csv"))
    assert OTHER_CPU in line and "6 networks measured" in line and "4 held-out detectors" in line
    held = adapted.header["adaptation"]["held_out"]
    assert held["networks"] == 4 and 0 <= held["within_10pct"] <= 1
    assert adapted.header["adapted_from"]["cpu_id"] == OTHER_CPU and not adapted.measured_elsewhere()
    # the run records the table it predicted with, and every trial's latency came from it
    assert yaml.safe_load((foreign_run / "runs/r/config.yaml").read_text())["table"] == "runs/r/latency_table.csv"
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{foreign_run / 'runs/r/study.db'}")
    assert len(study.trials) == 3
    for t in study.trials:
        arch = loads_arch(t.user_attrs["arch"])
        assert t.user_attrs["predicted_ms"] == pytest.approx(adapted.predict(arch, HEAD).total_ms, rel=1e-3)
    # the slower "other machine" predicted about 1.5x what this one measures; the adapted table does not
    assert held["source_bias_pct"] > held["bias_pct"] + 20
    stamp = os.stat(path).st_mtime_ns
    code, _, err = _nas(capsys, "search", "exp.yaml", "--trials", "5", "--quiet")  # resumed, no --adapt
    assert code == 0, err
    assert os.stat(path).st_mtime_ns == stamp and "another CPU" not in err and len(study.trials) == 5


def test_adapting_a_run_that_searched_with_the_original_is_refused(foreign_run, capsys):
    assert _nas(capsys, "search", "exp.yaml", "--quiet")[0] == 0
    code, _, err = _nas(capsys, "search", "exp.yaml", "--adapt", "--trials", "4", "--quiet")
    assert code == 2 and "mix two tables" in err and "--name" in err and "Traceback" not in err
    (foreign_run / "runs/r/latency_table.csv").hardlink_to(foreign_run / "table.csv")  # adapted by hand into the run
    code, _, err = _nas(capsys, "search", "exp.yaml", "--trials", "4", "--quiet")
    assert code == 2 and "mix two tables" in err


def test_quickstart_adapts_first_and_says_so(foreign_run, capsys):
    argv = ["quickstart", "--experiment", "exp.yaml", "--epochs", "1", "--train-images", "8", "--val-images", "4",
            "--quiet"]
    args = build_parser().parse_args(argv)
    result = args.func(args)
    out = capsys.readouterr().out
    assert [s["name"] for s in result["steps"]] == ["adapt", "search", "front", "export", "data", "train"]
    assert "=== adapt: nas lut adapt table.csv --space space.yaml -n 6 --out runs/r/latency_table.csv --detector\n" in out
    assert "as shipped ->" in next(ln for ln in out.splitlines() if ln.startswith("--- adapt: "))
    info = yaml.safe_load(next((foreign_run / "runs/r/export").glob("trial-*.yaml")).read_text())["info"]
    assert info["table"] and info["measured_ms"] > 0
    args = build_parser().parse_args(argv + ["--no-adapt"])
    assert "adapt" not in [s["name"] for s in args.func(args)["steps"]]  # the run keeps its table, no new adaptation
