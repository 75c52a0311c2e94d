"""The optimisation side of training: parameter groups, the LR schedule and its re-planning under a time limit,
and the EMA of the weights."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from nas.detect.trainconfig import TrainConfig


class ModelEMA:
    """Exponential moving average of weights and BN buffers; the decay ramps up so early steps move it fast."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(src[k].detach(), 1 - d)
            else:
                v.copy_(src[k])


def lr_lambda(schedule: str, epochs: int, lrf: float) -> Callable[[int], float]:
    """LR factor of epoch e: linear or cosine from 1 to lrf over `epochs`."""
    if schedule == "cosine":
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: (1 - e / epochs) * (1.0 - lrf) + lrf


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Three groups as in ultralytics: biases, norm/scale weights (no decay), conv/linear weights (decay)."""
    groups: dict[str, list[nn.Parameter]] = {"bias": [], "norm": [], "weight": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "bias" if name.endswith(".bias") else "norm" if p.ndim <= 1 else "weight"
        groups[key].append(p)
    decay = cfg.weight_decay * cfg.batch / cfg.nbs
    spec = [{"params": groups["bias"], "name": "bias", "weight_decay": 0.0},
            {"params": groups["norm"], "name": "norm", "weight_decay": 0.0},
            {"params": groups["weight"], "name": "weight", "weight_decay": decay}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(spec, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(spec, lr=lr, betas=(cfg.momentum, 0.999))


def planned_epochs(cfg: TrainConfig, epoch_times: list[float]) -> int:
    """How many epochs this run trains: cfg.epochs, or with `time_limit_s` as many as fit in the budget at the mean
    of `epoch_times` (seconds per finished epoch: training + validation, results.csv's `time`), never fewer than
    those already done and never more than cfg.epochs.

    Re-planned after every epoch, so the LR schedule and close_mosaic follow the budget rather than a guess; the
    run ends after the epoch that uses the budget up (it may overshoot by that epoch's deviation from the mean).
    Setup, checkpoint writes and time before a resume's restart are not counted; results depend on the machine's
    speed, so a time-limited run is not reproducible bit for bit.
    """
    if cfg.time_limit_s is None or not epoch_times:
        return cfg.epochs
    fit = int(cfg.time_limit_s // (sum(epoch_times) / len(epoch_times)))
    return min(cfg.epochs, max(len(epoch_times), fit))


def reschedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, epochs: int
               ) -> Callable[[int], float]:
    """Stretch or shrink the LR schedule to `epochs` (a time-limited run re-plans); returns the new LR factor."""
    lf = lr_lambda(cfg.schedule, epochs, cfg.lrf)
    scheduler.lr_lambdas = [lf] * len(scheduler.optimizer.param_groups)
    return lf
