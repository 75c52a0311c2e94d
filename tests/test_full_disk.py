"""A disk that fills (issue 20, point 2) and two writers of one latency table (item 4), with real `nas` processes.

The full disk is the file size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, so a write past it fails with EFBIG,
as one on a full disk fails with ENOSPC), set for the child process at its start, or set on the running child
(prlimit) once it has saved what must survive. Each case: the command fails with one line naming the file and the
cause and no traceback, what was saved before stays loadable and no temp file is left, and the same command run
again once the limit is gone ends as an uninterrupted run would.
"""
from __future__ import annotations

import csv
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import TINY
from optuna.trial import TrialState

from nas.detect.checkpoint import load_checkpoint
from nas.detect.digits import generate_digits
from nas.latency.coverage import arch_ops, op_key
from nas.latency.table import LatencyTable
from nas.search.storage import make_storage
from nas.space import space_from_dict
from nas.system import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ARCH = "mobilenet_v3_small_100"
QUICK_LUT = ("--repeats", "3", "--min-time", "0", "--warmup", "1", "--warmup-time", "0", "--quiet")


def _argv(*args) -> list[str]:
    return [sys.executable, "-m", "nas", *map(str, args)]


def _limit(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def _nas(*args, cwd: Path, limit: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(*args), check=False, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit(limit) if limit else None)


def _refused(r: subprocess.CompletedProcess, file: str | Path, what: str) -> str:
    """The one error line of a command stopped by the limit: it names `file`, the cause and `what` was written."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nas: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert str(file) in errors[0] and what in errors[0] and "free space" in errors[0], errors[0]
    assert re.search(r"EFBIG|SQLITE_IOERR_WRITE", errors[0]) and "ulimit -f" in errors[0], errors[0]
    return errors[0]


def _no_temp_files(folder: Path) -> None:
    assert not list(folder.rglob("*.tmp")), list(folder.rglob("*.tmp"))


# ---------------------------------------------------------------- nas train: last.pt, results.csv, TensorBoard

TRAIN = ("--data", "{data}", "--epochs", "3", "--imgsz", "96", "--batch", "8", "--neck", "dw", "--close-mosaic", "1",
         "--seed", "3", "--workers", "0", "--threads", "1", "--no-onnx", "--quiet")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    # 96 images = 12 steps of 8: an epoch of about a second, long enough to set the limit while it trains
    root = tmp_path_factory.mktemp("digits")
    return str(generate_digits(root, 96, 16, imgsz=96, min_size=12, max_size=40, progress=False, workers=0))


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("train")
    r = _nas("train", f"zoo:{ARCH}", *(a.format(data=digits) for a in TRAIN), "--project", project, "--name", "full",
             cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    return project / "full"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:  # times differ between runs; everything else must not
        return [{k: v for k, v in r.items() if "time" not in k} for r in csv.DictReader(f)]


@pytest.mark.parametrize("limit,file,what", [
    (300, "results.csv", "writing the training history"),        # 2 rows: ~430 bytes
    (1000, "events.out.tfevents.", "writing TensorBoard events"),  # epoch 2's scalars take it past 1000 bytes
    (4_000_000, "weights/", "saving the checkpoint"),             # a checkpoint: 17 MB
])
def test_training_on_a_full_disk_stops_in_one_line_and_resumes(limit, file, what, digits, uninterrupted, tmp_path):
    run = tmp_path / "run"
    last = run / "weights" / "last.pt"
    proc = subprocess.Popen(_argv("train", f"zoo:{ARCH}", *(a.format(data=digits) for a in TRAIN), "--project",
                                  tmp_path, "--name", "run"), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # epoch 1 is saved (best.pt is written before last.pt): epoch 2's writes meet the limit
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    out, err = proc.communicate(timeout=90)
    line = _refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run, what)
    assert file in line and f"nas train --resume --project {tmp_path} --name run" in line, line
    assert load_checkpoint(last)["epoch"] == 1, "epoch 2 was saved before the limit was set: make epochs longer"
    _no_temp_files(run)

    r = _nas("train", "--resume", "--project", tmp_path, "--name", "run", "--workers", "0", "--threads", "1",
             "--no-onnx", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rows(run / "results.csv") == _rows(uninterrupted / "results.csv")  # epochs 1-3, losses, LRs, mAP
    a, b = load_checkpoint(last), load_checkpoint(uninterrupted / "weights" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["ema_updates"] == b["ema_updates"]
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


# ---------------------------------------------------------------- nas lut build / extend: the table

@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path / "tiny.yaml"


def _space_keys(path: Path) -> set[str]:
    return {op_key(b, s) for b, s in space_from_dict(TINY, str(path)).ops()}


def _arch_keys(name: str, resolution: int = 64) -> set[str]:
    from nas.arch.zoo import get_arch

    return {op_key(b, s) for _, b, s in arch_ops(get_arch(name).with_resolution(resolution))}


def test_lut_build_on_a_full_disk_leaves_no_half_table_and_runs_again(tiny_yaml, tmp_path):
    out = tmp_path / "t.csv"
    build = ("lut", "build", "--space", tiny_yaml, "--out", out, "--calibrate", "0", *QUICK_LUT)
    r = _nas(*build, cwd=tmp_path, limit=1000)  # the table takes ~3 KB
    _refused(r, out, "saving the latency table")
    assert not out.exists()
    _no_temp_files(tmp_path)
    r = _nas(*build, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(LatencyTable.load(out).entries) == _space_keys(tiny_yaml)


def test_lut_extend_on_a_full_disk_keeps_the_table_and_runs_again(tiny_yaml, tmp_path):
    table = tmp_path / "t.csv"
    r = _nas("lut", "build", "--arch", f"zoo:{ARCH}", "--resolution", 64, "--out", table, "--calibrate", "0",
             *QUICK_LUT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before = table.read_text()
    extend = ("lut", "extend", table, "--space", tiny_yaml, "--quiet")
    _refused(_nas(*extend, cwd=tmp_path, limit=len(before) + 300), table, "saving the latency table")
    assert table.read_text() == before  # the previous table, whole
    assert set(LatencyTable.load(table).entries) == _arch_keys(ARCH)
    _no_temp_files(tmp_path)
    r = _nas(*extend, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(LatencyTable.load(table).entries) == _arch_keys(ARCH) | _space_keys(tiny_yaml)


# ---------------------------------------------------------------- nas search: the study, TensorBoard events

def _experiment(tmp_path: Path, tiny_dir, tiny_table, **kw) -> Path:
    d = {"format": "nas/experiment@1", "name": "disk", "space": str(tiny_dir / "space.yaml"),
         "table": str(tiny_table.path), "budget_ms": 1000.0, "mode": "pareto", "scope": "backbone",
         "sampler": "random", "trials": 16, "seed": 0, "tensorboard_every": 5,
         "evaluator": {"kind": "proxy", "proxy": "macs", "resolution": 64}, "output": str(tmp_path / "runs"), **kw}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "exp.yaml"


def _complete(url: str) -> dict[int, tuple]:
    s = optuna.load_study(study_name="disk", storage=make_storage(url))
    return {t.number: (t.params, t.values) for t in s.get_trials(states=(TrialState.COMPLETE,))}


def _logged_trials(tb: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(ev.step for f in tb.glob("events.out.tfevents.*") for ev in EventFileLoader(str(f)).Load()
                  if any(v.tag == "trial/feasible" for v in ev.summary.value))


@pytest.mark.parametrize("storage,limit,tb_every,file,what", [
    # SQLite's WAL grows ~0.4 MB a trial: the study meets the limit a few trials in
    ("sqlite", 2_000_000, 5, "study.db", "writing the study"),
    # a journal grows ~10 KB a trial: a line cut short must not make the journal unreadable once more is appended
    ("journal", 40_000, 1000, "study.journal", "writing the study"),
    # the events file grows faster with a Pareto figure every 2 trials: TensorBoard meets the limit first
    ("journal", 100_000, 2, "tb/events.out.tfevents.", "writing TensorBoard events"),
])
def test_search_on_a_full_disk_stops_in_one_line_and_resumes(storage, limit, tb_every, file, what, tiny_dir,
                                                             tiny_table, tmp_path):
    run = tmp_path / "runs" / "disk"
    url = f"sqlite:///{run / 'study.db'}" if storage == "sqlite" else f"journal://{run / 'study.journal'}"
    exp = _experiment(tmp_path, tiny_dir, tiny_table, storage=url, tensorboard_every=tb_every)
    r = _nas("search", exp, "--quiet", cwd=tmp_path, limit=limit)
    line = _refused(r, run, what)
    assert file in line and "run the same command again" in line, line
    before = _complete(url)  # the study as it was, readable
    assert 1 <= len(before) < 16, before.keys()

    r = _nas("search", exp, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _complete(url)
    assert len(after) == 16 and all(after[n] == v for n, v in before.items())
    assert _logged_trials(run / "tb") == sorted(after)  # every trial in TensorBoard, once


# ---------------------------------------------------------------- two writers of one table

def test_two_lut_extends_of_one_table_keep_both_op_sets(tiny_yaml, tmp_path):
    table = tmp_path / "t.csv"
    r = _nas("lut", "build", "--arch", f"zoo:{ARCH}", "--resolution", 64, "--out", table, "--calibrate", "0",
             *QUICK_LUT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    op_sets = [("--space", tiny_yaml), ("--arch", "zoo:mobilenet_v2_100", "--resolution", 64)]
    # the test holds the table's lock until both have started and wait: they overlap for sure, then run in turn
    with exclusive_lock(table.with_name(table.name + ".lock")):
        procs = [subprocess.Popen(_argv("lut", "extend", table, *ops, "--quiet"), cwd=tmp_path, env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=log.open("w")) for ops, log in zip(op_sets, logs)]
        deadline = time.monotonic() + 60
        while not all("waiting for another process writing" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.05)
    for p, log in zip(procs, logs):
        assert p.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert log.read_text().count("\n") == 1, log.read_text()  # the wait is one line, and nothing else
    assert set(LatencyTable.load(table).entries) == (_arch_keys(ARCH) | _space_keys(tiny_yaml)
                                                     | _arch_keys("mobilenet_v2_100"))


def test_two_lut_builds_of_one_table_one_wins_the_other_refuses(tiny_yaml, tmp_path):
    out = tmp_path / "t.csv"
    procs = [subprocess.Popen(_argv("lut", "build", "--space", tiny_yaml, "--out", out, "--calibrate", "0",
                                    *QUICK_LUT), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=90), p.communicate()[1]) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert f"{out}: exists; use `nas lut extend`" in results[1][1] and "Traceback" not in results[1][1]
    assert set(LatencyTable.load(out).entries) == _space_keys(tiny_yaml)
