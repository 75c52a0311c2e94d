"""Build and run the Optuna study of an experiment: sampler, storage (SQLite, any SQLAlchemy URL, journal file,
Redis journal), heartbeats with retry of dead workers' trials, resume, and several local worker processes."""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from nas.errors import NasError, NoSpaceError
from nas.search.outage import Reconnect, connect, mask_url, outage
from nas.search.samplers import make_pruner, make_sampler
from nas.search.storage import (
    WORKER_ATTR,
    fail_dead_trials,
    fail_own_trials,
    heartbeats,
    make_storage,
    owner_alive,
    quiet_experimental,
)
from nas.system import no_space, write_atomically

if TYPE_CHECKING:
    from nas.search.experiment import Experiment
logger = logging.getLogger(__name__)
MAX_FAILED_IN_A_ROW = 10  # consecutive failed trials after which a worker stops with the reason
WAIT_GRACES = 5  # a worker waiting for others' trials gives up after this many grace_s in which nothing changed


def open_study(exp, storage: optuna.storages.BaseStorage, seed: int | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume); refuses a study made for another mode."""
    directions = ["maximize", "minimize"] if exp.mode == "pareto" else ["maximize"]
    sampler = make_sampler(exp.sampler, exp.seed if seed is None else seed, len(directions) > 1)
    pruner = make_pruner(exp) if len(directions) == 1 else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=exp.study_name, storage=storage, directions=directions, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise NasError(f"study {exp.study_name!r} exists with objectives {[d.name.lower() for d in study.directions]}, "
                       f"but mode {exp.mode!r} needs {directions}; use another --study name")
    return study


def counted(study: optuna.Study) -> tuple[int, int]:
    """(finished trials that count towards the budget, trials running now). Failed trials don't count: retried."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    done = sum(t.state != TrialState.RUNNING for t in trials)
    return done, len(trials) - done


def run_worker(exp, index: int = 0, progress: bool = True, callbacks: list | None = None) -> None:
    """One worker: run trials until the study holds `exp.trials` finished trials (or the timeout passes).
    `callbacks` are Optuna trial callbacks (the TensorBoard logger on worker 0)."""
    import torch

    threads = torch.get_num_threads()
    try:
        if exp.workers > 1:  # the workers share the cores; restored on return: the caller's process is not ours
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // exp.workers))
        _run_trials(exp, index, progress, callbacks or [])
    except Exception as e:  # SQLite and the journal name no file: say which one the full disk refused
        reason = no_space(e)
        if reason is None or isinstance(e, NoSpaceError):
            raise
        url = exp.storage_url()
        where = next((url.removeprefix(p) for p in ("sqlite:///", "journal://") if url.startswith(p)), mask_url(url))
        raise NoSpaceError(f"{where}: {reason} while writing the study; free space and run the same command again: "
                           "it resumes") from e
    finally:
        torch.set_num_threads(threads)


class _QuietSurplus(logging.Filter):
    """Drops Optuna's failed-trial warning (a traceback, then "failed with value None") for a surplus trial: two
    workers starting the last missing trial is expected with several workers, and the trial records why."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from nas.search.objective import SurplusTrial

        msg = record.getMessage()
        # also a trial failed by a full disk: the worker stops with one line naming the file (run_worker)
        if record.exc_info and (isinstance(record.exc_info[1], SurplusTrial) or no_space(record.exc_info[1])):
            self.numbers.add(msg.split()[1])
            return False
        return not (msg.startswith("Trial ") and msg.split()[1] in self.numbers and "failed with value" in msg)


def _run_trials(exp, index: int, progress: bool, callbacks: list) -> None:
    from nas.search.objective import Objective

    optimize_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietSurplus) for f in optimize_logger.filters):
        optimize_logger.addFilter(_QuietSurplus())
    def opened() -> tuple[optuna.storages.BaseStorage, optuna.Study, int]:
        storage = make_storage(exp.storage_url(), exp.heartbeat_s, exp.grace_s)
        study = open_study(exp, storage, seed=exp.seed + index)
        return storage, study, counted(study)[0]

    # a worker (re)started while the database server restarts waits for it, as a running one does; every read
    # before the loop belongs in opened(): the server may go away between two of them (the chaos soak found one)
    storage, study, done = connect(opened, exp.storage_url(), exp.storage_timeout_s)
    objective = Objective(exp)
    start = time.monotonic()
    bar = _bar(exp, done, progress and index == 0)
    watch = _TrialWatch(bar if progress and index == 0 else None)
    callbacks = [*callbacks, watch]
    wait = _Wait(exp, storage)
    reconnect, orphans = Reconnect(storage, exp.storage_url(), exp.storage_timeout_s), False
    try:
        while True:
            try:
                if orphans:  # the trial in flight when the storage went away: failed and retried at once
                    fail_own_trials(study)
                    orphans = False
                _reap(study, storage, exp.grace_s)
                done, running = counted(study)
                bar.n = done
                bar.refresh()
                if done >= exp.trials:
                    break
                if exp.timeout_s is not None and time.monotonic() - start > exp.timeout_s:
                    break
                if done + running >= exp.trials:
                    wait(study)  # the last trials run elsewhere; if their worker dies, _reap brings them back
                    continue
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False, callbacks=callbacks)
            except Exception as e:  # the database server went away: wait for it, bounded
                if no_space(e) is not None:  # no outage: the server answers, and the write would fail again
                    raise
                reason = outage(e)
                if reason is None and _taken(e):
                    logger.warning("a trial of this worker was failed by another worker (no heartbeat for "
                                   "%d s while the storage was away); its retry runs instead", exp.grace_s)
                    continue
                if reason is None and _ours(e) is e:
                    raise
                if reason is None:
                    raise _ours(e) from None
                reconnect(reason)
                orphans = True
                continue
            if watch.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                # Failed trials don't count towards the budget, so a cause that fails every candidate (a bad
                # evaluator setting, a broken data set) would otherwise loop forever.
                raise NasError(f"{watch.failed_in_a_row} trials in a row failed, the last with: {watch.last_reason}; "
                               f"fix the cause and run the same command again to resume")
    finally:
        bar.close()


def _ours(e: BaseException) -> BaseException:
    """The NasError behind `e`, if any: when a storage write fails, Optuna's own clean-up can fail on the way out
    (an UnboundLocalError in its _run_trial) and hide the one-line reason (a journal that vanished) behind its own."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, NasError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return e


def _taken(e: BaseException) -> bool:
    """Whether `e` says this worker's trial was finished by someone else (failed as dead after an outage longer
    than grace_s): the storage refuses the update, or Optuna's tell refuses a finished trial."""
    return isinstance(e, UpdateFinishedTrialError) or (isinstance(e, ValueError) and str(e).startswith("Cannot tell a "))


def _reap(study: optuna.Study, storage: optuna.storages.BaseStorage, grace_s: float) -> None:
    """Fail and retry dead workers' trials: Optuna's check (a heartbeat older than grace_s; optimize() runs it only
    when it starts a trial, so a worker waiting for the last trials would never see them come back) and ours
    (trials with no heartbeat at all, journal storages)."""
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)  # returns at once on storages without heartbeats
    fail_dead_trials(study, storage, grace_s)


class _Wait:
    """A worker with nothing left to start waits for the trials running elsewhere: it says in one line what it waits
    for, and gives up with a NasError after WAIT_GRACES grace periods in which no trial finished or appeared and
    none showed a sign of life (a new heartbeat; journal storages: a live worker process on this host)."""

    def __init__(self, exp, storage: optuna.storages.BaseStorage):
        self.exp, self.storage, self.limit_s = exp, storage, WAIT_GRACES * exp.grace_s
        self.seen: tuple = ()
        self.since = time.monotonic()
        self.told: tuple = ()

    def __call__(self, study: optuna.Study) -> None:
        time.sleep(0.5)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        beats = heartbeats(self.storage, study._study_id)
        local = [t.number for t in running if owner_alive(t.system_attrs.get(WORKER_ATTR, ""))]
        seen = (counted(study)[0], tuple(t.number for t in running), tuple(sorted((beats or {}).values())))
        if seen != self.seen or (beats is None and local):
            self.seen, self.since = seen, time.monotonic()
        awaited = ", ".join(f"{t.number} ({t.system_attrs.get(WORKER_ATTR, 'no worker recorded')})" for t in running)
        if running and seen[1] != self.told:  # none: the last one just finished (counted a moment ago)
            self.told = seen[1]
            silent = [t for t in running if t._trial_id not in (beats or {}) and t.number not in local]
            dead_when = (f"once it has no heartbeat for {self.exp.grace_s} s" if beats is not None else
                         "once its process on this host is gone")
            (logger.warning if silent else logger.info)(
                "%d of %d trials done; waiting for trial(s) %s, running elsewhere (a dead worker's trial is retried "
                "%s); giving up after %d s without progress", seen[0], self.exp.trials, awaited, dead_when,
                self.limit_s)
        if time.monotonic() - self.since > self.limit_s:
            raise NasError(f"waited {self.limit_s} s for trial(s) {awaited} without a sign of progress (no trial "
                           f"finished, no heartbeat, no live worker process on this host); if their workers still run "
                           f"elsewhere, run the same command again once they are done")


class _TrialWatch:
    """Optuna callback: a live line per trial (number, predicted ms, score, feasible, best so far) above the
    progress bar, and a count of consecutive failures."""

    def __init__(self, bar=None):
        self.bar, self.best, self.failed_in_a_row, self.last_reason = bar, None, 0, ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        attrs = trial.user_attrs
        if attrs.get("surplus"):
            return
        if trial.state == TrialState.FAIL:
            self.failed_in_a_row += 1
            self.last_reason = attrs.get("fail_reason", "see the trial's user attributes")
        else:
            self.failed_in_a_row = 0
        feasible = attrs.get("evaluated", False) and trial.state == TrialState.COMPLETE
        score = attrs.get("score")
        if feasible and score is not None and (self.best is None or score > self.best):
            self.best = score
        if self.bar is None:
            return
        ms = attrs.get("predicted_ms")
        parts = [f"trial {trial.number:4d}", f"{ms:8.3f} ms" if ms is not None else " " * 11,
                 f"score {score:9.4g}" if score is not None else f"{trial.state.name.lower():>15s}",
                 "feasible" if feasible else "infeasible" if trial.state == TrialState.COMPLETE else "",
                 f"best {self.best:.4g}" if self.best is not None else ""]
        self.bar.write("  ".join(p for p in parts if p), file=self.bar.fp)  # stderr: stdout stays for --json


def _bar(exp, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=exp.trials, initial=done, desc=f"search {exp.name}", unit="trial",
                disable=not enabled, dynamic_ncols=True)


def run(exp: Experiment, progress: bool = True, callbacks: Sequence[Callable] = ()) -> optuna.Study:
    """Run the experiment with `exp.workers` local processes on one study; returns the (re)loaded study.

    `callbacks` are Optuna trial callbacks run by worker 0 for every finished trial (e.g. the TensorBoard logger of
    nas.report.tensorboard); those with a `finish(study)` method are called once more when every worker is done."""
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    from nas.search.experiment import dump_experiment

    write_atomically(exp.run_dir / "config.yaml", dump_experiment(exp), "writing the experiment as resolved",
                     "free space and run the same command again: it resumes")
    callbacks = list(callbacks)
    if exp.workers == 1:
        run_worker(exp, 0, progress, callbacks)
    else:
        ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
        logs = _ParentLogging(ctx.Queue(), logging.getLogger("nas").getEffectiveLevel(),
                              optuna.logging.get_verbosity())
        # The workers' records come back here and go through this process's own handlers, whatever they are.
        relay = logging.handlers.QueueListener(logs.queue, _Relay())
        relay.start()
        procs = [ctx.Process(target=_spawned_worker, args=(exp, i, logs), daemon=False)
                 for i in range(1, exp.workers)]
        try:
            for p in procs:
                p.start()
            run_worker(exp, 0, progress, callbacks)
        finally:
            for p in procs:
                if p.pid is not None:
                    p.join()
            relay.stop()  # after the joins: every record the workers logged is handled
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            raise NasError(f"{len(bad)} worker process(es) exited with codes {bad}; rerun the same command to resume")
    study = optuna.load_study(study_name=exp.study_name,
                              storage=make_storage(exp.storage_url(), exp.heartbeat_s, exp.grace_s))
    for cb in callbacks:  # after every worker: e.g. the final figure sees the whole study
        if hasattr(cb, "finish"):
            cb.finish(study)
    return study


@dataclass(frozen=True)
class _ParentLogging:
    """What a spawned worker (fresh logging) needs to log as its parent does: the parent's 'nas' level, Optuna's
    verbosity, and the queue that takes its records back to the parent's handlers."""
    queue: Any
    level: int
    optuna_verbosity: int


class _Relay(logging.Handler):
    """Parent side: a worker's record is handled by the parent's logger of the same name, as if logged here."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _spawned_worker(exp, index: int, logs: _ParentLogging) -> None:
    """Entry point of worker processes 1..n-1: take the parent's logging choices, then run trials."""
    logger = logging.getLogger("nas")
    logger.setLevel(logs.level)
    logger.addHandler(logging.handlers.QueueHandler(logs.queue))
    logger.propagate = False  # the parent's root handlers see the relayed record, not a second copy here
    optuna.logging.set_verbosity(logs.optuna_verbosity)
    try:
        run_worker(exp, index, progress=False)
    except NasError as e:  # one line (the same from every worker is shown once), not a process traceback each
        logger.warning("a worker stopped: %s", e)
        sys.exit(2)


def summary(study: optuna.Study) -> dict[str, Any]:
    states = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] += 1
    return states
