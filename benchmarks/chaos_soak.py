"""Chaos soak (issue 20): many `nas search` workers on one study while a chaos loop SIGKILLs a random worker every
few seconds and starts it again, and (PostgreSQL) the database server is stopped once mid-run for --outage-s seconds
and started again; then the same run without faults. The storages: a PostgreSQL cluster of its own (initdb + pg_ctl
on a free port, so it can restart it) and a journal file shared by the workers (what `--workers N` uses; kills only).

Checked afterwards, from the storage: exactly --trials COMPLETE, trial numbers unique without gaps, none RUNNING or
WAITING, every trial seen COMPLETE during the run unchanged at the end (lost = 0). Reported: kills, restarts of the
database, retries (failed trials retried with the same parameters), the time until the study held its trials (done_s;
wall_s: until every worker had exited), trials/s, and the faulty run's done_s over the clean one's (the cost of the
faults). JSON on stdout and in OUT/chaos_soak.json.

    taskset -c 0 .venv/bin/python benchmarks/chaos_soak.py --workers 8 --trials 1000 --out runs/chaos

The evaluator is the MACs proxy on a tiny space (milliseconds per trial): the soak measures the storage and the
fault handling, not the evaluator. `--launcher exec` (default) starts every worker as a new `nas search` process
(each start pays the imports, ~1.3 s CPU); `--launcher fork` forks them from a process that imported nas already
(the suite's short form, tests/test_chaos.py).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # servers.py: the throwaway PostgreSQL the storage tests use

import servers

TINY = {
    "format": "nas/space@1", "name": "tiny", "resolution": [64], "stem": {"out": [8], "act": ["relu"]},
    "stages": [
        {"name": "s1", "stride": 2, "depth": [1], "out": [16], "ops": ["ib", "fused_ib"], "kernels": [3],
         "expand": [2.0], "act": ["relu"]},
        {"name": "s2", "stride": 2, "depth": [1, 2], "out": [16, 24], "ops": ["ib", "extra_dw", "ffn"], "kernels": [3],
         "expand": [2.0], "se": [False, True], "act": ["hswish"]},
        {"name": "s3", "stride": 2, "depth": [1], "out": [32], "ops": ["convnext"], "kernels": [3, 5], "expand": [2.0],
         "act": ["relu"]},
    ],
    "features": ["s1", "s2", "s3"],
}
POLL_S = 0.5


def experiment(out: Path, trials: int, outage_s: float) -> Path:
    """The tiny space, its latency table (measured here, few repeats) and an experiment on them: OUT/exp.yaml."""
    import yaml

    from nas.latency.protocol import Protocol
    from nas.latency.table import LatencyTable
    from nas.space import space_from_dict

    out.mkdir(parents=True, exist_ok=True)
    space_path, table_path = out / "space.yaml", out / "table.csv"
    space_path.write_text(yaml.safe_dump(TINY))
    if not table_path.exists():
        table = LatencyTable.new(Protocol(warmup_runs=2, warmup_s=0.0, repeats=5, min_time_s=0.0), "tiny-soak",
                                 space="tiny")
        table.extend(space_from_dict(TINY, str(space_path)).ops(), path=table_path, progress=False)
    exp = out / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "format": "nas/experiment@1", "name": "soak", "space": str(space_path), "table": str(table_path),
        "budget_ms": 1000.0, "mode": "constraint", "scope": "backbone", "sampler": "random", "tensorboard_every": 0,
        "evaluator": {"kind": "proxy", "proxy": "macs", "resolution": 64}, "output": str(out / "runs"),
        "trials": trials,
        # 2 s heartbeats; a grace longer than the outage, so live workers' trials outlast it (a killed worker's
        # trial is failed at once: its process is gone)
        "heartbeat_s": 2, "grace_s": int(outage_s) + 15}))
    return exp


def run_search(argv: list[str], cwd: str, log: str) -> None:
    """A forked worker (--launcher fork): `nas search ARGV` with its output in `log`."""
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from nas.commands.main import main

    sys.exit(main(["search", *argv]))


class Forked:
    """An mp.Process with Popen's poll()."""

    def __init__(self, proc: mp.Process):
        self.proc, self.pid = proc, proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self) -> int | None:
        self.proc.join()
        return self.proc.exitcode


class Launcher:
    """start(study, url, index, gen) -> a running `nas search EXP --storage URL --study STUDY` worker, its output in
    OUT/logs/STUDY-wINDEX-gGEN.log. One intra-op thread: the workers share the cores."""

    def __init__(self, exp: Path, how: str):
        self.exp, self.how, self.logs = exp, how, exp.parent / "logs"
        self.logs.mkdir(exist_ok=True)
        os.environ["OMP_NUM_THREADS"] = "1"
        if how == "fork":
            self.ctx = mp.get_context("forkserver")
            # imported once by the fork server; every worker starts from there in milliseconds
            self.ctx.set_forkserver_preload(["__main__", "nas.commands.main", "nas.commands.search", "nas.search.study",
                                             "nas.search.objective", "nas.search.proxies", "nas.report.tensorboard",
                                             "torch._dynamo", "psycopg", "sqlalchemy.dialects.postgresql"])

    def log(self, study: str, index: int, gen: int) -> Path:
        return self.logs / f"{study}-w{index}-g{gen}.log"

    def __call__(self, study: str, url: str, index: int, gen: int, workers: int):
        argv = [str(self.exp), "--quiet", "--storage", url, "--study", study, "--name", f"{study}-w{index}",
                "--seed", str(index + workers * gen)]
        log = self.log(study, index, gen)
        if self.how == "fork":
            proc = self.ctx.Process(target=run_search, args=(argv, str(self.exp.parent), str(log)))
            proc.start()
            return Forked(proc)
        with log.open("a") as out:
            return subprocess.Popen([sys.executable, "-m", "nas", "search", *argv], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.exp.parent)


class Outage:
    """Stop the PostgreSQL server (pg_ctl stop -m MODE), wait `seconds`, start it again; in a thread, so the chaos
    goes on meanwhile. `before` holds the COMPLETE trials read just before the stop."""

    def __init__(self, server: servers.PgServer, seconds: float, mode: str):
        self.server, self.seconds, self.mode = server, seconds, mode
        self.thread: threading.Thread | None = None
        self.took_s, self.before = 0.0, {}

    def begin(self) -> None:
        def cycle() -> None:
            start = time.monotonic()
            self.server.stop(self.mode)
            time.sleep(self.seconds)
            self.server.start()
            self.took_s = time.monotonic() - start

        self.thread = threading.Thread(target=cycle, daemon=True)
        self.thread.start()


def complete(reader, study: str) -> dict[int, tuple]:
    """number -> (values, datetime_complete) of the COMPLETE trials; {} while the study or the server is away. On SQL
    storages one light query: Optuna's get_all_trials loads every attribute, seconds of the workers' core per poll."""
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    try:
        if isinstance(reader, RDBStorage):
            from sqlalchemy import text

            query = text("SELECT t.number, t.datetime_complete, v.value, v.value_type FROM trials t JOIN studies s "
                         "ON s.study_id = t.study_id LEFT JOIN trial_values v ON v.trial_id = t.trial_id "
                         "WHERE s.study_name = :study AND t.state = 'COMPLETE' ORDER BY v.objective")
            with reader.engine.connect() as conn:
                rows = conn.execute(query, {"study": study}).all()
            found: dict[int, tuple] = {}
            for number, done, value, kind in rows:
                values, _ = found.get(number, ((), None))
                found[number] = ((*values, (value, str(kind))), done)
            return found
        trials = reader.get_all_trials(reader.get_study_id_from_name(study), deepcopy=False,
                                       states=(TrialState.COMPLETE,))
    except Exception:  # noqa: BLE001 - not created yet, or the database is restarting
        return {}
    return {t.number: (tuple(t.values), t.datetime_complete) for t in trials}


def soak(start_worker, reader, study: str, url: str, workers: int, trials: int, kill_every: float | None,
         outage: Outage | None, rng: random.Random, wait_s: float) -> dict[str, Any]:
    """Run `workers` workers on `study` until every one has exited; SIGKILL a random live one every `kill_every`
    seconds (0.5-1.5x at random) and start it again while the study is unfinished; begin `outage` once half the
    trials are done. Returns the run's figures (see analyse)."""
    t0 = time.monotonic()
    procs = {i: start_worker(study, url, i, 0, workers) for i in range(workers)}
    gens, exits, kills, seen = dict.fromkeys(procs, 0), [], 0, {}
    next_kill = t0 + (kill_every or 0) * rng.uniform(0.5, 1.5)
    timed_out, done_at = False, None
    while procs:
        for i, p in list(procs.items()):
            if p.poll() is not None:
                exits.append((f"{study}-w{i}-g{gens[i]}", p.poll()))
                del procs[i]
        now = time.monotonic()
        seen.update(complete(reader, study))
        unfinished = len(seen) < trials
        if not unfinished and done_at is None:
            done_at = now
        if outage is not None and outage.thread is None and len(seen) >= trials // 2:
            outage.before = complete(reader, study)
            outage.begin()
        if kill_every and unfinished and procs and now >= next_kill:
            i = rng.choice(sorted(procs))
            os.kill(procs[i].pid, signal.SIGKILL)
            procs[i].wait()
            kills, gens[i] = kills + 1, gens[i] + 1
            procs[i] = start_worker(study, url, i, gens[i], workers)
            next_kill = now + kill_every * rng.uniform(0.5, 1.5)
        if now - t0 > wait_s:
            timed_out = True
            for p in procs.values():
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            break
        time.sleep(POLL_S)
    wall = time.monotonic() - t0
    done = (done_at or time.monotonic()) - t0
    if outage is not None and outage.thread is not None:
        outage.thread.join()
    # done_s: until the study held its trials; wall_s: until every worker had exited (a worker started just before
    # the end still imports, connects and looks before it can exit)
    figures = {"done_s": round(done, 1), "wall_s": round(wall, 1), "trials_per_s": round(trials / done, 2),
               "kills": kills,
               "db_restarts": int(outage is not None and outage.thread is not None), "timed_out": timed_out,
               "bad_exits": [e for e in exits if e[1] != 0]}
    if outage is not None:
        figures["outage_s"] = round(outage.took_s, 1)
    return figures | analyse(reader, study, trials, seen, getattr(outage, "before", {}))


def analyse(reader, study: str, trials: int, seen: dict[int, tuple], before: dict[int, tuple]) -> dict[str, Any]:
    """The invariants, from the storage: complete == trials, duplicates == 0, gaps == 0, stuck == 0, lost == 0."""
    from optuna.trial import TrialState

    stored = reader.get_all_trials(reader.get_study_id_from_name(study), deepcopy=False)
    numbers = [t.number for t in stored]
    now = complete(reader, study)  # read as `seen` was
    fails = [t for t in stored if t.state == TrialState.FAIL]
    surplus = [t for t in fails if t.user_attrs.get("surplus")]
    reasons = Counter(re.sub(r"\d+", "N", re.sub(r"\S+:\d+", "HOST:PID", t.user_attrs.get("fail_reason", "?")))
                      for t in fails if t not in surplus)
    return {
        "complete": len(now), "trials_stored": len(stored), "duplicates": len(numbers) - len(set(numbers)),
        "gaps": len(set(range(max(numbers, default=-1) + 1)) - set(numbers)),
        "stuck": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in stored),
        "lost": sum(now.get(n) != v for n, v in seen.items()),
        # the trials COMPLETE just before the database stopped, and how many of them differ at the end
        "complete_before_outage": len(before), "changed_since_outage": sum(now.get(n) != v for n, v in before.items()),
        "retries": sum("failed_trial" in t.system_attrs for t in stored),
        "failed": len(fails) - len(surplus), "surplus": len(surplus), "fail_reasons": dict(reasons),
        "ok": len(now) == trials and len(numbers) == len(set(numbers)) and not any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in stored)
        and all(now.get(n) == v for n, v in seen.items()),
    }


def log_figures(logs: Path, study: str) -> dict[str, int]:
    """What the workers said: tracebacks (should be none), outage lines, lines back."""
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"{study}-w*.log")))
    return {"tracebacks": text.count("Traceback"), "outage_lines": text.count(" unreachable since "),
            "back_lines": text.count(" is back at "), "logs": len(list(logs.glob(f"{study}-w*.log")))}


def pair(name: str, start_worker, storage_for, args, outage: Outage | None) -> dict[str, Any]:
    """The faulty run and the clean one on fresh studies (storage_for(study) -> (URL, reader)), and the slowdown."""
    from optuna.storages import RDBStorage

    rng, result = random.Random(args.seed), {}
    for run in ("faults", "clean")[:1 if args.no_clean else 2]:
        study = f"{name}-{run}"
        url, reader = storage_for(study)
        faulty = run == "faults"
        result[run] = soak(start_worker, reader, study, url, args.workers, args.trials,
                           args.kill_every if faulty else None, outage if faulty else None, rng,
                           args.wait_s) | log_figures(start_worker.logs, study)
        if isinstance(reader, RDBStorage):
            reader.engine.dispose()
        print(f"{study}: {json.dumps(result[run], default=str)}", file=sys.stderr)
    if "clean" in result:
        result["slowdown"] = round(result["faults"]["done_s"] / result["clean"]["done_s"], 2)
    return result


def passed(result: dict[str, Any]) -> bool:
    runs = [r[k] for s in ("postgresql", "journal") if (r := result.get(s)) for k in ("faults", "clean") if k in r]
    return all(x["ok"] and not x["bad_exits"] and not x["tracebacks"] and not x["timed_out"] for x in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between two SIGKILLs (0.5-1.5x)")
    p.add_argument("--outage-s", type=float, default=15.0, help="seconds the database server stays down")
    p.add_argument("--stop-mode", choices=["fast", "immediate"], default="fast", help="pg_ctl stop -m MODE")
    p.add_argument("--storages", default="postgresql,journal", help="comma-separated: postgresql, journal")
    p.add_argument("--launcher", choices=["exec", "fork"], default="exec")
    p.add_argument("--no-clean", action="store_true", help="skip the runs without faults")
    p.add_argument("--wait-s", type=float, default=3600, help="give up on a run after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chaos_soak")
    args = p.parse_args(argv)
    from nas.latency.environment import cpu_id
    from nas.search.storage import make_storage

    out = Path(args.out).resolve()
    exp = experiment(out, args.trials, args.outage_s)
    start_worker = Launcher(exp, args.launcher)
    result: dict[str, Any] = {"cpu_id": cpu_id(), "host": socket.gethostname(), "cpus": len(os.sched_getaffinity(0)),
                              "launcher": args.launcher, "workers": args.workers, "trials": args.trials,
                              "kill_every_s": args.kill_every, "outage_s": args.outage_s, "stop_mode": args.stop_mode,
                              "evaluator": "macs proxy, tiny space, 64 px"}
    storages = args.storages.split(",")
    if "postgresql" in storages:
        reason = servers.pg_missing()
        if reason:
            raise SystemExit(f"chaos_soak: {reason}")
        with servers.pg_cluster() as server:
            reader = make_storage(server.url)  # the tables exist before the workers race to create them
            result["postgresql"] = pair("pg", start_worker, lambda _: (server.url, reader), args,
                                        Outage(server, args.outage_s, args.stop_mode))
    if "journal" in storages:
        def journal(study: str):  # one file per run: a clean run does not replay the faulty run's log
            path = out / "journal" / f"{study}.journal"
            for old in path.parent.glob(f"{study}.journal*"):
                old.unlink()
            return f"journal:///{path}", make_storage(f"journal:///{path}")

        result["journal"] = pair("journal", start_worker, journal, args, None)
    (out / "chaos_soak.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
