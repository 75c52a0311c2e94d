"""One trial: sample an architecture, predict its latency from the table (backbone alone, or the whole detector:
backbone + neck+head op), reject it without evaluation when it is over budget, otherwise score it (zero-cost proxy or
short training), and store everything export needs."""
from __future__ import annotations

import math
import traceback
from dataclasses import asdict
from typing import Any

import optuna

from nas.arch.cost import arch_cost
from nas.arch.spec import ArchSpec, dumps_arch
from nas.errors import ConfigError, NasError
from nas.latency.coverage import extend_command, space_neckhead_ops
from nas.latency.table import LatencyTable, LatencyTableError
from nas.space import load_space, trial_chooser


class SurplusTrial(NasError):
    """Two workers saw one trial missing and both started one: the later trial is dropped (recorded as failed with
    `surplus: true`), so the study ends with exactly the requested number of trials."""


class EvaluationFailed(NasError):
    """A candidate's evaluation raised or produced a non-finite score; the trial is failed with the reason."""


class Objective:
    def __init__(self, exp):
        self.exp = exp
        self.space = load_space(exp.space)
        self.table = LatencyTable.load(exp.table)
        self.table.check_compatible(self.table.protocol)
        self.head = exp.head
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
        ev = self.exp.evaluator
        if ev.kind == "proxy":
            from nas.search.proxies import score

            value = score(arch, ev.proxy, resolution=ev.resolution, batch=ev.batch, seed=self.exp.seed,
                          device=self.exp.device)
            return value, {f"proxy_{ev.proxy}": value}
        from nas.search.shorttrain import short_train

        return short_train(arch, self.exp, trial)

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
        finished or are running (failed ones are retried, so they don't count) is one too many."""
        from optuna.trial import TrialState

        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.exp.trials:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", "surplus: the study had its trials when this one started")
            raise SurplusTrial(f"trial {trial.number} is surplus")

    # ------------------------------------------------------------ the trial
    def __call__(self, trial: optuna.Trial):
        from nas.search.storage import WORKER_ATTR, worker_id

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
            attrs["detector"] = asdict(self.head)
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
