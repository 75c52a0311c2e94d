"""benchmarks/headline.py --smoke end to end on a tiny space and table: outputs exist and parse, a rerun reuses the
finished search and trainings, and changed settings are refused rather than mixed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DET, FAST

from nas.arch.headconfig import HeadConfig
from nas.latency.coverage import space_neckhead_ops
from nas.latency.table import LatencyTable
from nas.space import space_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny detector space and a fast table covering it with the dw neck for 10 classes at 64 px."""
    d = tmp_path_factory.mktemp("headline")
    (d / "space.yaml").write_text(yaml.safe_dump(DET))
    space = space_from_dict(DET, str(d / "space.yaml"))
    table = LatencyTable.new(FAST, "headline")
    table.extend([*space.ops(), *space_neckhead_ops(space, HeadConfig(neck="dw", num_classes=10))], path=d / "table.csv",
                 progress=False)
    return d


def headline(tiny, *extra):
    # fixed budgets far above the tiny detectors' predictions: every trial is feasible, the test is deterministic
    cmd = [sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--smoke", "--space", str(tiny / "space.yaml"),
           "--table", str(tiny / "table.csv"), "--resolution", "64", "--proxy", "params", "--trials", "4",
           "--baselines", "mobilenet_v3_small_100", "--train-images", "16", "--val-images", "8",
           "--budget-ms", "1000", "900", "--budget-rounds", "2", "--measure-rounds", "2", "--jobs", "1",
           "--out", str(tiny / "out"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NAS_CACHE": str(tiny / "cache")}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env,
                          timeout=300)


def test_smoke_run_writes_parsable_outputs_and_resumes(tiny):
    r = headline(tiny)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tiny / "out"
    res = json.loads((out / "results.json").read_text())
    assert [b["tag"] for b in res["budgets"]] == ["b1", "b2"]
    # the command as run: the script pins itself to a core for the final measurement, which must not leak into it
    pinned = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    assert ("taskset" in res["command"]) == pinned and "--smoke" in res["command"]
    for b in res["budgets"]:
        searched = [row for row in b["rows"] if row["source"] == "search"]
        assert 1 <= len(searched) <= 2 and any(row["model"] == "mobilenet_v3_small_100" for row in b["rows"])
        assert b["search"]["wall_s"] >= 0 and isinstance(b["verdict"]["ok"], bool)
        for row in b["rows"]:
            assert row["measured_ms"] > 0 and row["params"] > 0 and row["macs"] > 0
            assert 0 <= row["map50_95"]["min"] <= row["map50_95"]["median"] <= row["map50_95"]["max"] <= 1
            assert len(row["seeds"]) == 1 and Path(row["seeds"][0]["weights"]).is_file()
        assert all(row["predicted_ms"] is not None for row in searched)  # the table covers the searched models
        # the smoke run reranks 3 candidates (fewer if the front under the budget is smaller) and trains the best 2
        ranked = b["search"]["candidates_ranked"]
        assert len(searched) == min(2, len(ranked)) and sum(c["chosen"] for c in ranked) == len(searched)
        assert [c["map50_95"] for c in ranked] == sorted((c["map50_95"] for c in ranked), reverse=True)
        chosen = {c["arch"] for c in ranked if c["chosen"]}
        assert {row["arch"] for row in searched} == chosen
        assert (out / b["figure"]).stat().st_size > 10_000
    md = (out / "headline.md").read_text()
    assert md.count("| model | source | measured ms | predicted ms |") == 2 and "Verdict" in md
    assert md.count("| candidate | predicted ms | MACs | search score | short-training mAP50-95 |") == 2
    assert "VERDICT b1" in r.stdout and "VERDICT b2" in r.stdout

    again = headline(tiny)  # nothing left to search or train: only the final measurement runs again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "search_b1_1000ms: finished earlier" in again.stdout and "trainings: 0 to run" in again.stdout
    assert "rerank b1: training" in again.stdout and "after the short training" in again.stdout

    clash = headline(tiny, "--epochs", "2")
    assert clash.returncode != 0 and "epochs: 1 then, 2 now" in clash.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not sys.platform.startswith("linux"),
                    reason="needs 2 usable cores (two pool workers) and Linux (PR_SET_PDEATHSIG)")
def test_killing_the_script_stops_its_workers(tiny, tmp_path):
    """SIGKILL of the script (nothing can be cleaned up) must not leave its pool workers running on their own."""
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--smoke", "--space", str(tiny / "space.yaml"),
           "--table", str(tiny / "table.csv"), "--resolution", "64", "--proxy", "params", "--trials", "2000",
           "--budget-ms", "1000", "900", "--budget-rounds", "2", "--jobs", "2", "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NAS_CACHE": str(tiny / "cache")}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in p.stdout:  # both searches running: the workers exist
            if "search search_b2" in line:
                break
        time.sleep(3)
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        workers = [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
    for w in alive:  # a failing run must not leave them searching on the CI machine
        os.kill(w, signal.SIGKILL)
    assert not alive, f"pool workers {alive} outlived the killed script"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
