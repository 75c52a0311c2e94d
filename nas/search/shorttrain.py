"""The short-training evaluator: train a candidate as a detector for a few epochs and score it by COCO mAP50-95,
reporting each epoch to Optuna so a pruner can stop weak candidates early."""
from __future__ import annotations

import math
from typing import Any

import optuna

from nas.arch.spec import ArchSpec
from nas.system import exclusive_lock, usable_cpus


def trial_data(exp) -> str:
    """The evaluator's data YAML, or DigitsDet generated once into the run folder (several workers may ask at
    once: the first generates under a lock, the others wait and then find it complete)."""
    ev = exp.evaluator
    if ev.data is not None:
        return ev.data
    from nas.detect.digits import digit_sizes, ensure_digits

    root = exp.run_dir / "digits"
    lo, hi = digit_sizes(ev.imgsz)
    with exclusive_lock(exp.run_dir / "digits.lock"):
        return str(ensure_digits(root, ev.train_images, ev.val_images, ev.imgsz, exp.seed, min_size=lo,
                                 max_size=hi, progress=False, workers=0))


def short_train(arch: ArchSpec, exp, trial: optuna.Trial) -> tuple[float, dict[str, Any]]:
    """Train `arch` for `exp.evaluator.epochs` epochs into RUN/trials/N and return (best epoch's mAP50-95, extras).

    Each epoch's mAP50-95 goes to `trial.report` (single-objective studies only: Optuna has no pruning for
    several objectives) and `optuna.TrialPruned` is raised when the pruner says so. A NaN/inf loss raises
    TrainingDiverged, which the objective records as the trial's fail reason.
    """
    from nas.detect.train import TrainConfig, train

    ev = exp.evaluator
    data = trial_data(exp)
    prunable = len(trial.study.directions) == 1

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get("map50_95", math.nan)
        if not prunable or not math.isfinite(value):
            return
        trial.report(value, epoch)  # steps count from 1, so Hyperband's max_resource = epochs is the last one
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} of {ev.epochs} (mAP50-95 {value:.4f})")

    cfg = TrainConfig(
        arch=arch, data=data, epochs=ev.epochs, imgsz=ev.imgsz, batch=ev.train_batch, device=exp.device, neck=ev.neck,
        seed=exp.seed,  # every candidate sees the same data order and augmentations
        # warm up for at most a third of the run, else a 3-epoch run never reaches its peak LR
        warmup_epochs=min(TrainConfig.warmup_epochs, ev.epochs / 3),
        project=str(exp.run_dir / "trials"), name=str(trial.number), exist_ok=True,
        # the search's workers share the CPUs; loading in-process avoids extra processes per trial
        workers=0, threads=max(1, usable_cpus() // exp.workers),
        progress=False, tensorboard=False)
    result = train(cfg, on_epoch=on_epoch)
    extras = {"map50": result.map50, "map50_95": result.map50_95, "train_s": round(result.seconds, 2),
              "best_epoch": result.best_epoch, "weights": str(result.best.resolve())}
    return result.map50_95, extras
