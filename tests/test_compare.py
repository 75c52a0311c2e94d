"""`nas train --from RUN`: front members and zoo baselines trained alike, measured side by side, compared."""
import csv
import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DET, FAST
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from nas.arch.blocks import build_block
from nas.arch.headconfig import HeadConfig
from nas.commands.main import main
from nas.detect.digits import generate_digits
from nas.errors import ConfigError
from nas.latency.coverage import NeckHeadOp, key_of, space_neckhead_ops
from nas.latency.table import Entry, LatencyTable
from nas.report.compare import DEFAULT_BASELINES, parse_baselines, top_members
from nas.report.tensorboard import tensorboard_callbacks
from nas.search.experiment import experiment_from_dict
from nas.search.study import run
from nas.space import space_from_dict

HEAD = HeadConfig(neck="dw", num_classes=10)  # DigitsDet's


def _entries_by_macs(table: LatencyTable, ops: list) -> None:
    """Entries proportional to each op's MACs (after a real build): the tests below need a front of three distinct
    members, which measured latencies of this space's tiny ops, microseconds apart, do not always give."""
    for op in ops:
        module, shapes = (op.build(), op.shapes) if isinstance(op, NeckHeadOp) else (build_block(op[0], op[1][0]),
                                                                                   (op[1],))
        with torch.device("meta"), FlopCounterMode(display=False) as fc:
            module.to("meta").eval()(*(torch.empty(1, *sh) for sh in shapes))
        us = 1.0 + fc.get_total_flops() / 2e4
        table.entries[key_of(op)] = Entry(us, us, us, 1)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """An 8-trial detector-scope search on a tiny detector space, with TensorBoard on, and a tiny DigitsDet."""
    d = tmp_path_factory.mktemp("compare")
    (d / "space.yaml").write_text(yaml.safe_dump(DET))
    space = space_from_dict(DET, str(d / "space.yaml"))
    table = LatencyTable.new(FAST, "cmp")
    ops = [*space.ops(), *space_neckhead_ops(space, HEAD)]
    table.extend(ops, path=d / "table.csv", progress=False)
    _entries_by_macs(table, ops)
    table.save(d / "table.csv")
    exp = experiment_from_dict({
        "format": "nas/experiment@1", "name": "cmp", "space": str(d / "space.yaml"), "table": str(d / "table.csv"),
        "budget_ms": 1e4, "mode": "pareto", "sampler": "random", "trials": 8, "num_classes": 10,
        "tensorboard_every": 2, "evaluator": {"kind": "proxy", "proxy": "params", "resolution": 64},
        "output": str(d / "runs")}, "exp.yaml")
    study = run(exp, progress=False, callbacks=tensorboard_callbacks(exp))
    assert len(top_members(study, 3)) == 3  # what the tests below need
    data = generate_digits(d / "digits", 16, 8, imgsz=64, min_size=10, max_size=28, progress=False, workers=0)
    return exp, str(data)


def test_baseline_list_parsing():
    assert parse_baselines(None) == list(DEFAULT_BASELINES)
    assert parse_baselines("zoo:mobilenet_v3_small_100, mobilenet_v2_100") == ["mobilenet_v3_small_100",
                                                                               "mobilenet_v2_100"]
    assert parse_baselines("none") == []
    with pytest.raises(ConfigError, match="mobilenet_v2_100"):
        parse_baselines("zoo:mobilenet_v2_10")


def test_train_from_run_compares_front_members_and_baselines(searched, capsys):
    exp, data = searched
    argv = ["train", "--from", str(exp.run_dir), "--top-k", "2", "--baselines", "zoo:mobilenet_v3_small_100",
            "--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0", "--quiet", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "trained " not in captured.err  # --quiet: the library's information lines are not shown
    rows = out["rows"]
    assert [r["source"] for r in rows] == ["search", "search", "zoo"] and rows[2]["model"] == "mobilenet_v3_small_100"
    for r in rows:
        assert 0 <= r["map50_95"] <= r["map50"] <= 1 and r["epochs"] == 1
        assert r["latency_ms"] > 0 and r["params"] > 0 and r["macs"] > 0
        assert (exp.run_dir / "compare" / r["model"] / "weights" / "best.pt").is_file()
        assert yaml.safe_load((exp.run_dir / "compare" / r["model"] / "args.yaml").read_text())["neck"] == "dw"
    # the searched rows are front members, and the table's whole-detector prediction is given (it covers 64 px)
    assert all(r["predicted_ms"] is not None for r in rows[:2]) and rows[2]["predicted_ms"] is None
    with open(exp.run_dir / "compare" / "compare.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [r["model"] for r in rows]
    md = (exp.run_dir / "compare" / "compare.md").read_text()
    assert "| mAP50-95 | mAP50 | latency ms (measured) |" in md and "mobilenet_v3_small_100" in md
    assert (exp.run_dir / "compare" / "map_vs_latency.png").stat().st_size > 10_000
    acc = EventAccumulator(str(exp.run_dir / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "compare/map_vs_latency" in acc.Tags()["images"]
    assert any(t.startswith("compare/table") for t in acc.Tags()["tensors"])


def test_train_from_run_reranks_by_a_short_training(searched, capsys):
    """--rerank 3 --top-k 1: three front members short-trained, the best by that mAP is the one trained."""
    exp, data = searched
    argv = ["train", "--from", str(exp.run_dir), "--top-k", "1", "--rerank", "3", "--baselines", "none",
            "--data", data, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0", "--no-measure",
            "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert captured.err.count("rerank [") == 3  # the library's log records, shown on stderr by the command
    ranked = out["rerank"]
    assert len(ranked) == 3 and len({r["model"] for r in ranked}) == 3
    assert [r["map50_95"] for r in ranked] == sorted((r["map50_95"] for r in ranked), reverse=True)
    assert [r["model"] for r in out["rows"]] == [ranked[0]["model"]]
    for r in ranked:  # short-trained on the given data with the short schedule's size, not --imgsz
        args = yaml.safe_load((exp.run_dir / "compare" / "rerank" / r["model"] / "seed2" / "args.yaml").read_text())
        assert args["data"] == data and args["imgsz"] == 128 and args["epochs"] == 4 and args["neck"] == "dw"
        assert args["seed"] == 2 and r["map50_95"] == pytest.approx(sum(r["per_seed"]) / 3)


def test_train_from_run_user_errors(searched, capsys):
    exp, _ = searched
    assert main(["train", "--from", str(exp.run_dir), "--top-k", "2", "--rerank", "2"]) == 2
    assert "--rerank" in capsys.readouterr().err
    assert main(["train", "zoo:mobilenet_v3_small_100", "--from", str(exp.run_dir)]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["train", "--from", str(exp.run_dir), "--baselines", "zoo:nope"]) == 2
    assert "--baselines" in capsys.readouterr().err


def test_top_members_train_each_architecture_once():
    """A sampler can propose one architecture twice; both trials sit on the front, but only one is trained."""
    import optuna

    from nas.arch.spec import dumps_arch
    from nas.arch.zoo import get_arch
    from nas.report.compare import top_members

    study = optuna.create_study(directions=["maximize", "minimize"])
    archs = {k: get_arch(n) for k, n in [("a", "mobilenet_v3_small_100"), ("b", "mobilenet_v4_conv_small"),
                                         ("c", "mobilenet_v2_100")]}
    for number, (which, score, ms) in enumerate([("b", 1.0, 5.0), ("a", 2.0, 9.0), ("a", 2.0, 9.0), ("c", 0.5, 4.0)]):
        arch = dumps_arch(replace(archs[which], name=f"s-trial-{number}"))
        study.add_trial(optuna.trial.create_trial(values=[score, ms], user_attrs={
            "arch": arch, "predicted_ms": ms, "score": score, "evaluated": True}))
    picked = top_members(study, 2)
    assert [m.label for m in picked] == ["trial-1", "trial-0"]  # trial-2 repeats trial-1's arch
    assert [m.score for m in picked] == [2.0, 1.0]
    assert [m.label for m in top_members(study, 3)] == ["trial-1", "trial-0", "trial-3"]
    assert [m.label for m in top_members(study, 3, max_ms=5.0)] == ["trial-0", "trial-3"]


def test_compare_hands_one_picklable_training_per_entrant_to_map_fn(tmp_path):
    """Each training is one task through `map_fn` (a process pool must be able to pickle it and its function); rows
    follow the entrants' order, and nothing is measured without a protocol."""
    from nas.detect.train import TrainConfig, TrainResult
    from nas.report.compare import compare, run_training, zoo_entrants

    entrants = zoo_entrants(["mobilenet_v3_small_100", "mobilenet_v4_conv_small"])
    tasks = []

    def pool_map(fn, items):
        assert pickle.loads(pickle.dumps(fn)) is run_training
        tasks.extend(pickle.loads(pickle.dumps(t)) for t in items)
        return [TrainResult(run_dir=Path(t.config.project) / t.config.name, best=Path("best.pt"), last=Path("last.pt"),
                            epochs=2, best_epoch=2, map50=0.5, map50_95=0.1 * i, fitness=0.0)
                for i, t in enumerate(tasks)]

    base = TrainConfig(arch=entrants[0].arch, epochs=2, imgsz=64, head=HEAD)
    rows = compare(entrants, base, tmp_path, HEAD, None, map_fn=pool_map)
    assert [(t.label, t.config.arch, t.config.name, t.config.project) for t in tasks] == [
        (e.label, e.arch, e.label, str(tmp_path)) for e in entrants]
    assert all(t.config.epochs == 2 and t.config.imgsz == 64 and t.config.exist_ok for t in tasks)
    assert [(r.model, r.source, r.map50_95, r.latency_ms) for r in rows] == [
        ("mobilenet_v3_small_100", "zoo", 0.0, None), ("mobilenet_v4_conv_small", "zoo", 0.1, None)]
    assert rows[1].run_dir == str(tmp_path / "mobilenet_v4_conv_small") and rows[0].params > 0
