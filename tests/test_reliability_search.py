"""`nas search` as real processes on real storages: a worker SIGKILLed at every point of a trial's life (its trial is
failed and retried, re-running finishes the study within seconds and keeps every finished trial), a worker waiting
for a trial it cannot check (it says so and gives up), and four workers on one study."""
import math
import multiprocessing as mp
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import optuna
import pytest
import yaml
from conftest import median_budget
from optuna.trial import TrialState

from nas.arch.spec import dumps_arch, loads_arch
from nas.errors import ConfigError, NasError
from nas.search.experiment import apply_overrides, experiment_from_dict
from nas.search.storage import MAX_RETRY, PAUSE_ENV, WORKER_ATTR, heartbeats, make_storage

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
# A real evaluator made slow by its setting alone: grad_norm at 512 px takes ~1 s per tiny candidate here,
# long enough to observe the trial inside the evaluator and kill it there.
SLOW = {"kind": "proxy", "proxy": "grad_norm", "resolution": 512, "batch": 8}
FAST = {"kind": "proxy", "proxy": "params", "resolution": 64}
WAIT_S = 120  # per process: far above the few seconds each needs, so only a hang trips it


@pytest.fixture
def pg_study():
    """(URL, a study name no other test uses); the study is deleted afterwards."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"nas-reliability-{uuid.uuid4().hex[:10]}"
    yield PG_URL, name
    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:  # the test failed before a worker created it
        pass


def _experiment(path: Path, tiny_dir, tiny_table, **kw) -> Path:
    # by default a budget far above any tiny candidate: every trial runs the evaluator
    d = {"format": "nas/experiment@1", "name": "rel", "space": str(tiny_dir / "space.yaml"),
         "table": str(tiny_table.path), "budget_ms": 1000.0, "mode": "constraint", "scope": "backbone",
         "sampler": "random", "tensorboard_every": 0, "evaluator": FAST, "output": str(path.parent / "runs")}
    d.update(kw)
    path.write_text(yaml.safe_dump(d))
    return path


def _search(exp: Path, *args: str, log: Path) -> subprocess.Popen:
    # one intra-op thread whatever the caller's environment: several workers share this machine's cores
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "nas", "search", str(exp), "--quiet", *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=exp.parent,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"`nas search` (pid {proc.pid}) still running after {WAIT_S} s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, f"`nas search` exited with {proc.returncode}:\n{log.read_text()[-3000:]}"


def _trials(storage, study: str) -> list[optuna.trial.FrozenTrial]:
    """Straight from the storage: no Study object, no cache between the test and the workers."""
    return storage.get_all_trials(storage.get_study_id_from_name(study))


def _kill_mid_trial(proc: subprocess.Popen, storage, study: str, after: int, log: Path) -> int:
    """SIGKILL the worker as soon as, with `after` trials COMPLETE, a trial is RUNNING inside the evaluator (its arch
    recorded, no score yet); returns that trial's number."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        try:
            trials = _trials(storage, study)
        except KeyError:  # the worker is still importing; it creates the study
            trials = []
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        busy = [t.number for t in trials if t.state == TrialState.RUNNING and "arch" in t.user_attrs
                and "score" not in t.user_attrs]
        if busy and done >= after:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return busy[0]
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail(f"no trial was running after {after} complete within {WAIT_S} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("kind,n,after", [
    ("sqlite", 2, 1),       # the last trial dies: the re-run has nothing to start and must reap it while it waits
    ("postgresql", 3, 1),   # a middle one dies: the re-run reaps it when it starts its next trial (or while waiting)
])
def test_killed_worker_trial_is_retried_and_rerun_completes(kind, n, after, tiny_dir, tiny_table, tmp_path, request):
    if kind == "postgresql":
        url, study = request.getfixturevalue("pg_study")
    else:
        url, study = f"sqlite:///{tmp_path / 'study.db'}", "rel"
    # 1 s heartbeats, 4 s grace: a dead trial is reaped in seconds, a live one on this busy core is not
    exp = _experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table, trials=n, storage=url, study=study,
                      evaluator=SLOW, heartbeat_s=1, grace_s=4)
    log = tmp_path / "search.log"
    reader = make_storage(url)  # made before the worker starts, so the two never race to create the tables
    dead = _kill_mid_trial(_search(exp, log=log), reader, study, after, log)

    before = {t.number: t for t in _trials(reader, study)}
    assert before[dead].state == TrialState.RUNNING, f"trial {dead} finished before the kill landed; rerun"
    kept = {t.number: (t.params, t.values, t.user_attrs) for t in before.values() if t.state == TrialState.COMPLETE}
    assert len(kept) >= after

    _finish(_search(exp, log=log), log)  # the same command again
    trials = _trials(reader, study)
    by_number = {t.number: t for t in trials}
    assert by_number[dead].state == TrialState.FAIL
    # Optuna's RetryHeartbeatStaleTrialCallback queued exactly one copy of the dead trial, and it ran
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [dead]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == dead
    # a retry inherits the dead trial's user attrs; a score (the dead one had none) shows the objective ran again
    assert retry.number > dead and retry.state == TrialState.COMPLETE and "score" in retry.user_attrs
    assert retry.params == by_number[dead].params
    assert retry.user_attrs["predicted_ms"] == by_number[dead].user_attrs["predicted_ms"]  # the same candidate
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # nothing finished before the kill was lost or rewritten
    assert {k: (by_number[k].params, by_number[k].values, by_number[k].user_attrs) for k in kept} == kept


GRACE_S = 3  # with 1 s heartbeats, as above: a dead trial is reaped in seconds, a live one on this busy core is not
# A trial's life in order, as nas.search.storage names the points where NAS_TEST_PAUSE_AT stops a worker. Journal
# storages have no heartbeat. The slow evaluator changes nothing before the evaluator starts.
POINTS = {("sqlite", "fast"): ("created", "beat", "beaten", "evaluator", "result"),
          ("postgresql", "fast"): ("created", "beat", "beaten", "evaluator", "result"),
          ("journal", "fast"): ("created", "evaluator", "result"),
          ("sqlite", "slow"): ("created", "evaluator", "result"),
          ("postgresql", "slow"): ("created", "evaluator", "result"),
          ("journal", "slow"): ("created", "evaluator", "result")}


def _nas_search(argv: list[str], cwd: str, log: str, env: dict[str, str]) -> None:
    """A forked worker: `nas search ARGV` run from `cwd` with `env` added and its output in `log`."""
    os.chdir(cwd)
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    from nas.commands.main import main

    sys.exit(main(["search", *argv]))


@pytest.fixture(scope="module")
def fork_search():
    """start(exp, log, pause=None) -> a `nas search EXP --quiet` process, forked from a server that has imported
    nas, torch and Optuna and run nothing: a real process that starts in milliseconds instead of 3-5 s, so one test
    can kill a dozen. One intra-op thread, as for the subprocesses above."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads a process's state from /proc")
    ctx = mp.get_context("forkserver")
    # what `nas search` imports, lazily ones included (the first trial's meta-device cost pulls in torch._dynamo)
    ctx.set_forkserver_preload([__name__, "nas.commands.main", "nas.commands.search", "nas.search.study",
                                "nas.search.objective", "nas.search.proxies", "nas.report.tensorboard",
                                "torch._dynamo", "alembic.command", "alembic.config", "alembic.migration",
                                "alembic.script"])
    tests = str(Path(__file__).parent)
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1",
                                      "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}):
        multiprocessing.forkserver.ensure_running()

    def start(exp: Path, log: Path, pause: str | None = None) -> mp.Process:
        proc = ctx.Process(target=_nas_search, args=([str(exp), "--quiet"], str(exp.parent), str(log),
                                                     {PAUSE_ENV: pause} if pause else {}))
        proc.start()
        return proc

    return start


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def _kill_at(start, exp: Path, point: str, log: Path) -> None:
    """Run the command with NAS_TEST_PAUSE_AT=point until the worker has stopped itself there, then SIGKILL it."""
    proc = start(exp, log, point)
    deadline = time.monotonic() + WAIT_S
    while not _stopped(proc.pid):
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            proc.join()
            pytest.fail(f"the worker never stopped at {point!r} (exit code {proc.exitcode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def _check_point(point: str, t: optuna.trial.FrozenTrial, beats: dict | None) -> None:
    """The killed trial is in the state its point names (so the hook stopped the worker where it says)."""
    beat = None if beats is None else t._trial_id in beats
    assert t.state == TrialState.RUNNING and t.values is None, (point, t)
    if point == "created":
        assert not t.params and WORKER_ATTR not in t.system_attrs and not beat, (point, t)
    elif point == "beat":
        assert beat is False, (point, t)
    elif point == "beaten":
        assert beat is True, (point, t)
    elif point == "evaluator":
        assert "arch" in t.user_attrs and "score" not in t.user_attrs, (point, t)
    else:
        assert "score" in t.user_attrs, (point, t)


@pytest.mark.parametrize("kind,speed", list(POINTS))
def test_a_worker_killed_at_any_point_of_a_trial_loses_nothing(kind, speed, fork_search, tiny_dir, tiny_table,
                                                                tmp_path, request):
    """One worker after another is SIGKILLed at the next point of a trial's life (each also resumes the study the
    last one left); then the same command, run once more, ends with exactly `trials` complete within grace_s and a
    few seconds: every killed trial failed and retried once with its parameters, none left running or queued."""
    if kind == "postgresql":
        url, study = request.getfixturevalue("pg_study")
    else:
        url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 'study.journal'}"
        study = "rel"
    points = POINTS[kind, speed]
    n = len(points) + 2  # room for every retry: the last run must reap them all before it can finish
    exp = _experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table, trials=n, storage=url, study=study,
                      evaluator=FAST if speed == "fast" else SLOW, heartbeat_s=1, grace_s=GRACE_S)
    log = tmp_path / "search.log"
    reader = make_storage(url)  # made before the workers, so they never race to create the tables
    killed = []
    for point in points:
        running = {t.number for t in _trials(reader, study) if t.state == TrialState.RUNNING} if killed else set()
        _kill_at(fork_search, exp, point, log)
        trials = _trials(reader, study)
        new = [t for t in trials if t.state == TrialState.RUNNING and t.number not in running]
        assert len(new) == 1, (point, [(t.number, t.state.name) for t in trials])
        _check_point(point, new[0], heartbeats(reader, reader.get_study_id_from_name(study)))
        killed.append(new[0].number)

    start = time.monotonic()
    proc = fork_search(exp, log)
    proc.join(WAIT_S)
    took = time.monotonic() - start
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"the re-run was still waiting after {took:.0f} s:\n{log.read_text()[-3000:]}")
    assert proc.exitcode == 0, f"exit code {proc.exitcode} after {took:.0f} s:\n{log.read_text()[-3000:]}"
    slow_s = 2.0 * n if speed == "slow" else 0.0  # the slow evaluator's trials themselves, ~1 s each here
    assert took < GRACE_S + 6 + slow_s, f"{took:.1f} s:\n{log.read_text()[-3000:]}"

    trials = _trials(reader, study)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique, no gaps
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.number for t in failed} >= set(killed) and not [t for t in failed if t.user_attrs.get("surplus")]
    for dead in failed:  # retried once (Optuna's bookkeeping), as the same candidate, under its own worker's name
        retries = [t for t in trials if t.system_attrs.get("retry_history", [None])[-1] == dead.number]
        history = dead.system_attrs.get("retry_history", [])
        assert len(retries) == (len(history) < MAX_RETRY), (dead.number, [(t.number, t.system_attrs) for t in trials])
        for retry in retries:
            assert retry.system_attrs["retry_history"] == [*history, dead.number]
            assert dead.params.items() <= retry.params.items()
            assert retry.system_attrs.get(WORKER_ATTR) != dead.system_attrs.get(WORKER_ATTR)


def test_a_worker_waiting_for_a_trial_it_cannot_check_says_so_and_gives_up(tiny_dir, tiny_table, tmp_path,
                                                                          monkeypatch, caplog):
    """A journal trial running on another host (no heartbeat to read, no process to ask): the worker waiting for it
    says what it waits for in one line, then gives up with a NasError after the time it stated."""
    from nas.search import study as study_module

    monkeypatch.setattr(study_module, "WAIT_GRACES", 1)  # the mechanism, in grace_s instead of 5 x grace_s
    url = f"journal:///{tmp_path / 'study.journal'}"
    exp = experiment_from_dict(yaml.safe_load(_experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table, trials=1,
                                                          storage=url, heartbeat_s=1, grace_s=2).read_text()),
                               str(tmp_path / "exp.yaml"))
    storage = make_storage(url)
    study = optuna.create_study(study_name="rel", storage=storage, direction="maximize")
    trial = study.ask()
    storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, "another-host:4242")
    start = time.monotonic()
    with caplog.at_level("INFO", logger="nas"), pytest.raises(NasError) as e:
        study_module.run(exp, progress=False)
    assert 2 <= time.monotonic() - start < 10
    assert "waited 2 s for trial(s) 0 (another-host:4242)" in str(e.value) and "\n" not in str(e.value)
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waiting) == 1 and "trial(s) 0 (another-host:4242)" in waiting[0] and "giving up after 2 s" in waiting[0]
    assert waiting[0] == waiting[0].splitlines()[0]


def _check_shared_study(storage, study: str, table, trials: int) -> None:
    stored = _trials(storage, study)
    assert sorted(t.number for t in stored) == list(range(len(stored)))  # unique, no gaps
    complete = [t for t in stored if t.state == TrialState.COMPLETE]
    assert len(complete) == trials
    # the only other trials allowed are the surplus guard's: two workers both started the last missing trial
    odd = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in stored
           if t.state != TrialState.COMPLETE and not (t.state == TrialState.FAIL and t.user_attrs.get("surplus"))]
    assert not odd
    for t in complete:
        text = t.user_attrs["arch"]
        arch = loads_arch(text)
        assert dumps_arch(arch) == text
        assert arch.name.endswith(f"-trial-{t.number}")  # each trial stored its own candidate, not a neighbour's
        assert round(table.predict(arch).total_ms, 4) == t.user_attrs["predicted_ms"]
        if t.user_attrs["evaluated"]:  # the params proxy, scored on that very arch
            assert math.isclose(t.value, math.log(t.user_attrs["params"]))
        else:
            # predicted_ms is stored rounded to 0.1 us: at worst equal to the budget it exceeded
            assert t.user_attrs["predicted_ms"] >= t.user_attrs["budget_ms"] - 1e-4 and t.value == -math.inf
    assert {t.user_attrs["evaluated"] for t in complete} == {True, False}
    # the work was shared (how evenly depends on how fast each process imports)
    assert len({t.system_attrs["nas:worker"] for t in complete}) >= 2


def test_four_worker_processes_share_a_postgresql_study(tiny_dir, tiny_table, tmp_path, pg_study):
    url, study = pg_study
    exp = _experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table, trials=40,
                      budget_ms=median_budget(tiny_dir, tiny_table))
    reader = make_storage(url)
    # four separate commands, as on four machines: own run folder and seed, same storage and study
    procs = [(_search(exp, "--storage", url, "--study", study, "--name", f"w{i}", "--seed", str(i),
                      log=tmp_path / f"w{i}.log"), tmp_path / f"w{i}.log") for i in range(4)]
    for proc, log in procs:
        _finish(proc, log)
    _check_shared_study(reader, study, tiny_table, 40)


def test_four_local_workers_share_a_journal_file(tiny_dir, tiny_table, tmp_path):
    url = f"journal:///{tmp_path / 'shared' / 'study.journal'}"
    exp = _experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table, trials=40, storage=url,
                      budget_ms=median_budget(tiny_dir, tiny_table))
    log = tmp_path / "search.log"
    _finish(_search(exp, "--workers", "4", log=log), log)
    _check_shared_study(make_storage(url), "rel", tiny_table, 40)


def test_heartbeat_settings_are_validated(tiny_dir, tiny_table, tmp_path):
    d = yaml.safe_load(_experiment(tmp_path / "exp.yaml", tiny_dir, tiny_table).read_text())
    exp = experiment_from_dict(d, "exp.yaml")
    assert (exp.heartbeat_s, exp.grace_s) == (10, 30)  # the defaults stay as they were
    assert apply_overrides(exp, {"heartbeat_s": 2, "grace_s": 5}).grace_s == 5
    for change, field, words in ((dict(grace_s=10), "grace_s", "longer than heartbeat_s (10)"),
                                 (dict(heartbeat_s=0), "heartbeat_s", "between 1 and"),
                                 (dict(heartbeat_s=True), "heartbeat_s", "")):
        with pytest.raises(ConfigError) as e:
            experiment_from_dict({**d, **change}, "exp.yaml")
        assert e.value.field == field and words in str(e.value)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_search_writes_only_into_its_run_folder(tiny_dir, tiny_table, tmp_path):
    """Nothing outside RUN (output/name): not in the working directory, HOME, or the temp dir once it is done;
    TensorBoard figures on, so matplotlib and the event writer are exercised too."""
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for d in (work, home, tmp):
        d.mkdir()
    exp = _experiment(work / "exp.yaml", tiny_dir, tiny_table, trials=6, tensorboard_every=3,
                      output=str(tmp_path / "out"))
    before = _files(tmp_path)
    log = tmp_path / "search.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nas", "search", str(exp), "--quiet"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home), "TMPDIR": str(tmp),
                                     "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / ".mpl")})
    _finish(proc, log)
    new = _files(tmp_path) - before - {log}
    run_dir = tmp_path / "out" / "rel"
    # the one exception, documented in the README: matplotlib's font cache, in MPLCONFIGDIR (default ~/.matplotlib)
    outside = sorted(str(p.relative_to(tmp_path)) for p in new
                     if run_dir not in p.parents and home / ".mpl" not in p.parents)
    assert not outside, outside
    assert (run_dir / "study.db").is_file() and any((run_dir / "tb").rglob("events.*"))
