"""Optuna storages: SQLite (fast pragmas), any SQLAlchemy URL, journal file, Redis journal; heartbeats, masked
passwords, and the failure and retry of trials whose worker died."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from nas.errors import NasError
from nas.system import exclusive_lock

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10          # defaults of the experiment's heartbeat_s / grace_s: the RDB heartbeat period; a trial


GRACE_S = 30              # silent for GRACE_S is declared dead and retried


MAX_RETRY = 3


STORAGE_TIMEOUT_S = 120   # a worker whose storage is unreachable this long gives up (experiment storage_timeout_s)


WORKER_ATTR = "nas:worker"  # host:pid of the process running a trial: who to ask whether it is still alive


PAUSE_ENV = "NAS_TEST_PAUSE_AT"  # test hook, inert unless set: the worker SIGSTOPs itself at that point of a trial


def mask_url(url: str) -> str:
    """Hide the password of a storage URL: postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+:)[^@]*(@)", r"\1***\2", url)


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> optuna.storages.BaseStorage:
    """SQLAlchemy URLs get heartbeats every `heartbeat_s` (a trial silent for `grace_s` is failed and retried);
    journal:///FILE and redis://HOST give journal storages, which parallel workers on one machine (file) or many
    (Redis) can share."""
    storage, lock = _open_storage(url, heartbeat_s, grace_s)
    if isinstance(storage, optuna.storages.RDBStorage):
        _steady_heartbeats(storage)
        rdb_logger = logging.getLogger("optuna.storages._rdb.storage")
        if not any(isinstance(f, _LostConnectionNotice) for f in rdb_logger.filters):
            rdb_logger.addFilter(_LostConnectionNotice())
    if os.environ.get(PAUSE_ENV):
        _install_pauses(storage, os.environ[PAUSE_ENV], lock)
    return storage


def _open_storage(url: str, heartbeat_s: int, grace_s: int) -> tuple[optuna.storages.BaseStorage, Any]:
    """(the storage, the journal file's lock or None)."""
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = JournalLock(path.with_name(path.name + ".flock")) if os.name == "posix" else None
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock)), lock
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend

        return optuna.storages.JournalStorage(JournalRedisBackend(url)), None
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_experimental():
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryDeadTrial(max_retry=MAX_RETRY),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        if url.startswith("sqlite"):
            _fast_sqlite(storage)
        return storage, None
    except Exception as e:  # noqa: BLE001 - bad URL, server down, missing driver: one line, password masked
        raise NasError(f"storage {mask_url(url)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}".replace(
            url, mask_url(url))) from None


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


class JournalLock:
    """The journal file's lock as an OS lock (flock): it goes with its holder, so a worker killed while writing
    leaves no lock behind. Optuna's default, a symlink, outlives a SIGKILL and stalls every other worker 30 s."""

    def __init__(self, path: Path):
        self.path, self._held = path, contextlib.ExitStack()

    def acquire(self) -> bool:
        self._held.enter_context(exclusive_lock(self.path))
        return True

    def release(self) -> None:
        self._held.close()


def _steady_heartbeats(storage: optuna.storages.RDBStorage) -> None:
    """A heartbeat that fails because the server is away is skipped, not fatal: Optuna's heartbeat thread would die
    with a traceback, and a trial still running after the outage would then look dead to every other worker."""
    beat = storage.record_heartbeat

    def record_heartbeat(trial_id: int) -> None:
        try:
            beat(trial_id)
        except Exception as e:  # only outages are skipped; the next beat comes heartbeat_s later
            if outage(e) is None:
                raise
            logger.debug("heartbeat of trial %d skipped: storage unreachable", trial_id)

    storage.record_heartbeat = record_heartbeat


class _LostConnectionNotice(logging.Filter):
    """Drops Optuna's multi-line "Caught an error from sqlalchemy ... Falling back" notice when the error is a lost
    connection: the fallback query fails the same way, and the worker then says so in one line (Reconnect)."""

    WORDS = ("closed the connection", "connection refused", "terminating connection", "could not connect",
             "connection failed", "server closed")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Caught an error from sqlalchemy") and any(w in msg.lower() for w in self.WORDS))


def outage(e: BaseException) -> str | None:
    """One line on why the storage is unreachable if `e` (or an exception it wraps: Optuna wraps a failed commit in
    StorageInternalError) is a lost connection to the database or Redis server; None for any other error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _connection_error(e):
            return f"{type(e).__name__}: {(str(getattr(e, 'orig', None) or e).strip().splitlines() or [''])[0][:200]}"
        e = e.__cause__ or e.__context__
    return None


def _connection_error(e: BaseException) -> bool:
    try:
        from sqlalchemy import exc
    except ImportError:  # pragma: no cover - a dependency of Optuna's RDB storage
        exc = None
    if exc is not None and isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)):
        return True
    if exc is not None and isinstance(e, exc.DBAPIError) and e.connection_invalidated:
        return True
    # Redis journals: redis.exceptions.ConnectionError / TimeoutError, without importing redis when unused
    return type(e).__module__.startswith("redis") and type(e).__name__ in ("ConnectionError", "TimeoutError")


class Reconnect:
    """A worker whose storage went away: one line when the outage starts, a probe with bounded backoff (0.5 s
    doubling to 4 s), one line when the storage is back, and a NasError once it has been away `timeout_s`."""

    BACKOFF_S = (0.5, 4.0)

    def __init__(self, storage: optuna.storages.BaseStorage, url: str, timeout_s: float):
        self.storage, self.url, self.timeout_s = storage, mask_url(url), timeout_s

    def __call__(self, reason: str) -> float:
        """Block until the storage answers again; returns the seconds it was away."""
        start, pause = time.monotonic(), self.BACKOFF_S[0]
        # the time of day makes each outage's line distinct (the command's output shows a repeated warning once)
        logger.warning("storage %s unreachable since %s (%s); waiting up to %d s for it to come back", self.url,
                       time.strftime("%H:%M:%S"), reason, self.timeout_s)
        while True:
            time.sleep(min(pause, max(0.0, start + self.timeout_s - time.monotonic())))
            try:
                self._probe()
            except Exception as e:  # outages retry; anything else is a real error
                if outage(e) is None:
                    raise
                reason = outage(e) or reason
            else:
                took = time.monotonic() - start
                logger.warning("storage %s is back at %s after %.0f s; carrying on", self.url,
                               time.strftime("%H:%M:%S"), took)
                return took
            if time.monotonic() - start >= self.timeout_s:
                raise NasError(f"storage {self.url} unreachable ({reason}); gave up after {self.timeout_s} s "
                               f"(--storage-timeout); run the same command again once it is back") from None
            pause = min(2 * pause, self.BACKOFF_S[1])

    def _probe(self) -> None:
        if isinstance(self.storage, optuna.storages.RDBStorage):
            from sqlalchemy import text

            with self.storage.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        else:
            self.storage.get_all_studies()


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
    Optuna's heartbeat check cannot see: on SQL storages those without a heartbeat (their worker died before its
    first one), on journal storages (no heartbeats) all. Gone: the trial's worker ran on this host and its process
    no longer exists, or the trial showed no sign of life (a heartbeat; journal: its worker's host:pid) `grace_s`
    after it started. Returns the numbers of the trials failed."""
    beats = heartbeats(storage, study._study_id)
    host, now = socket.gethostname(), datetime.now()  # Optuna's datetime_start: local time, naive
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if beats is not None and t._trial_id in beats:
            continue  # Optuna's stale check: no heartbeat for grace_s
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
    """Whether the process `owner` (host:pid) exists; None when it runs on another host (or is unknown)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
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
