"""Journal storages losing their backing store under running `nas search` workers: a Redis server stopped for
seconds and started again (with its append-only file the workers wait and carry on; without persistence it comes back
empty and every worker stops with one line instead of running on a study no one else can see), and a journal file
whose folder vanishes (an NFS mount going away; simulated by renaming it): one line, non-zero exit, nothing written
elsewhere, and the same command finishes the study once the folder is back."""
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import servers
import yaml
from optuna.trial import TrialState

from nas.errors import NasError
from nas.search.storage import make_storage

WAIT_S = 120
FAST = {"kind": "proxy", "proxy": "params", "resolution": 64}


@pytest.fixture(params=[True, False], ids=["appendonly", "no-persistence"])
def redis(request):
    reason = servers.redis_missing()
    if reason:
        pytest.skip(reason)
    with servers.redis_server(appendonly=request.param) as server:
        yield server


def _experiment(tmp_path: Path, tiny_dir, tiny_table, url: str, trials: int, **kw) -> Path:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "rel", "space": str(tiny_dir / "space.yaml"),
        "table": str(tiny_table.path), "budget_ms": 1000.0, "mode": "constraint", "scope": "backbone",
        "sampler": "random", "tensorboard_every": 0, "evaluator": FAST, "output": str(tmp_path / "runs"),
        "trials": trials, "storage": url, "study": "rel", "heartbeat_s": 1, "grace_s": 20, "storage_timeout_s": 60,
        **kw}))
    return exp


def _start(exp: Path, i: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = exp.parent / f"w{i}.log"
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nas", "search", str(exp), "--quiet", "--name", f"w{i}",
                                 "--seed", str(i), *extra], stdout=out, stderr=subprocess.STDOUT, cwd=exp.parent,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, log


def _complete(storage) -> dict[int, tuple]:
    try:
        trials = storage.get_all_trials(storage.get_study_id_from_name("rel"))
    except KeyError:
        return {}
    return {t.number: (t.params, t.values, t.user_attrs, t.datetime_complete) for t in trials
            if t.state == TrialState.COMPLETE}


def _wait_all(procs) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    try:
        for proc, log in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("a worker hangs:\n" + "\n".join(log.read_text()[-2000:] for _, log in procs))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [log.read_text() for _, log in procs]


def _check_study(storage, trials: int, kept: dict) -> None:
    stored = storage.get_all_trials(storage.get_study_id_from_name("rel"))
    assert sorted(t.number for t in stored) == list(range(len(stored)))  # unique, no gaps
    assert sum(t.state == TrialState.COMPLETE for t in stored) == trials
    assert not [t.number for t in stored if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    now = _complete(storage)
    assert {k: now.get(k) for k in kept} == kept  # every trial finished before the fault is unchanged


def test_workers_and_a_redis_restart(redis, tiny_dir, tiny_table, tmp_path):
    """Three workers and one told to give up after 4 s; the server stops (a clean shutdown) for 10 s. With the
    append-only file: the patient ones wait, say so in one line each way, and finish the study; without persistence:
    each stops with one line once the server is back, having written nothing to it, and none hangs."""
    trials = 120
    exp = _experiment(tmp_path, tiny_dir, tiny_table, redis.url, trials)
    reader = make_storage(redis.url)
    procs = [_start(exp, i, *(["--storage-timeout", "4"] if i == 3 else [])) for i in range(4)]
    kept = servers.wait_for_complete(lambda: _complete(reader), 15, procs, WAIT_S)
    assert len(kept) < trials - 20, "the search finished too soon; raise trials"
    redis.stop()
    time.sleep(10)
    redis.start()
    logs = _wait_all(procs)
    for i, ((proc, _), text) in enumerate(zip(procs, logs)):
        lines = text.splitlines()
        assert "Traceback" not in text and "[W " not in text, f"worker {i}:\n{text[-4000:]}"
        outages = [line for line in lines if " unreachable since " in line]
        if i == 3:  # the give-up clock: header, the outage, giving up
            assert proc.returncode == 2 and len(lines) == 3, text[-3000:]
            assert "waiting up to 4 s" in outages[0] and "gave up after 4 s" in lines[-1], text[-3000:]
        elif redis.appendonly:
            assert proc.returncode == 0, f"worker {i} exited with {proc.returncode}:\n{text[-3000:]}"
            assert len(outages) == 1 and sum(" is back at " in line for line in lines) == 1, text[-3000:]
        else:
            assert proc.returncode == 2, text[-3000:]
            assert "journal is gone from the Redis server" in lines[-1] and "appendonly" in lines[-1], text[-3000:]
            assert len(lines) <= 3, text[-3000:]  # the header, the outage, the error
    if redis.appendonly:
        _check_study(make_storage(redis.url), trials, kept)
    else:
        import redis as client

        with client.Redis(port=redis.port) as r:
            assert not r.keys(":log:*"), "a worker wrote to the emptied server"


def test_a_journal_folder_that_vanishes(tiny_dir, tiny_table, tmp_path):
    """`--workers 3` on a journal file whose folder is renamed away mid-search: every worker stops within seconds,
    the command says why in one line (and its workers' shared reason once) and exits 2, no folder or journal is
    created in its place; once the folder is back the same command finishes the study with nothing lost."""
    shared = tmp_path / "shared"
    url = f"journal:///{shared / 'study.journal'}"
    trials = 120
    exp = _experiment(tmp_path, tiny_dir, tiny_table, url, trials)
    reader = make_storage(url)
    procs = [_start(exp, 0, "--workers", "3")]
    kept = servers.wait_for_complete(lambda: _complete(reader), 15, procs, WAIT_S)
    assert len(kept) < trials - 20, "the search finished too soon; raise trials"
    shared.rename(tmp_path / "gone")
    start = time.monotonic()
    (text,) = _wait_all(procs)
    took = time.monotonic() - start
    lines = text.splitlines()
    assert procs[0][0].returncode == 2 and took < 20, f"{took:.0f} s\n{text[-3000:]}"
    assert "Traceback" not in text and "[W " not in text, text[-4000:]
    assert f"journal file {shared / 'study.journal'} is gone" in lines[-1] and lines[-1].startswith("nas: error"), text
    assert len(lines) <= 3, text  # the header, the workers' reason (shown once), the command's error
    assert not shared.exists()  # nothing created in its place
    (tmp_path / "gone").rename(shared)

    proc, log = _start(exp, 1)  # the same command again
    (text,) = _wait_all([(proc, log)])
    assert proc.returncode == 0, text[-3000:]
    _check_study(make_storage(url), trials, kept)


def test_a_read_only_journal_stops_with_one_line(tmp_path, monkeypatch):
    """A journal that can be read but not written (a read-only mount; root ignores file modes, so simulated): the
    write is refused with one NasError line naming the file and the cause."""
    from nas.search import journal

    path = tmp_path / "study.journal"
    storage = make_storage(f"journal:///{path}")
    study = optuna.create_study(study_name="rel", storage=storage)
    real_open = os.open

    def read_only(p, flags, *args):
        if str(p) == str(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
        return real_open(p, flags, *args)

    monkeypatch.setattr(journal.os, "open", read_only)
    with pytest.raises(NasError) as e:
        study.ask()
    assert str(e.value) == str(e.value).splitlines()[0]
    assert f"journal file {path} cannot be written (OSError: Read-only file system)" in str(e.value)
    monkeypatch.undo()
    assert len(optuna.load_study(study_name="rel", storage=make_storage(f"journal:///{path}")).trials) == 0


def test_a_worker_started_while_the_server_is_down_waits_for_it(caplog):
    """Opening the storage while its server restarts waits like a running worker (one line each way); a server that
    answers with an error that no wait cures (here: an unknown host) fails at once."""
    import threading

    from nas.search.outage import connect

    reason = servers.redis_missing()
    if reason:
        pytest.skip(reason)
    with servers.redis_server(appendonly=True) as server:
        server.stop()
        threading.Timer(2.0, server.start).start()
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="nas"):
            storage = connect(lambda: make_storage(server.url), server.url, 30)
        assert 1.5 < time.monotonic() - start < 15
        optuna.create_study(study_name="rel", storage=storage)  # it works
        said = [r.getMessage() for r in caplog.records if r.name.startswith("nas")]
        assert len(said) == 2 and "unreachable since" in said[0] and " is back at " in said[1], said
    start = time.monotonic()
    with pytest.raises(NasError) as e:
        connect(lambda: make_storage("redis://no-such-host.invalid:6379"), "redis://no-such-host.invalid", 30)
    assert time.monotonic() - start < 10 and "\n" not in str(e.value)
