"""Build and run the Optuna study of an experiment: sampler, storage (SQLite, any SQLAlchemy URL, journal file,
Redis journal), heartbeats with retry of dead workers' trials, resume, and several local worker processes."""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import optuna
from optuna.trial import TrialState

from nas.errors import NasError
from nas.search.samplers import make_pruner, make_sampler
from nas.search.storage import fail_dead_local_trials, make_storage, quiet_experimental

if TYPE_CHECKING:
    from nas.search.experiment import Experiment
MAX_FAILED_IN_A_ROW = 10  # consecutive failed trials after which a worker stops with the reason


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
    finally:
        torch.set_num_threads(threads)


def _run_trials(exp, index: int, progress: bool, callbacks: list) -> None:
    from nas.search.objective import Objective

    storage = make_storage(exp.storage_url(), exp.heartbeat_s, exp.grace_s)
    study = open_study(exp, storage, seed=exp.seed + index)
    if isinstance(storage, optuna.storages.JournalStorage):
        fail_dead_local_trials(study)
    objective = Objective(exp)
    start = time.monotonic()
    bar = _bar(exp, study, progress and index == 0)
    watch = _TrialWatch(bar if progress and index == 0 else None)
    callbacks = [*callbacks, watch]
    try:
        while True:
            done, running = counted(study)
            bar.n = done
            bar.refresh()
            if done >= exp.trials:
                break
            if exp.timeout_s is not None and time.monotonic() - start > exp.timeout_s:
                break
            if done + running >= exp.trials:
                time.sleep(0.5)  # the last trials are running elsewhere; if their worker dies they come back
                if isinstance(storage, optuna.storages.JournalStorage):
                    fail_dead_local_trials(study)
                else:
                    # optimize() fails stale trials only when it starts one: without this, a dead worker's trial
                    # holding one of the last slots would keep this worker waiting forever.
                    with quiet_experimental():
                        optuna.storages.fail_stale_trials(study)
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False, callbacks=callbacks)
            if watch.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                # Failed trials don't count towards the budget, so a cause that fails every candidate (a bad
                # evaluator setting, a broken data set) would otherwise loop forever.
                raise NasError(f"{watch.failed_in_a_row} trials in a row failed, the last with: {watch.last_reason}; "
                               f"fix the cause and run the same command again to resume")
    finally:
        bar.close()


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


def _bar(exp, study, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=exp.trials, initial=counted(study)[0], desc=f"search {exp.name}", unit="trial",
                disable=not enabled, dynamic_ncols=True)


def run(exp: Experiment, progress: bool = True, callbacks: Sequence[Callable] = ()) -> optuna.Study:
    """Run the experiment with `exp.workers` local processes on one study; returns the (re)loaded study.

    `callbacks` are Optuna trial callbacks run by worker 0 for every finished trial (e.g. the TensorBoard logger of
    nas.report.tensorboard); those with a `finish(study)` method are called once more when every worker is done."""
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    from nas.search.experiment import dump_experiment

    (exp.run_dir / "config.yaml").write_text(dump_experiment(exp))
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
    run_worker(exp, index, progress=False)


def summary(study: optuna.Study) -> dict[str, Any]:
    states = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] += 1
    return states
