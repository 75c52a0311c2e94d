"""Optuna's journal backends made safe to lose: a journal file whose folder vanishes (an NFS mount going away) or is
replaced, and a Redis server that comes back empty (restarted without persistence), stop the worker with one line
instead of writing a second, partial journal next to the study."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

from nas.errors import NasError
from nas.search.outage import mask_url


class JournalLock:
    """The journal file's lock as an OS lock (flock): it goes with its holder, so a worker killed while writing
    leaves no lock behind. Optuna's default, a symlink, outlives a SIGKILL and stalls every other worker 30 s.
    It never creates a folder: a journal folder that vanished stays vanished (FileNotFoundError)."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


class FileJournal(JournalFileBackend):
    """A journal file that must stay the file the worker opened: if it vanishes (its folder moved, unmounted,
    deleted), is replaced, or can no longer be written, every read and write raises a one-line NasError and nothing
    is written anywhere else (Optuna's backend would create a fresh journal at the same path)."""

    def __init__(self, path: str, lock_obj: JournalLock | None = None):
        super().__init__(path, lock_obj=lock_obj)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        try:
            self._check(os.stat(self._file_path))
            yield from super().read_logs(log_number_from)
        except OSError as e:
            raise self._lost(e) from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        try:
            self._lock.acquire()
        except OSError as e:
            raise self._lost(e) from None
        try:
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: never a second journal
            try:  # unbuffered: nothing left to flush (and append) after a failed write
                st = os.fstat(fd)
                self._check(st)
                try:
                    view = memoryview(text)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:  # a full disk: cut the partial line (lock held), or every later append is unreadable
                    os.ftruncate(fd, st.st_size)
                    raise
            finally:
                os.close(fd)
        except (FileNotFoundError, PermissionError) as e:
            raise self._lost(e) from None
        except OSError as e:
            if e.errno != getattr(os, "EROFS", 30):  # a full disk and the like: not this class's business
                raise
            raise self._lost(e) from None
        finally:
            self._lock.release()

    def _check(self, st: os.stat_result) -> None:
        if (st.st_dev, st.st_ino) != self._identity:
            raise FileNotFoundError(f"{self._file_path} is another file than the one this worker opened")

    def _lost(self, e: OSError) -> NasError:
        if isinstance(e, FileNotFoundError):
            what = ("is gone (its folder was moved, unmounted or deleted, or the file was replaced)"
                    if "another file" not in str(e) else "was replaced by another file")
            return NasError(f"journal file {self._file_path} {what}; stopped without writing anywhere else: "
                            f"run the same command again once the journal is back")
        return NasError(f"journal file {self._file_path} cannot be written ({type(e).__name__}: "
                        f"{e.strerror or e}); run the same command again once it can")


# The append of one log entry, refused if the journal's epoch (a random id set when the first worker opened it) is
# not the one this worker saw: a server that restarted empty has none, or a newer one from a worker started since.
_APPEND = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return redis.error_reply('NAS_JOURNAL_LOST') end
if not redis.call('get', KEYS[2]) then redis.call('set', KEYS[2], -1) end
local i = redis.call('incr', KEYS[2])
redis.call('set', ARGV[2] .. ':log:' .. i, ARGV[3])
"""


class RedisJournal(JournalRedisBackend):
    """A Redis journal that notices it was wiped: a server restarted without persistence (or flushed) comes back
    empty, and Optuna's backend would carry on, each worker with its own memory of the study and new entries read
    by none of them. Every read and write checks the journal's epoch and raises a one-line NasError when it
    changed."""

    def __init__(self, url: str):
        super().__init__(url)
        self._epoch_key, self._count_key = f"{self._prefix}:nas:epoch", f"{self._prefix}:log_number"
        self._redis.setnx(self._epoch_key, uuid.uuid4().hex)
        self._epoch = self._redis.get(self._epoch_key)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        epoch, count = self._redis.mget(self._epoch_key, self._count_key)
        if epoch != self._epoch or (count is None and log_number_from > 0):
            raise self._lost() from None  # not an outage, even when raised while handling one (outage())
        yield from super().read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        from redis.exceptions import ResponseError

        for log in logs:
            try:
                self._redis.eval(_APPEND, 2, self._epoch_key, self._count_key, self._epoch, self._prefix,
                                 json.dumps(log))
            except ResponseError as e:
                if "NAS_JOURNAL_LOST" not in str(e):
                    raise
                raise self._lost() from None

    def _lost(self) -> NasError:
        return NasError(f"storage {mask_url(self._url)}: the study's journal is gone from the Redis server (it "
                        f"restarted without persistence, or was flushed), with every trial it held; stopped without "
                        f"writing to it. Run redis-server with --appendonly yes to keep studies across restarts; "
                        f"the same command again starts the study afresh")
