"""Optuna storages: SQLite (fast pragmas), any SQLAlchemy URL, journal file, Redis journal; heartbeats, and the
failure and retry of trials whose worker died (outages: nas.search.outage; journal backends: nas.search.journal)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from nas.errors import NasError
from nas.search.journal import FileJournal, JournalLock, RedisJournal
from nas.search.outage import mask_url, quiet_lost_connections, steady_heartbeats

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10          # defaults of the experiment's heartbeat_s / grace_s: the RDB heartbeat period; a trial


GRACE_S = 30              # silent for GRACE_S is declared dead and retried


MAX_RETRY = 3


STORAGE_TIMEOUT_S = 120   # a worker whose storage is unreachable this long gives up (experiment storage_timeout_s)


WORKER_ATTR = "nas:worker"  # host:pid of the process running a trial: who to ask whether it is still alive


PAUSE_ENV = "NAS_TEST_PAUSE_AT"  # test hook, inert unless set: the worker SIGSTOPs itself at that point of a trial


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> optuna.storages.BaseStorage:
    """SQLAlchemy URLs get heartbeats every `heartbeat_s` (a trial silent for `grace_s` is failed and retried);
    journal:///FILE and redis://HOST give journal storages, which parallel workers on one machine (file) or many
    (Redis) can share."""
    storage, lock = _open_storage(url, heartbeat_s, grace_s)
    if isinstance(storage, optuna.storages.RDBStorage):
        steady_heartbeats(storage)
        quiet_lost_connections()
    if os.environ.get(PAUSE_ENV):
        _install_pauses(storage, os.environ[PAUSE_ENV], lock)
    return storage


def _open_storage(url: str, heartbeat_s: int, grace_s: int) -> tuple[optuna.storages.BaseStorage, Any]:
    """(the storage, the journal file's lock or None); any failure as one line, password masked, its cause chained
    (a server that is down: nas.search.outage.connect waits for it)."""
    try:
        return _open(url, heartbeat_s, grace_s)
    except NasError:
        raise
    except Exception as e:  # a bad URL, a server that is down, a missing driver
        raise NasError(f"storage {mask_url(url)}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                       .replace(url, mask_url(url))) from e


def _open(url: str, heartbeat_s: int, grace_s: int) -> tuple[optuna.storages.BaseStorage, Any]:
    if url.startswith("journal://"):
        path = Path("/" + url.removeprefix("journal://").lstrip("/"))  # journal:////abs/path as /abs/path
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = JournalLock(path.with_name(path.name + ".flock")) if os.name == "posix" else None
        return optuna.storages.JournalStorage(FileJournal(str(path), lock_obj=lock)), lock
    if url.startswith("redis://"):
        with quiet_experimental():  # JournalRedisBackend is marked experimental; stable since Optuna 3.1
            return optuna.storages.JournalStorage(RedisJournal(url)), None
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with quiet_experimental():
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
            heartbeat_stale_trial_callback=RetryDeadTrial(max_retry=MAX_RETRY),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    if url.startswith("sqlite"):
        _fast_sqlite(storage)
    return storage, None


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's ExperimentalWarning off for the heartbeat API calls inside (stable enough), and only for those."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for fsync (16 ms each here, ~100 per trial),
    and a killed process still loses nothing committed; only a power cut can drop the last transactions."""
    from sqlalchemy import event

    def on_connect(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # reconnect so every pooled connection gets the pragmas


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RetryDeadTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial (a WAITING copy with the same parameters and user attributes,
    `failed_trial`/`retry_history` in its system attributes, at most `max_retry` times), without what belonged to
    the dead run: its worker (the copy would look dead the moment a live worker pops it), constraints, fail reason."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = trial.user_attrs.get("fail_reason", "its heartbeat stopped")
        history = trial.system_attrs.get("retry_history", [])
        if self._max_retry is not None and len(history) >= self._max_retry:
            logger.warning("trial %d failed: %s; not retried: it was retried %d times already", trial.number, reason,
                           len(history))
            return
        trial = copy.deepcopy(trial)
        # its worker, and the constraints the retry's objective sets again (Optuna ignores a second set_constraint)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items()
                              if k != WORKER_ATTR and not k.startswith("constraints:")}
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", "surplus")}
        super().__call__(study, trial)
        logger.warning("trial %d failed: %s; retried with the same parameters", trial.number, reason)


def heartbeats(storage: optuna.storages.BaseStorage, study_id: int) -> dict[int, datetime] | None:
    """trial id -> last heartbeat of the study's RUNNING trials that have one; None: the storage has no heartbeats."""
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.get_heartbeat_interval() is None:
        return None
    from sqlalchemy import text

    # Optuna's own stale check skips trials without a heartbeat row: this query is how we see them
    query = text("SELECT h.trial_id, h.heartbeat FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
                 "WHERE t.study_id = :study AND t.state = 'RUNNING'")
    with storage.engine.connect() as conn:
        return dict(conn.execute(query, {"study": study_id}).all())


def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, grace_s: float) -> list[int]:
    """Fail, and retry with the same parameters (RetryDeadTrial), the RUNNING trials whose worker is gone that
    Optuna's heartbeat check cannot see or would see only `grace_s` later: on SQL storages those without a heartbeat
    (their worker died before its first one) and those whose worker ran on this host, on journal storages (no
    heartbeats) all. Gone: the trial's worker ran on this host and its process no longer exists, or the trial showed
    no sign of life (a heartbeat; journal: its worker's host:pid) `grace_s` after it started. Returns the numbers of
    the trials failed."""
    beats = heartbeats(storage, study._study_id)
    host, now = socket.gethostname(), datetime.now()  # Optuna's datetime_start: local time, naive
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if beats is not None and t._trial_id in beats:
            owner = t.system_attrs.get(WORKER_ATTR, "")
            # a dead local worker's trial at once (a SIGKILLed worker's beats stop too, but grace_s later)
            if owner_alive(owner) is False and fail_and_retry(study, t._trial_id, f"its worker {owner} is gone"):
                failed.append(t.number)
            continue  # elsewhere: Optuna's stale check, no heartbeat for grace_s
        reason = _death(t, host, now, grace_s, journal=beats is None)
        if reason is not None and fail_and_retry(study, t._trial_id, reason):
            failed.append(t.number)
    return failed


def fail_own_trials(study: optuna.Study) -> list[int]:
    """Fail, and retry, the RUNNING trials of this worker: called between trials (after a storage outage broke the
    trial in flight), when none of them can still be running. Returns their numbers."""
    me = worker_id()
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.system_attrs.get(WORKER_ATTR) == me
            and fail_and_retry(study, t._trial_id, "the storage went away while it ran")]


def fail_and_retry(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Fail a RUNNING trial with `reason` and queue its retry (RetryDeadTrial); False if it finished first."""
    try:
        study._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        if not study._storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:  # it finished, or another worker failed it first
        return False
    with quiet_experimental():
        RetryDeadTrial(max_retry=MAX_RETRY)(study, study._storage.get_trial(trial_id))
    return True


def _death(t: FrozenTrial, host: str, now: datetime, grace_s: float, journal: bool) -> str | None:
    """Why trial `t` (RUNNING, no heartbeat) is dead, or None while its worker may be alive."""
    owner = t.system_attrs.get(WORKER_ATTR, "")
    if owner_alive(owner) is False:
        return f"its worker {owner} is gone"
    age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
    if age <= grace_s:
        return None
    if not journal:  # a live worker writes its trial's first heartbeat within milliseconds of starting it
        return f"no heartbeat {age:.0f} s after it started (worker {owner or 'unknown'})"
    if not owner:  # the same for its host:pid, the objective's first write
        return f"no worker recorded {age:.0f} s after it started"
    return None  # journal, another host: no way to tell (Redis journals have no heartbeat)


def owner_alive(owner: str) -> bool | None:
    """Whether the process `owner` (host:pid) is alive; None when it runs on another host (or is unknown). A zombie
    (exited, its parent has not collected it yet) is dead: it runs nothing."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # Linux: the state after the command name in /proc/PID/stat
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def pause_here(point: str) -> None:
    """The PAUSE_ENV test hook: stop this process (all its threads) at `point`; a test then SIGKILLs it there."""
    if os.environ.get(PAUSE_ENV) == point:
        # sent to this thread, which stops before it runs one more line (os.kill lets the kernel pick the main
        # thread, and a heartbeat thread could still write its heartbeat while the stop spreads)
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def _install_pauses(storage: optuna.storages.BaseStorage, point: str, lock: JournalLock | None) -> None:
    """PAUSE_ENV's storage points: `created` (the trial exists, nothing more), `beat` / `beaten` (just before /
    after a trial's first heartbeat), `result` (inside the write of a trial's COMPLETE state and values, with the
    journal file's lock or the SQL transaction held). `evaluator` is in Objective.evaluate."""
    rdb = isinstance(storage, optuna.storages.RDBStorage)
    if point == "created":  # Optuna's trial cache creates RDB trials through _create_new_trial
        name = "_create_new_trial" if rdb else "create_new_trial"
        setattr(storage, name, _then(getattr(storage, name), lambda: pause_here("created")))
    elif point in ("beat", "beaten") and rdb:
        beat = storage.record_heartbeat

        def record_heartbeat(trial_id: int) -> None:
            pause_here("beat")
            beat(trial_id)
            pause_here("beaten")

        storage.record_heartbeat = record_heartbeat
    elif point == "result":
        final = threading.local()
        set_state = storage.set_trial_state_values

        def set_trial_state_values(trial_id: int, state: TrialState, values: Any = None) -> bool:
            final.on = state == TrialState.COMPLETE
            try:
                return set_state(trial_id, state, values)
            finally:
                final.on = False

        storage.set_trial_state_values = set_trial_state_values
        in_write = lambda *_: getattr(final, "on", False) and pause_here("result")
        if rdb:
            from sqlalchemy import event

            event.listen(storage.engine, "commit", in_write)  # before the COMMIT: the transaction holds its locks
        elif lock is not None:
            lock.acquire = _then(lock.acquire, in_write)


def _then(f: Callable, after: Callable[[], Any]) -> Callable:
    def wrapped(*args, **kwargs):
        result = f(*args, **kwargs)
        after()
        return result
    return wrapped
