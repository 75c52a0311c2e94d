"""The quickstart: the shipped experiment is servable as it stands (table covers it, budget leaves a real choice), and
`nas quickstart` runs search -> front -> export -> training end to end (on a tiny space here)."""
from pathlib import Path

import yaml
from conftest import DET, FAST
from test_compare import HEAD

from nas.commands.main import build_parser
from nas.commands.quickstart import EXPERIMENT, _experiment
from nas.latency.coverage import space_neckhead_ops
from nas.latency.table import LatencyTable
from nas.search.experiment import load_experiment
from nas.search.objective import Objective
from nas.space import load_space, space_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_quickstart_experiment_is_servable():
    exp = load_experiment(EXPERIMENT)
    assert exp.scope == "detector" and exp.mode == "pareto" and exp.storage is None and exp.evaluator.kind == "proxy"
    Objective(exp)  # refuses a table without the space's neck+head ops
    space, table = load_space(exp.space), LatencyTable.load(exp.table)
    lat = [table.predict(space.random(i), exp.head).total_ms for i in range(300)]
    feasible = sum(v <= exp.budget_ms for v in lat) / len(lat)
    assert 0.2 <= feasible <= 0.8, feasible  # a budget that leaves a real choice, not all or nothing


def test_quickstart_runs_the_whole_loop(tmp_path, capsys):
    d = tmp_path
    (d / "space.yaml").write_text(yaml.safe_dump(DET))
    space = space_from_dict(DET, str(d / "space.yaml"))
    table = LatencyTable.new(FAST, "qs")
    table.extend([*space.ops(), *space_neckhead_ops(space, HEAD)], path=d / "table.csv", progress=False)
    lat = sorted(table.predict(space.random(i), HEAD).total_ms for i in range(20))
    (d / "qs.yaml").write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "qs", "space": "space.yaml", "table": "table.csv",
        "budget_ms": round(lat[-3], 3), "mode": "pareto", "sampler": "random", "trials": 6, "tensorboard_every": 3,
        "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64}, "output": "runs"}))
    argv = ["quickstart", "--experiment", str(d / "qs.yaml"), "--epochs", "1", "--train-images", "8",
            "--val-images", "4", "--quiet"]
    args = build_parser().parse_args(argv)
    result = args.func(args)  # library calls in this process, no `nas` main and no captured output
    out = capsys.readouterr().out
    run = d / "runs" / "qs"
    for step in ("search", "front", "export", "data", "train"):
        assert f"=== {step}: " in out and f"--- {step}: " in out
    assert f"=== search: nas search {d / 'qs.yaml'}\n" in out and f"=== export: nas export {run} --pick knee" in out
    assert "--json" not in out and out.count("<- knee") == 1
    assert set(result) == {"steps", "seconds", "run_dir", "arch", "map50_95", "predicted_ms", "measured_ms",
                           "measured_normalised_ms"}
    assert [s["name"] for s in result["steps"]] == ["search", "front", "export", "data", "train"]
    assert f"tensorboard --logdir {run}" in out
    exported = next((run / "export").glob("trial-*.yaml"))
    info = yaml.safe_load(exported.read_text())["info"]
    assert info["scope"] == "detector" and info["predicted_ms"] <= info["budget_ms"] and info["measured_ms"] > 0
    args = yaml.safe_load((run / "train" / "args.yaml").read_text())
    assert args["neck"] == "dw" and args["epochs"] == 1 and Path(args["data"]).parent == (run / "digits").resolve()
    assert (run / "train" / "weights" / "best.pt").is_file() and (run / "study.db").is_file()
    assert (run / "front.png").is_file() and any((run / "tb").glob("events.out.tfevents.*"))
    train_line = next(ln for ln in out.splitlines() if ln.startswith("--- train: "))
    assert 0 <= float(train_line.split("mAP50-95 ")[1].split(",")[0]) <= 1


def test_default_quickstart_writes_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. an empty folder after `pip install .`
    path, exp, flags = _experiment(build_parser().parse_args(["quickstart", "--trials", "3"]))
    assert path == EXPERIMENT and EXPERIMENT.parent == ROOT / "nas" / "data" / "experiments"
    assert exp.run_dir.resolve() == tmp_path / "runs" / "quickstart" and exp.trials == 3
    assert flags == ["--output", "runs", "--trials", "3"]  # the printed `nas search` writes to the same folder


def test_checkout_experiments_write_to_the_repository_runs():
    """experiments/ of a checkout holds links to the packaged files, so `..` there is the repository root."""
    for name in ("quickstart", "uib_pareto", "uib_constraint"):
        exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
        assert exp.run_dir.resolve() == ROOT / "runs" / name
        assert Path(exp.space).resolve() == ROOT / "nas" / "data" / "search_spaces" / "uib_yolo.yaml"
