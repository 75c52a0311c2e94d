"""Build and run the Optuna study of an experiment: sampler, storage (SQLite, any SQLAlchemy URL, journal file,
Redis journal), heartbeats with retry of dead workers' trials, resume, and several local worker processes."""
from __future__ import annotations

import inspect
import logging
import multiprocessing as mp
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from nas.config import suggest
from nas.errors import ConfigError, NasError

SAMPLERS = {"tpe", "nsga2", "nsga3", "random", "gp", "qmc", "cmaes", "bruteforce"}
HEARTBEAT_S = 10          # defaults of the experiment's heartbeat_s / grace_s: the RDB heartbeat period; a trial
GRACE_S = 30              # silent for GRACE_S is declared dead and retried
MAX_RETRY = 3
MAX_FAILED_IN_A_ROW = 10  # consecutive failed trials after which a worker stops with the reason
WORKER_ATTR = "nas:worker"  # host:pid of the process running a trial (journal storages have no heartbeat)


def mask_url(url: str) -> str:
    """Hide the password of a storage URL: postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+:)[^@]*(@)", r"\1***\2", url)


def check_sampler_name(name: str, source: str = "<experiment>") -> None:
    if name in SAMPLERS:
        return
    cls = getattr(optuna.samplers, name, None) if name.endswith("Sampler") else None
    # Only samplers make_sampler can build from a seed alone: abstract bases (BaseSampler) and those needing a
    # search space or a base sampler (GridSampler, PartialFixedSampler) would only fail once the search starts.
    if not (isinstance(cls, type) and not inspect.isabstract(cls) and all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(cls).parameters.values())):
        valid = sorted(SAMPLERS) + ["<any optuna.samplers class name, e.g. TPESampler>"]
        what = (f"sampler {name!r} cannot be built from a seed alone" if isinstance(cls, type)
                else f"unknown sampler {name!r}{suggest(name, SAMPLERS)}")
        raise ConfigError(source, "sampler", f"{what}; choose {', '.join(valid)}")


def make_sampler(name: str, seed: int, multi_objective: bool) -> optuna.samplers.BaseSampler:
    """A seeded sampler by short name, or any optuna.samplers class by its name."""
    if name == "tpe":
        # multivariate TPE models the joint distribution of the per-block choices; constraints come from
        # trial.set_constraint (Optuna 5), not a constraints_func.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    cls = getattr(optuna.samplers, name)
    try:
        return cls(seed=seed)
    except TypeError:
        return cls()


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
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat API: stable enough
    try:
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


def make_pruner(exp) -> optuna.pruners.BasePruner:
    kind = exp.evaluator.pruner if exp.evaluator.kind == "train" else "none"
    epochs = max(exp.evaluator.epochs, 1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def counted(study: optuna.Study) -> tuple[int, int]:
    """(finished trials that count towards the budget, trials running now). Failed trials don't count: retried."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    done = sum(t.state != TrialState.RUNNING for t in trials)
    return done, len(trials) - done


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


def run_worker(exp, index: int = 0, progress: bool = True, callbacks: list | None = None) -> None:
    """One worker: run trials until the study holds `exp.trials` finished trials (or the timeout passes).
    `callbacks` are Optuna trial callbacks (the TensorBoard logger on worker 0)."""
    import torch

    from nas.search.objective import Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if exp.workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // exp.workers))
    storage = make_storage(exp.storage_url(), exp.heartbeat_s, exp.grace_s)
    study = open_study(exp, storage, seed=exp.seed + index)
    if isinstance(storage, optuna.storages.JournalStorage):
        fail_dead_local_trials(study)
    objective = Objective(exp)
    start = time.monotonic()
    bar = _bar(exp, study, progress and index == 0)
    watch = _TrialWatch(bar if progress and index == 0 else None)
    callbacks = [*(callbacks or []), watch]
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


def run(exp, progress: bool = True) -> optuna.Study:
    """Run the experiment with `exp.workers` local processes on one study; returns the (re)loaded study."""
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    from nas.search.experiment import dump_experiment

    (exp.run_dir / "config.yaml").write_text(dump_experiment(exp))
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logger = _tensorboard(exp)
    callbacks = [logger] if logger else None
    if exp.workers == 1:
        run_worker(exp, 0, progress, callbacks)
    else:
        ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
        procs = [ctx.Process(target=run_worker, args=(exp, i, False), daemon=False) for i in range(1, exp.workers)]
        for p in procs:
            p.start()
        try:
            run_worker(exp, 0, progress, callbacks)
        finally:
            for p in procs:
                p.join()
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            raise NasError(f"{len(bad)} worker process(es) exited with codes {bad}; rerun the same command to resume")
    study = optuna.load_study(study_name=exp.study_name,
                              storage=make_storage(exp.storage_url(), exp.heartbeat_s, exp.grace_s))
    if logger:  # after every worker: the final figure sees the whole study (the logger flushes after each trial)
        logger.finish(study)
    return study


def _tensorboard(exp):
    """The TensorBoard logger for RUN/tb, or None when `tensorboard_every` is 0."""
    if not getattr(exp, "tensorboard_every", 25):
        return None
    from nas.search.tb import TensorBoardLogger

    return TensorBoardLogger(exp)


def summary(study: optuna.Study) -> dict[str, Any]:
    states = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] += 1
    return states
