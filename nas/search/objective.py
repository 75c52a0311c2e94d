"""One trial: sample an architecture, predict its latency from the table (backbone alone, or the whole detector:
backbone + neck+head op), reject it without evaluation when it is over budget, otherwise score it (zero-cost proxy or
short training or weights inherited from a supernet), and store everything export needs."""
from __future__ import annotations

import math
import traceback
from typing import TYPE_CHECKING, Any, Callable

import optuna

from nas.arch.cost import arch_cost
from nas.arch.spec import ArchSpec, dumps_arch
from nas.detect.short import ShortSchedule, short_train
from nas.errors import ConfigError, NasError
from nas.latency.coverage import extend_command, space_neckhead_ops
from nas.latency.table import LatencyTable, LatencyTableError
from nas.search.outage import outage
from nas.search.storage import WORKER_ATTR, pause_here, worker_id
from nas.space import load_space, trial_chooser
from nas.system import usable_cpus

if TYPE_CHECKING:
    from nas.search.experiment import Experiment


class SurplusTrial(NasError):
    """Two workers saw one trial missing and both started one: the later trial is dropped (recorded as failed with
    `surplus: true`), so the study ends with exactly the requested number of trials."""


class EvaluationFailed(NasError):
    """A candidate's evaluation raised or produced a non-finite score; the trial is failed with the reason."""


def short_schedule(exp: Experiment) -> ShortSchedule:
    """The experiment's `kind: train` evaluator as the short training: one seed, the experiment's (every candidate
    sees the same data order and augmentations), SGD, evaluated each epoch for the pruner, the CPUs shared among
    the local workers."""
    ev = exp.evaluator
    return ShortSchedule(epochs=ev.epochs, imgsz=ev.imgsz, batch=ev.train_batch, optimizer="sgd", neck=ev.neck,
                         seeds=(exp.seed,), data=ev.data, train_images=ev.train_images, val_images=ev.val_images,
                         data_seed=exp.seed, val_interval=1, threads=max(1, usable_cpus() // exp.workers))


def pruning_callback(trial: optuna.Trial, epochs: int) -> Callable[[int, dict[str, Any]], None]:
    """A training's on_epoch that reports each epoch's mAP50-95 to `trial` and raises optuna.TrialPruned when the
    study's pruner says so."""
    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get("map50_95", math.nan)
        if not math.isfinite(value):
            return
        trial.report(value, epoch)  # steps count from 1, so Hyperband's max_resource = epochs is the last one
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} of {epochs} (mAP50-95 {value:.4f})")
    return on_epoch


class Objective:
    def __init__(self, exp: Experiment):
        self.exp = exp
        self.space = load_space(exp.space)
        self.table = LatencyTable.load(exp.table)
        self.table.check_compatible(self.table.protocol, cpu=False)  # the CPU: `search.hosttable` says it once
        self.head = exp.head
        self.inherited = None
        if exp.evaluator.kind == "supernet":
            from nas.search.inherited import SupernetEvaluator

            self.inherited = SupernetEvaluator(exp, self.space)
        if self.head is not None:
            self._check_detector_scope()

    def _check_detector_scope(self) -> None:
        """Refuse, before the first trial, a detector-scope search the space or the table cannot serve (else every
        trial would fail with the same reason)."""
        exp = self.exp
        try:
            needed = list(space_neckhead_ops(self.space, self.head))
        except ConfigError as e:
            raise ConfigError(exp.source, "scope", f"scope: detector: {exp.space}: {e.message}; use scope: backbone "
                                                   f"(--budget-scope backbone)") from None
        missing = self.table.missing(needed)
        if missing:
            fix = extend_command(str(self.table.path), self.head, f"--space {exp.space}")
            raise LatencyTableError(
                f"{exp.source}: scope: detector: latency table {self.table.path} has no neck+head entry for "
                f"{len(missing)} of the space's {len(needed)} feature-channel/resolution combinations (e.g. "
                f"{missing[0].key}); add them with `{fix}`, or use --budget-scope backbone")
        if exp.evaluator.kind == "train":
            from nas.detect.data import load_data_config

            nc = load_data_config(exp.evaluator.data).nc if exp.evaluator.data else 10  # DigitsDet: 10 digits
            if nc != exp.num_classes:
                raise ConfigError(exp.source, "num_classes", f"the budget's head predicts {exp.num_classes} classes "
                                                             f"but the training data has {nc}; set num_classes: {nc}")

    # ------------------------------------------------------------ pieces
    def predict_ms(self, arch: ArchSpec) -> tuple[float, list[list[Any]]]:
        pred = self.table.predict(arch, self.head)
        return pred.total_ms, [[name, round(us, 1)] for name, _, us in pred.blocks]

    def evaluate(self, arch: ArchSpec, trial: optuna.Trial) -> tuple[float, dict[str, Any]]:
        pause_here("evaluator")  # the reliability tests' kill point (inert unless NAS_TEST_PAUSE_AT=evaluator)
        ev = self.exp.evaluator
        if ev.kind == "proxy":
            from nas.search.proxies import score

            value = score(arch, ev.proxy, resolution=ev.resolution, batch=ev.batch, seed=self.exp.seed,
                          device=self.exp.device)
            return value, {f"proxy_{ev.proxy}": value}
        if self.inherited is not None:
            return self.inherited(arch)
        return self.train_score(arch, trial)

    def train_score(self, arch: ArchSpec, trial: optuna.Trial) -> tuple[float, dict[str, Any]]:
        """Train `arch` into RUN/trials/N (data: RUN/digits unless given) and score it by the best epoch's mAP50-95.

        Single-objective studies report each epoch to the pruner (Optuna cannot prune several objectives). A NaN/inf
        loss raises TrainingDiverged, which the trial records as its fail reason.
        """
        exp = self.exp
        schedule = short_schedule(exp)
        prune = pruning_callback(trial, schedule.epochs) if len(trial.study.directions) == 1 else None
        r = short_train(arch, schedule, schedule.dataset(exp.run_dir, "digits"), exp.run_dir / "trials" /
                        str(trial.number), exp.seed, on_epoch=prune, device=exp.device)
        return r["map50_95"], {k: r[k] for k in ("map50", "map50_95", "train_s", "best_epoch", "weights")}

    def reward(self, score: float, latency_ms: float) -> float:
        """MnasNet's soft-constraint reward ACC·(LAT/T)^w (w = alpha under the budget, beta over it).

        Every proxy returns a logarithm, so for proxies the same reward reads log ACC + w·ln(LAT/T).
        """
        exp = self.exp
        w = exp.mnas_alpha if latency_ms <= exp.budget_ms else exp.mnas_beta
        ratio = latency_ms / exp.budget_ms
        if exp.evaluator.kind == "proxy":
            return score + w * math.log(ratio)
        return score * ratio ** w

    def _refuse_surplus(self, trial: optuna.Trial) -> None:
        """Trial numbers are handed out atomically by the storage: a trial preceded by `trials` others that
        finished or are running (failed ones are retried, so they don't count) is one too many. Waiting ones count:
        a dead worker's retry, queued just before this trial was created, runs whatever this one does."""
        from optuna.trial import TrialState

        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.RUNNING, TrialState.WAITING))
        if sum(t.number < trial.number for t in ahead) >= self.exp.trials:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", "surplus: the study had its trials when this one started")
            raise SurplusTrial(f"trial {trial.number} is surplus")

    # ------------------------------------------------------------ the trial
    def __call__(self, trial: optuna.Trial):
        exp = self.exp
        trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker_id())
        self._refuse_surplus(trial)
        arch = self.space.sample(trial_chooser(trial), name=f"{exp.name}-trial-{trial.number}")
        latency_ms, breakdown = self.predict_ms(arch)
        cost = arch_cost(arch)
        attrs = {"arch": dumps_arch(arch), "predicted_ms": round(latency_ms, 4), "latency_breakdown_us": breakdown,
                 "params": cost.params, "macs": cost.macs, "table": self.table.name, "scope": exp.scope,
                 "budget_ms": exp.budget_ms, "resolution": arch.resolution}
        if self.head is not None:  # what `nas export` needs to predict and measure the same detector
            attrs["detector"] = self.head.to_dict()
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        constrained = exp.mode in ("constraint", "pareto") and exp.budget_ms is not None
        if constrained:
            trial.set_constraint("latency_ms", latency_ms - exp.budget_ms)
            if latency_ms > exp.budget_ms:
                # Known infeasible from the table alone: recorded, never paid for. The sentinel score is ignored by
                # the samplers (they rank infeasible trials by violation) and by best_trial(s).
                trial.set_user_attr("evaluated", False)
                return (-math.inf, latency_ms) if exp.mode == "pareto" else -math.inf
        try:
            score, extras = self.evaluate(arch, trial)
            if not math.isfinite(score):
                raise EvaluationFailed(f"score is {score}")
        except optuna.TrialPruned:
            trial.set_user_attr("evaluated", True)
            raise
        except Exception as e:  # the study goes on; the reason stays with the trial
            if outage(e) is not None:  # nowhere to write the reason: the worker waits for the storage and retries
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("evaluated", False)
            if not isinstance(e, (NasError, MemoryError, RuntimeError, FloatingPointError)):
                trial.set_user_attr("fail_traceback", traceback.format_exc()[-2000:])
            raise
        trial.set_user_attr("evaluated", True)
        trial.set_user_attr("score", score)
        for k, v in extras.items():
            trial.set_user_attr(k, v)
        if exp.mode == "pareto":
            return score, latency_ms
        if exp.mode == "mnas":
            return self.reward(score, latency_ms)
        return score
