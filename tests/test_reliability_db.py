"""`nas search` workers against a PostgreSQL server that goes away mid-search: this test starts its own server
(initdb + pg_ctl in a temporary folder, a free port), runs four workers, stops the server twice (fast, then immediate
shutdown) for several seconds and starts it again. The workers wait, say so in one line per outage, reconnect and
finish the study; the one told to give up sooner exits non-zero with one line saying so."""
import os
import subprocess
import sys
import time

import optuna
import pytest
import servers
import yaml
from optuna.trial import TrialState

from nas.search.storage import make_storage

TRIALS = 200  # enough that four workers are still busy after the first outage (a params trial takes ~0.1 s here)
OUTAGE_S = 10
WAIT_S = 120


@pytest.fixture
def pg_server():
    reason = servers.pg_missing()
    if reason:
        pytest.skip(reason)
    with servers.pg_cluster() as server:
        yield server


def _complete(storage, study: str) -> dict[int, optuna.trial.FrozenTrial]:
    try:
        trials = storage.get_all_trials(storage.get_study_id_from_name(study))
    except KeyError:  # not created yet
        return {}
    return {t.number: t for t in trials if t.state == TrialState.COMPLETE}


def _snapshot(trials: dict[int, optuna.trial.FrozenTrial]) -> dict:
    return {k: (t.params, t.values, t.user_attrs, t.datetime_complete) for k, t in trials.items()}


def test_workers_ride_out_a_postgresql_restart(pg_server, tiny_dir, tiny_table, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "rel", "space": str(tiny_dir / "space.yaml"),
        "table": str(tiny_table.path), "budget_ms": 1000.0, "mode": "constraint", "scope": "backbone",
        "sampler": "random", "tensorboard_every": 0, "evaluator": {"kind": "proxy", "proxy": "params",
                                                                   "resolution": 64},
        "output": str(tmp_path / "runs"), "trials": TRIALS, "storage": pg_server.url, "study": "rel",
        # grace above the outage: a live worker's trial survives it (its heartbeats resume when the server does)
        "heartbeat_s": 1, "grace_s": OUTAGE_S + 10, "storage_timeout_s": 60}))
    reader = make_storage(pg_server.url)  # creates the tables before the workers race to
    procs = []
    for i in range(4):
        log = tmp_path / f"w{i}.log"
        # worker 3 gives up during the first outage; the others outlast both
        extra = ["--storage-timeout", "4"] if i == 3 else []
        with log.open("w") as out:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "nas", "search", str(exp), "--quiet", "--name", f"w{i}", "--seed", str(i),
                 *extra], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                env={**os.environ, "OMP_NUM_THREADS": "1"}), log))
    try:
        kept: dict = {}
        for mode in ("fast", "immediate"):
            done = servers.wait_for_complete(lambda: _complete(reader, "rel"), len(kept) + (30 if kept else 10), procs,
                                             WAIT_S)
            assert len(done) < TRIALS, "the search finished before the outage; raise TRIALS"
            kept.update(_snapshot(done))
            pg_server.stop(mode)
            time.sleep(OUTAGE_S)
            pg_server.start()
        for proc, log in procs:
            proc.wait(timeout=WAIT_S)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [log.read_text() for _, log in procs]
    for i, ((proc, _), text) in enumerate(zip(procs, logs)):
        assert "Traceback" not in text, f"worker {i}:\n{text[-4000:]}"
        outages = [line for line in text.splitlines() if "unreachable" in line and "waiting up to" in line]
        if i == 3:
            assert proc.returncode != 0, text[-3000:]
            assert len(outages) == 1 and "waiting up to 4 s" in outages[0], text[-3000:]
            assert len(text.splitlines()) == 3, text[-3000:]  # the command's header, the outage, giving up
            assert "gave up after 4 s" in text.splitlines()[-1], text[-3000:]
        else:
            assert proc.returncode == 0, f"worker {i} exited with {proc.returncode}:\n{text[-3000:]}"
            # one line per outage and one when it is back (none if the worker was not using the storage then)
            backs = [line for line in text.splitlines() if " is back at " in line]
            assert 1 <= len(outages) <= 2 and len(backs) == len(outages), text[-3000:]
            assert "[W " not in text, text[-3000:]  # nor Optuna's multi-line notices
    trials = reader.get_all_trials(reader.get_study_id_from_name("rel"))
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique, no gaps
    assert sum(t.state == TrialState.COMPLETE for t in trials) == TRIALS
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    after = _snapshot({t.number: t for t in trials if t.number in kept})
    assert after == kept  # every trial finished before a stop is unchanged
