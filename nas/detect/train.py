"""Train a Detector on a YOLO-format dataset: one readable loop (warmup, LR schedule, EMA, AMP on CUDA, DDP through
torchrun, channels-last on CPU), per-epoch COCO evaluation, resumable weights_only checkpoints, results, TensorBoard.
`train` is the loop; its parts are `_setup`, `_train_epoch` and `_evaluate_and_save`."""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from nas.arch.detector import Detector
from nas.detect.checkpoint import model_meta, rng_state, save_checkpoint, set_rng_state
from nas.detect.data import DataConfig, YoloDataset, collate, load_data_config
from nas.detect.device import broadcast, resolve_channels_last, resolve_device
from nas.detect.digits import ensure_digits
from nas.detect.evaluate import evaluate
from nas.detect.loss import DetectionLoss
from nas.detect.optim import ModelEMA, build_optimizer, lr_lambda, planned_epochs, reschedule
from nas.detect.runfolder import (
    LOSS_NAMES,
    close_writer,
    full_disk_fix,
    hold_run_dir,
    log_epoch,
    open_resume,
    open_run_folder,
    resume_dir,
    resume_fix,
    unique_dir,
    write_csv,
)
from nas.detect.trainconfig import Recipe, TrainConfig, TrainResult, check_config
from nas.errors import NasError
from nas.system import cache_dir, retain_heap, usable_cpus


class TrainingDiverged(NasError):
    """The loss became NaN or infinite."""


def fitness(metrics: dict[str, Any]) -> float:
    """Ultralytics' model selection score: 0.1 * mAP50 + 0.9 * mAP50-95 (0 when not evaluated)."""
    v = 0.1 * metrics.get("map50", float("nan")) + 0.9 * metrics.get("map50_95", float("nan"))
    return v if math.isfinite(v) else 0.0


def default_data(cfg: TrainConfig, progress: bool) -> Path:
    """DigitsDet at the generator's defaults, generated once into the user cache."""
    root = cache_dir() / f"digitsdet_{cfg.digits_train}_{cfg.digits_val}"
    return ensure_digits(root, cfg.digits_train, cfg.digits_val, progress=progress)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32  # set per worker by the DataLoader from its seeded generator
    np.random.seed(s)
    random.seed(s)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict in standard NCHW layout: checkpoints must not depend on the memory format of the training."""
    return {k: v.contiguous() for k, v in state.items()}


@dataclass
class _Run:
    """What the epochs share: made by _setup, advanced by _train_epoch and _evaluate_and_save."""
    cfg: TrainConfig
    device: torch.device
    world: int
    main: bool                    # rank 0: evaluates and writes
    run_dir: Path
    data: DataConfig
    train_ds: YoloDataset
    sampler: DistributedSampler
    loader: DataLoader
    loader_gen: torch.Generator   # the loader workers' seeds
    val_loader: DataLoader | None  # rank 0 only
    fmt: torch.memory_format      # channels-last or contiguous
    model: Detector
    train_model: nn.Module        # model, or its DDP wrapper
    criterion: DetectionLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lf: Callable[[int], float]    # LR factor of an epoch (replaced when a time limit re-plans)
    amp: bool
    scaler: torch.amp.GradScaler
    ema: ModelEMA
    history: list[dict[str, Any]]  # results.csv rows
    start_epoch: int = 0
    best_fitness: float = -1.0
    best_epoch: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    writer: Any = None            # TensorBoard SummaryWriter (rank 0)
    recipe: Recipe | None = None  # None: one Detector, trained on the detection loss

    @property
    def show(self) -> bool:
        return self.cfg.progress and self.main


def _loaders(cfg: TrainConfig, data: DataConfig, world: int, rank: int, device: torch.device
             ) -> tuple[YoloDataset, DistributedSampler, DataLoader, torch.Generator, DataLoader | None]:
    train_ds = YoloDataset(data, "train", cfg.imgsz, augment=True, mosaic=cfg.mosaic, strict=cfg.strict, hyp=cfg.hyp,
                           seed=cfg.seed)
    # one sampler for 1 or N processes: the order is a pure function of (seed, epoch), so a resumed run repeats it
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    per_rank = max(cfg.batch // world, 1)
    workers = min(cfg.workers, usable_cpus())  # more workers than usable CPUs would only time-share
    loader_gen = torch.Generator()
    loader = DataLoader(train_ds, per_rank, sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker, generator=loader_gen)
    val_loader = None
    if rank == 0:
        val_ds = YoloDataset(data, "val", cfg.imgsz, augment=False, strict=cfg.strict)
        val_loader = DataLoader(val_ds, per_rank, shuffle=False, num_workers=workers, collate_fn=collate,
                                pin_memory=device.type == "cuda")
    return train_ds, sampler, loader, loader_gen, val_loader


def _restore(r: _Run, ckpt: dict[str, Any]) -> None:
    """A resume's training state; load_state_dict copies into the existing tensors, so the chosen layout stays."""
    try:  # loadable but edited or mismatched state fails here, as one line instead of a torch traceback
        r.model.load_state_dict(ckpt["model"])
        r.ema.module.load_state_dict(ckpt["ema"])
        r.ema.updates = ckpt["ema_updates"]
        r.optimizer.load_state_dict(ckpt["optimizer"])
        r.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            r.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        raise NasError(f"{r.run_dir / 'weights' / 'last.pt'}: damaged nas checkpoint: cannot restore the "
                       f"training state ({detail}); {resume_fix(r.run_dir)}") from None
    r.start_epoch, r.best_fitness, r.best_epoch = ckpt["epoch"], ckpt["best_fitness"], ckpt["best_epoch"]


def _setup(cfg: TrainConfig, world: int, rank: int, local_rank: int, held: ExitStack, recipe: Recipe | None) -> _Run:
    """Resume or start: config, data, run folder, model, optimizer, EMA; rank 0 locks the run folder until `held`
    closes (another training writing it is refused) and writes args.yaml and arch.yaml."""
    device = resolve_device(cfg.device, local_rank, world)
    main = rank == 0
    ckpt, history, run_dir = None, [], None
    if cfg.resume:
        if main and resume_dir(cfg).is_dir():  # locked before reading: a running training may be writing it
            hold_run_dir(resume_dir(cfg), held)
        cfg, ckpt, history, run_dir = open_resume(cfg)
    check_config(cfg)
    # data before the run folder: a bad data YAML or label set must not leave an empty PROJECT/NAME behind
    if cfg.data is None:
        data_yaml = default_data(cfg, cfg.progress) if main else None
        if world > 1:
            dist.barrier()
        if not main:
            data_yaml = default_data(cfg, False)
        cfg = replace(cfg, data=str(data_yaml))
    data = load_data_config(cfg.data)
    cfg = replace(cfg, data=str(Path(cfg.data).resolve()))  # a resumed run may start from another folder
    loaders = _loaders(cfg, data, world, rank, device)
    if run_dir is None:
        name, project = cfg.name or cfg.arch.name, Path(cfg.project)
        run_dir = broadcast(project / name if cfg.exist_ok else unique_dir(project, name), world)
        cfg = replace(cfg, name=run_dir.name)
    if main:
        if not cfg.resume:
            hold_run_dir(run_dir, held)
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)

    _seed_everything(cfg.seed)
    fmt = torch.channels_last if resolve_channels_last(cfg.channels_last, device) else torch.contiguous_format
    # converted before the EMA copy and the optimizer, so weights, EMA and momentum buffers share one layout
    model = (recipe.build(cfg, data.nc) if recipe else Detector(cfg.arch, replace(cfg.head, num_classes=data.nc))
             ).to(device, memory_format=fmt)
    criterion = DetectionLoss(data.nc, model.strides, model.reg_max)
    optimizer = build_optimizer(model, cfg, cfg.lr0 if cfg.lr0 is not None else
                                (0.01 if cfg.optimizer == "sgd" else 0.001))
    lf = lr_lambda(cfg.schedule, cfg.epochs, cfg.lrf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lf)
    amp = cfg.amp and device.type == "cuda"
    r = _Run(cfg, device, world, main, run_dir, data, *loaders, fmt=fmt, model=model, train_model=model,
             criterion=criterion, optimizer=optimizer, scheduler=scheduler, lf=lf, amp=amp,
             scaler=torch.amp.GradScaler("cuda", enabled=amp), ema=ModelEMA(model, cfg.ema_decay, cfg.ema_tau),
             history=history, recipe=recipe)
    if ckpt is not None:
        _restore(r, ckpt)
    if world > 1:
        r.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if main:
        r.writer = open_run_folder(run_dir, cfg)
    return r


def _step(r: _Run, imgs: torch.Tensor, targets: torch.Tensor, where: str) -> torch.Tensor:
    """One optimizer step; returns the loss parts. Stops every rank with TrainingDiverged on a NaN/inf."""
    cfg, device = r.cfg, r.device
    imgs = imgs.to(device, non_blocking=True, memory_format=r.fmt)
    with torch.autocast(device.type, enabled=r.amp):
        if r.recipe is None:
            loss, parts = r.criterion(r.train_model(imgs), targets.to(device), cfg.imgsz)
        else:
            loss, parts = r.recipe.loss(r.train_model, r.criterion, imgs, targets.to(device), cfg.imgsz)
    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
    if r.world > 1:
        dist.all_reduce(bad)  # every rank stops together
    if bad.item():
        raise TrainingDiverged(f"training diverged: the loss became {loss.item()} at {where} "
                               f"(lr {r.optimizer.param_groups[2]['lr']:.3g}); try a lower --lr0, a longer warmup or "
                               "check the labels")
    # DDP averages gradients over ranks; the loss is per-rank-batch-summed, so scale back to the total
    r.scaler.scale(loss * r.world).backward()
    r.scaler.unscale_(r.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(r.model.parameters(), max_norm=cfg.clip_norm)
    # a finite loss can still give NaN gradients (e.g. sqrt at 0); stepping would make every weight NaN and the
    # run "finish" with mAP 0. With AMP the scaler skips such steps itself. DDP: gradients are all-reduced, so
    # every rank sees the same norm and stops together.
    if not r.amp and not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"training diverged: the gradient norm became {grad_norm.item()} at {where} "
                               f"(loss {loss.item():.4g}); try a lower --lr0 or check the labels")
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    r.ema.update(r.model)
    return parts


def _train_epoch(r: _Run, epoch: int, epochs: int) -> torch.Tensor:
    """One pass over this rank's shard of the training data; returns the mean box, cls and dfl losses."""
    cfg = r.cfg
    r.model.train()
    r.sampler.set_epoch(epoch)
    r.loader_gen.manual_seed(cfg.seed + epoch)  # worker seeds
    r.train_ds.set_epoch(epoch)
    if epoch >= epochs - cfg.close_mosaic:
        r.train_ds.close_mosaic()
    nb = len(r.loader)
    nw = round(cfg.warmup_epochs * nb)  # warmup iterations
    bias_start = cfg.warmup_bias_lr if cfg.optimizer == "sgd" else 0.0
    mloss = torch.zeros(3)
    bar = tqdm(r.loader, total=nb, desc=f"epoch {epoch + 1}/{epochs}", disable=not r.show, leave=True,
               dynamic_ncols=True)
    for i, (imgs, targets, _) in enumerate(bar):
        ni = i + nb * epoch
        if ni <= nw and nw > 0:  # warmup: LR ramps to its scheduled value, momentum to its final value
            for g in r.optimizer.param_groups:
                start = bias_start if g["name"] == "bias" else 0.0
                g["lr"] = float(np.interp(ni, [0, nw], [start, g["initial_lr"] * r.lf(epoch)]))
                if "momentum" in g:
                    g["momentum"] = float(np.interp(ni, [0, nw], [cfg.warmup_momentum, cfg.momentum]))
        parts = _step(r, imgs, targets, f"epoch {epoch + 1}, step {i + 1}/{nb}")
        mloss = (mloss * i + parts.float().cpu()) / (i + 1)
        if r.show:
            bar.set_postfix({n.split("_")[0]: f"{v:.3f}" for n, v in zip(LOSS_NAMES, mloss.tolist())})
    bar.close()
    return mloss


def _replan(r: _Run, epochs: int, train_time: float) -> int:
    """A time-limited run's epochs after this one's training; the LR schedule follows."""
    n = 0
    if r.main:  # this epoch costs its training time plus the latest validation time
        val_s = next((x["val_time"] for x in reversed(r.history) if x["val_time"] > 0), 0.0)
        n = planned_epochs(r.cfg, [x["time"] for x in r.history] + [train_time + val_s])
    n = int(broadcast(n, r.world))
    if n != epochs:
        r.lf = reschedule(r.scheduler, r.cfg, n)
    return n


def _checkpoint(r: _Run, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": row["epoch"], "best_fitness": r.best_fitness, "best_epoch": r.best_epoch,
        "model": _contiguous(r.model.state_dict()), "ema": _contiguous(r.ema.module.state_dict()),
        "ema_updates": r.ema.updates, "optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
        "scaler": r.scaler.state_dict() if r.amp else None, "rng": rng_state(),
        "config": r.cfg.to_dict(), "meta": {**model_meta(r.model, r.data.names), **(r.recipe.meta if r.recipe else {})},
        "metrics": dict(row), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
    }


def _evaluate_and_save(r: _Run, epoch: int, epochs: int, mloss: torch.Tensor, lrs: list[float], train_time: float,
                       on_epoch: Callable[[int, dict[str, Any]], None] | None) -> bool:
    """Rank 0 evaluates the EMA model (each val_interval and after the last epoch), appends to results.csv and
    TensorBoard, writes last.pt (and best.pt when better) and calls on_epoch. Returns True when another rank's
    on_epoch stopped the run; on rank 0 on_epoch's exception propagates."""
    cfg = r.cfg
    stop_exc: BaseException | None = None
    if r.main:
        metrics: dict[str, Any] = {}
        t_val = time.time()
        if (epoch + 1) % cfg.val_interval == 0 or epoch + 1 >= epochs:
            metrics = (r.recipe.validate(r.ema.module, r) if r.recipe else
                       evaluate(r.ema.module, r.val_loader, r.device, num_classes=r.data.nc))
            r.speed = metrics["speed"]
        val_time = time.time() - t_val
        fit = fitness(metrics)
        row = {"epoch": epoch + 1, **{f"train/{n}": v for n, v in zip(LOSS_NAMES, mloss.tolist())},
               **{f"lr/pg{j}": lr for j, lr in enumerate(lrs)},
               "map50": metrics.get("map50", float("nan")), "map50_95": metrics.get("map50_95", float("nan")),
               "fitness": fit if metrics else float("nan"), "time": train_time + val_time, "val_time": val_time}
        r.history.append(row)
        write_csv(r.run_dir / "results.csv", r.history)
        log_epoch(r.writer, row, r.run_dir)
        improved = bool(metrics) and fit > r.best_fitness
        if improved:
            r.best_fitness, r.best_epoch = fit, epoch + 1
        ckpt = _checkpoint(r, row)
        if improved:  # before last.pt: a failed save (a full disk) leaves last.pt at the epoch before, whose resume
            save_checkpoint(ckpt, r.run_dir / "weights" / "best.pt", full_disk_fix(r.run_dir))  # writes both again
        save_checkpoint(ckpt, r.run_dir / "weights" / "last.pt", full_disk_fix(r.run_dir))
        r.final = row
        if on_epoch is not None:
            try:
                on_epoch(epoch + 1, row)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                stop_exc = e
    stopped = False
    if r.world > 1:
        flag = torch.tensor(float(stop_exc is not None), device=r.device)
        dist.broadcast(flag, 0)
        stopped = bool(flag.item())
    if stop_exc is not None:
        raise stop_exc
    return stopped


def train(cfg: TrainConfig, on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
          recipe: Recipe | None = None) -> TrainResult:
    """Train, evaluate each `val_interval` epochs on the EMA model, checkpoint, and return the best epoch's metrics.

    `on_epoch(epoch, metrics)` runs on rank 0 after each epoch's checkpoint (epoch counts from 1; metrics is the
    results.csv row); raising from it stops training and the exception propagates (e.g. optuna.TrialPruned).
    Under torchrun (RANK/WORLD_SIZE set) each process trains on its shard; only rank 0 evaluates and writes.
    `recipe` swaps the model, the step's loss and the evaluation (the supernet); None trains cfg.arch's Detector.
    """
    t_start = time.time()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    threads = torch.get_num_threads()
    if cfg.retain_heap:  # first thing: the DataLoader workers forked below inherit it
        retain_heap()
    r, held = None, ExitStack()  # the run folder's lock, released when the training ends however it ends
    try:
        if cfg.threads:  # process-wide, so restored below; 1 avoids OpenMP spin-waits on busy small machines
            torch.set_num_threads(cfg.threads)
        r = _setup(cfg, world, rank, int(os.environ.get("LOCAL_RANK", 0)), held, recipe)
        cfg, stopped = r.cfg, False
        epochs = planned_epochs(cfg, [x["time"] for x in r.history])  # == cfg.epochs without a time limit
        if epochs != cfg.epochs:
            r.lf = reschedule(r.scheduler, cfg, epochs)
        epoch = r.start_epoch
        while epoch < epochs and not stopped:
            t_epoch = time.time()
            mloss = _train_epoch(r, epoch, epochs)
            train_time = time.time() - t_epoch
            if cfg.time_limit_s is not None:  # re-plan before the LR step and the last-epoch evaluation use it
                epochs = _replan(r, epochs, train_time)
            lrs = [g["lr"] for g in r.optimizer.param_groups]
            r.scheduler.step()
            stopped = _evaluate_and_save(r, epoch, epochs, mloss, lrs, train_time, on_epoch)
            epoch += 1

        summary = None
        if r.main:
            best = next((x for x in r.history if x["epoch"] == r.best_epoch), {})
            summary = {"epochs": r.final.get("epoch", r.start_epoch), "best_epoch": r.best_epoch,
                       "map50": best.get("map50", float("nan")), "map50_95": best.get("map50_95", float("nan")),
                       "fitness": max(r.best_fitness, 0.0), "final": r.final, "history": r.history, "speed": r.speed}
        summary = broadcast(summary, world)
        wdir = r.run_dir / "weights"
        return TrainResult(run_dir=r.run_dir, best=wdir / "best.pt", last=wdir / "last.pt",
                           seconds=time.time() - t_start, stopped=stopped, **summary)
    finally:
        torch.set_num_threads(threads)
        if r is not None:
            close_writer(r.writer)
        held.close()
        if own_group:
            dist.destroy_process_group()
