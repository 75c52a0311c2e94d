"""Optuna storages: SQLite (fast pragmas), any SQLAlchemy URL, journal file, Redis journal; heartbeats, masked
passwords, and the failure of trials whose worker died."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nas.errors import NasError

HEARTBEAT_S = 10          # defaults of the experiment's heartbeat_s / grace_s: the RDB heartbeat period; a trial


GRACE_S = 30              # silent for GRACE_S is declared dead and retried


MAX_RETRY = 3


WORKER_ATTR = "nas:worker"  # host:pid of the process running a trial (journal storages have no heartbeat)


def mask_url(url: str) -> str:
    """Hide the password of a storage URL: postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+:)[^@]*(@)", r"\1***\2", url)


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> optuna.storages.BaseStorage:
    """SQLAlchemy URLs get heartbeats every `heartbeat_s` (a trial silent for `grace_s` is failed and retried);
    journal:///FILE and redis://HOST give journal storages, which parallel workers on one machine (file) or many
    (Redis) can share."""
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend

        return optuna.storages.JournalStorage(JournalRedisBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_experimental():
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        if url.startswith("sqlite"):
            _fast_sqlite(storage)
        return storage
    except Exception as e:  # bad URL, server down, missing driver: one line, password masked
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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> int:
    """Journal storages have no heartbeat: a RUNNING trial started on this host by a process that no longer
    exists is failed and re-queued with the same parameters, so a killed worker loses nothing."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(WORKER_ATTR, "")
        h, _, pid = owner.rpartition(":")
        if h != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {owner} died (found by a later worker)")
        retries = t.user_attrs.get("retries", 0)
        if retries < MAX_RETRY:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": retries + 1})
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
