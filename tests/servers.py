"""Throwaway database servers for the storage tests and the chaos soak (benchmarks/chaos_soak.py imports this too):
a PostgreSQL cluster (initdb + pg_ctl in a temporary folder) and a redis-server, each on a free port of 127.0.0.1, that
a test can stop and start under running workers."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [p for p in ["/usr/local/bin/initdb"]
                                                                       if Path(p).exists()]
    return Path(found[-1]).parent if found else None


def pg_missing() -> str | None:
    """Why this machine cannot run a throwaway PostgreSQL, or None."""
    if pg_bin() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        return "running as root, and no postgres user to run initdb as (initdb refuses root)"
    return None


def redis_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "no redis-server binary on PATH"
    try:
        import redis  # noqa: F401 - the client nas's redis:// storage needs
    except ImportError:
        return "the redis client package is not installed (pip install -e '.[redis]')"
    return None


def _no_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


class PgServer:
    """A throwaway PostgreSQL cluster in `root`, reachable on 127.0.0.1:`port` (trust auth, user postgres); run as
    the postgres user when this process is root (initdb refuses root)."""

    def __init__(self, bin_dir: Path, root: Path, port: int):
        self.bin, self.root, self.port = bin_dir, root, port
        self.data, self.log = root / "data", root / "server.log"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self.as_user, str(self.bin / args[0]), *args[1:]], check=False, capture_output=True,
                           text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)}: {r.stdout[-1500:]}{r.stderr[-1500:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        # max_connections: a soak's workers hold a few connections each, and a killed one's linger until noticed
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data), "-l", str(self.log), "-o", opts)

    def stop(self, mode: str) -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data))


class pg_cluster:  # a context manager named like a function
    """`with pg_cluster() as server:` a started PgServer, stopped and deleted afterwards."""

    def __enter__(self) -> PgServer:
        reason = pg_missing()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.server = PgServer(pg_bin(), self.root, free_port())
        self.server.init()
        self.server.start()
        return self.server

    def __exit__(self, *exc) -> None:
        try:
            self.server.stop("immediate")
        except RuntimeError:
            pass  # already stopped (a failing test)
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A redis-server on 127.0.0.1:`port` with its files in `root`; `appendonly` keeps its data across a restart
    (the append-only file, fsynced every second; a stop is a clean shutdown, which writes it out)."""

    def __init__(self, root: Path, port: int, appendonly: bool):
        self.root, self.port, self.appendonly = root, port, appendonly
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                with redis.Redis(port=self.port) as client:
                    client.ping()
                return
            except redis.exceptions.ConnectionError:  # BusyLoadingError (reading its file back) included
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-1500:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean shutdown (the append-only file written out)
            self.proc.wait(timeout=30)


class redis_server:  # a context manager named like a function
    """`with redis_server(appendonly) as server:` a started RedisServer, stopped and deleted afterwards."""

    def __init__(self, appendonly: bool):
        self.appendonly = appendonly

    def __enter__(self) -> RedisServer:
        reason = redis_missing()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="nas-redis-"))
        self.server = RedisServer(self.root, free_port(), self.appendonly)
        self.server.start()
        return self.server

    def __exit__(self, *exc) -> None:
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.proc.kill()
            self.server.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for_complete(complete, n: int, procs, wait_s: float) -> dict:
    """complete() (the study's finished trials by number) once it holds `n`; fails the test with the workers' logs
    when they all exited first or `wait_s` passed. `procs`: (Popen, log path) pairs."""
    import pytest

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        done = complete()
        if len(done) >= n:
            return done
        if all(p.poll() is not None for p, _ in procs):
            break
        time.sleep(0.1)
    pytest.fail(f"{n} trials never completed:\n" + "\n".join(log.read_text()[-2000:] for _, log in procs))
