"""Storage outages: which errors mean the storage (a database or Redis server) is unreachable, and a worker's wait for
it to come back: one line when it goes, a probe with bounded backoff, one line when it is back, a give-up time."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna

from nas.errors import NasError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A server that is down or restarting, as opposed to a wrong host name or password (those fail at once at start-up):
# PostgreSQL while it stops, starts or recovers, and Redis while it loads its append-only file.
SERVER_DOWN = ("connection refused", "database system is", "server closed the connection", "terminating connection",
               "connection reset", "loading the dataset", "connection was closed")


def mask_url(url: str) -> str:
    """Hide the password of a storage URL: postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+:)[^@]*(@)", r"\1***\2", url)


def outage(e: BaseException) -> str | None:
    """One line on why the storage is unreachable if `e` (or an exception it wraps: Optuna wraps a failed commit in
    StorageInternalError) is a lost connection to the database or Redis server; None for any other error. An error
    raised `from None` while handling a lost connection is not one (a journal found wiped when the server is back)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _connection_error(e):
            return f"{type(e).__name__}: {(str(getattr(e, 'orig', None) or e).strip().splitlines() or [''])[0][:200]}"
        e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__
    return None


def server_down(e: BaseException) -> str | None:
    """outage(e) when it says the server is down or restarting (worth waiting for at start-up), else None."""
    reason = outage(e)
    return reason if reason is not None and any(w in reason.lower() for w in SERVER_DOWN) else None


def _connection_error(e: BaseException) -> bool:
    try:
        from sqlalchemy import exc
    except ImportError:  # pragma: no cover - a dependency of Optuna's RDB storage
        exc = None
    if exc is not None and isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)):
        return True
    if exc is not None and isinstance(e, exc.DBAPIError) and e.connection_invalidated:
        return True
    # Redis journals: redis.exceptions.ConnectionError (BusyLoadingError included) / TimeoutError, without
    # importing redis when unused
    return type(e).__module__.startswith("redis") and any(
        c.__name__ in ("ConnectionError", "TimeoutError") for c in type(e).__mro__)


class LostConnectionNotice(logging.Filter):
    """Drops Optuna's multi-line "Caught an error from sqlalchemy ... Falling back" notice when the error is a lost
    connection: the fallback query fails the same way, and the worker then says so in one line (Reconnect)."""

    WORDS = ("closed the connection", "connection refused", "terminating connection", "could not connect",
             "connection failed", "server closed")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Caught an error from sqlalchemy") and any(w in msg.lower() for w in self.WORDS))


def quiet_lost_connections() -> None:
    """Install LostConnectionNotice on Optuna's RDB storage logger, once per process."""
    rdb_logger = logging.getLogger("optuna.storages._rdb.storage")
    if not any(isinstance(f, LostConnectionNotice) for f in rdb_logger.filters):
        rdb_logger.addFilter(LostConnectionNotice())


def steady_heartbeats(storage: optuna.storages.RDBStorage) -> None:
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


def probe(storage: optuna.storages.BaseStorage) -> None:
    """One cheap round trip to the storage's server; raises what an outage raises."""
    if isinstance(storage, optuna.storages.RDBStorage):
        from sqlalchemy import text

        with storage.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    else:
        storage.get_all_studies()


class Reconnect:
    """A worker whose storage went away: one line when the outage starts, a probe with bounded backoff (0.5 s
    doubling to 4 s), one line when the storage is back, and a NasError once it has been away `timeout_s`.
    `opener`, when given, is the probe (e.g. opening the storage at start-up) and its result is returned."""

    BACKOFF_S = (0.5, 4.0)

    def __init__(self, storage: optuna.storages.BaseStorage | None, url: str, timeout_s: float,
                 opener: Callable[[], Any] | None = None):
        self.url, self.timeout_s = mask_url(url), timeout_s
        self.opener = opener or (lambda: probe(storage))

    def __call__(self, reason: str) -> Any:
        """Block until the storage answers again; returns what the probe returned."""
        start, pause = time.monotonic(), self.BACKOFF_S[0]
        # the time of day makes each outage's line distinct (the command's output shows a repeated warning once)
        logger.warning("storage %s unreachable since %s (%s); waiting up to %d s for it to come back", self.url,
                       time.strftime("%H:%M:%S"), reason, self.timeout_s)
        while True:
            time.sleep(min(pause, max(0.0, start + self.timeout_s - time.monotonic())))
            try:
                result = self.opener()
            except Exception as e:  # outages retry; anything else is a real error
                if outage(e) is None:
                    raise
                reason = outage(e) or reason
            else:
                logger.warning("storage %s is back at %s after %.0f s; carrying on", self.url,
                               time.strftime("%H:%M:%S"), time.monotonic() - start)
                return result
            if time.monotonic() - start >= self.timeout_s:
                raise NasError(f"storage {self.url} unreachable ({reason}); gave up after {self.timeout_s} s "
                               f"(--storage-timeout); run the same command again once it is back") from None
            pause = min(2 * pause, self.BACKOFF_S[1])


def connect(opener: Callable[[], T], url: str, timeout_s: float) -> T:
    """opener() (open the storage, the study), waiting like a running worker does while the server is down or
    restarting: a worker restarted during an outage joins when it ends. Other errors (a wrong host, a password) at
    once."""
    try:
        return opener()
    except Exception as e:
        reason = server_down(e)
        if reason is None:
            raise
    return Reconnect(None, url, timeout_s, opener=opener)(reason)
