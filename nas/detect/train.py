"""Train a Detector on a YOLO-format dataset: one readable loop (warmup, LR schedule, EMA, AMP on CUDA, DDP through
torchrun, channels-last on CPU), per-epoch COCO evaluation, resumable weights_only checkpoints, results, TensorBoard."""
from __future__ import annotations

import copy
import csv
import math
import os
import random
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from nas.arch.detector import Detector, check_detector_args
from nas.arch.spec import ArchSpec, loads_arch, save_arch
from nas.detect.checkpoint import (
    load_checkpoint,
    model_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nas.detect.data import YoloDataset, collate, load_data_config
from nas.detect.digits import ensure_digits
from nas.detect.evaluate import evaluate
from nas.detect.loss import DetectionLoss
from nas.errors import ConfigError, NasError
from nas.system import cache_dir, retain_heap

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
CSV_FIELDS = ("epoch", *(f"train/{n}" for n in LOSS_NAMES), "lr/pg0", "lr/pg1", "lr/pg2", "map50", "map50_95",
              "fitness", "time", "val_time")
TB_TAGS = {"map50": "metrics/mAP50", "map50_95": "metrics/mAP50-95", "fitness": "metrics/fitness",
           "time": "time/epoch", "val_time": "time/val"}
# may change when a run is resumed (they change speed or checking, not what is learned)
RUNTIME_FIELDS = ("device", "workers", "threads", "progress", "tensorboard", "channels_last", "strict")


class TrainingDiverged(NasError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults follow ultralytics where it has one.

    CPU fast path: training always keeps freed memory in the process (glibc mallopt, `nas.heap.retain_heap`: no
    page faults for re-allocated activations), and on CPU it runs the model and batches in channels-last memory
    format (`channels_last` None = auto: on for CPU, off for CUDA, where it pays off mainly with AMP on tensor cores;
    set True to try it). MobileNetV4-Conv-Small detector, batch 8, 256 px, 1 thread, CPU time per step: 708 ms
    before, 545 ms with both (heap alone 661, channels-last alone 587; ~18,000 page faults per step -> 0), see
    benchmarks/train_step.py. Checkpoints hold standard contiguous tensors whatever the layout used in training.
    """
    arch: ArchSpec | None = None  # None only with resume=True (the checkpoint has it)
    data: str | None = None       # data YAML; None = DigitsDet generated into the user cache
    epochs: int = 10
    imgsz: int = 320              # a multiple of 32
    batch: int = 16               # total over all DDP processes
    device: str = "cpu"
    workers: int = 2
    neck: str = "yolov8"          # yolov8 | dw
    width: float = 0.25           # neck width multiplier (the YOLOv8-n scale)
    depth: float = 0.33
    optimizer: str = "sgd"        # sgd (momentum, nesterov) | adamw
    lr0: float | None = None      # None: 0.01 for SGD, 0.001 for AdamW
    lrf: float = 0.01             # final LR = lr0 * lrf
    schedule: str = "linear"      # linear | cosine
    momentum: float = 0.937       # SGD momentum / AdamW beta1
    weight_decay: float = 5e-4    # on conv/linear weights only, scaled by batch / nbs
    nbs: int = 64                 # nominal batch size of the weight decay scaling
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1   # SGD only; AdamW biases warm up from 0 like the other groups
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0       # EMA decay ramps as decay * (1 - exp(-updates / tau))
    clip_norm: float = 10.0
    amp: bool = True              # mixed precision, used on CUDA only
    mosaic: float = 1.0
    close_mosaic: int = 10        # last N epochs without mosaic
    val_interval: int = 1         # evaluate every N epochs (and always after the last)
    seed: int = 0
    project: str = "runs/train"
    name: str | None = None       # default: the arch name (made unique unless exist_ok or resume)
    exist_ok: bool = False
    resume: bool = False          # continue project/name/weights/last.pt to the epochs it was started with
    strict: bool = False          # stop at the first bad label line (file:line) instead of skipping bad lines
    time_limit_s: float | None = None  # wall-clock budget, see planned_epochs; epochs is then the upper bound
    channels_last: bool | None = None  # None: on for CPU, off for CUDA
    digits_train: int = 1000      # DigitsDet size when data is None
    digits_val: int = 200
    threads: int | None = None    # torch intra-op threads while training (None: leave torch's setting)
    progress: bool = True
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (arch by name; its YAML is stored separately)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "arch"}
        d["arch"] = self.arch.name if self.arch is not None else None
        return d


@dataclass
class TrainResult:
    run_dir: Path
    best: Path                    # weights/best.pt (EMA weights of the best-fitness epoch)
    last: Path
    epochs: int                   # epochs completed
    best_epoch: int
    map50: float                  # metrics of the best epoch
    map50_95: float
    fitness: float
    final: dict[str, Any] = field(default_factory=dict)   # the last epoch's row of results.csv
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False         # ended early (another DDP rank's callback stopped the run)
    speed: dict[str, float] = field(default_factory=dict)  # ms per image of the last evaluation (evaluate())


def fitness(metrics: dict[str, Any]) -> float:
    """Ultralytics' model selection score: 0.1 * mAP50 + 0.9 * mAP50-95 (0 when not evaluated)."""
    v = 0.1 * metrics.get("map50", float("nan")) + 0.9 * metrics.get("map50_95", float("nan"))
    return v if math.isfinite(v) else 0.0


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


def resolve_channels_last(setting: bool | None, device: torch.device) -> bool:
    """TrainConfig.channels_last: None means on for CPU (oneDNN's convolutions run NHWC natively, so NCHW pays
    reorders around them: 15-25% of a training step here) and off elsewhere."""
    return device.type == "cpu" if setting is None else setting


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


def _reschedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, epochs: int
                ) -> Callable[[int], float]:
    """Stretch or shrink the LR schedule to `epochs` (a time-limited run re-plans); returns the new LR factor."""
    lf = lr_lambda(cfg.schedule, epochs, cfg.lrf)
    scheduler.lr_lambdas = [lf] * len(scheduler.optimizer.param_groups)
    return lf


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict in standard NCHW layout: checkpoints must not depend on the memory format of the training."""
    return {k: v.contiguous() for k, v in state.items()}


def check_config(cfg: TrainConfig) -> None:
    src = "train config"
    positive = {"epochs": cfg.epochs, "batch": cfg.batch, "val_interval": cfg.val_interval, "nbs": cfg.nbs}
    for k, v in positive.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(src, k, f"must be a positive integer, got {v!r}")
    if cfg.arch is None:
        raise ConfigError(src, "arch", "missing: give an arch YAML or zoo:NAME (or resume an existing run)")
    if isinstance(cfg.imgsz, bool) or not isinstance(cfg.imgsz, int) or cfg.imgsz < 32 or cfg.imgsz % 32:
        raise ConfigError(src, "imgsz", f"must be a positive multiple of 32 (the detector's largest stride), "
                                        f"got {cfg.imgsz!r}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ConfigError(src, "optimizer", f"must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.schedule not in ("linear", "cosine"):
        raise ConfigError(src, "schedule", f"must be linear or cosine, got {cfg.schedule!r}")
    if cfg.lr0 is not None and not cfg.lr0 > 0:
        raise ConfigError(src, "lr0", f"must be positive, got {cfg.lr0!r}")
    if not 0 < cfg.lrf <= 1:
        raise ConfigError(src, "lrf", f"must be in (0, 1], got {cfg.lrf!r}")
    if cfg.workers < 0 or cfg.close_mosaic < 0 or cfg.warmup_epochs < 0:
        raise ConfigError(src, "workers/close_mosaic/warmup_epochs", "must not be negative")
    limit = cfg.time_limit_s
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not 0 < limit < math.inf):
        raise ConfigError(src, "time_limit_s", f"must be a positive number of seconds, got {limit!r}")
    if not isinstance(cfg.strict, bool):
        raise ConfigError(src, "strict", f"must be true or false, got {cfg.strict!r}")
    if cfg.channels_last is not None and not isinstance(cfg.channels_last, bool):
        raise ConfigError(src, "channels_last", f"must be true, false or null (auto), got {cfg.channels_last!r}")
    check_detector_args(cfg.arch, 1, cfg.neck, cfg.width, cfg.depth, 16)


def resolve_device(name: str, local_rank: int, world: int) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train config", "device", f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train config", "device", f"{name} requested but CUDA is not available; use --device cpu")
        # one GPU per process under torchrun; a bare "cuda" means GPU 0
        device = torch.device("cuda", local_rank if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError("train config", "device", f"unsupported device {name!r}; use cpu or cuda:N")
    return device


def default_data(cfg: TrainConfig, progress: bool) -> Path:
    """DigitsDet at the generator's defaults, generated once into the user cache."""
    root = cache_dir() / f"digitsdet_{cfg.digits_train}_{cfg.digits_val}"
    return ensure_digits(root, cfg.digits_train, cfg.digits_val, progress=progress)


def _unique_dir(project: Path, name: str) -> Path:
    d, i = project / name, 2
    while d.exists():
        d, i = project / f"{name}{i}", i + 1
    return d


# what a resume reads from last.pt beyond load_checkpoint's own checks, with the types it needs
RESUME_KEYS = {"epoch": int, "best_fitness": (int, float), "best_epoch": int, "ema": dict, "ema_updates": int,
               "optimizer": dict, "scheduler": dict, "rng": dict, "config": dict}
# args.yaml fields a resume may differ in: runtime settings, and where the run lives
ARGS_FREE = (*RUNTIME_FIELDS, "resume", "project", "name", "exist_ok")


def _resume_ready(path: Path) -> dict[str, Any]:
    """A checkpoint that has everything a resume needs, or a NasError naming the file."""
    ckpt = load_checkpoint(path)
    bad = [k for k, t in RESUME_KEYS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    if bad:
        raise NasError(f"{path}: damaged nas checkpoint: missing or of the wrong type: {', '.join(bad)}")
    return ckpt


def _resume_fix(run_dir: Path) -> str:
    """How to get going again when last.pt is unusable: best.pt is a full checkpoint too, if it is intact."""
    best = run_dir / "weights" / "best.pt"
    try:
        epoch = _resume_ready(best)["epoch"]
    except NasError:
        return "start a new run without --resume (this run has no usable checkpoint to continue)"
    return (f"to continue after epoch {epoch} instead, copy {best} over it and resume again; or start a new run "
            "without --resume")


def _resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    try:
        return _resume_ready(run_dir / "weights" / "last.pt")
    except NasError as e:  # load_checkpoint's reason, plus what to do about it in a resume
        raise NasError(f"{e}; {_resume_fix(run_dir)}") from None


def _check_args_yaml(run_dir: Path, saved: dict[str, Any]) -> None:
    """A resume continues with the checkpoint's settings and rewrites args.yaml from them; an args.yaml that no
    longer says the same (hand-edited to change the run, or damaged) would be silently overridden, so refuse it."""
    path = run_dir / "args.yaml"
    if not path.exists():  # only a record: rewritten below
        return
    fix = ("a resume keeps the settings it was started with (weights/last.pt); restore the file or delete it "
           "(it is rewritten from the checkpoint), or start a new run without --resume to change settings")
    try:
        args = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), None, f"unreadable ({type(e).__name__}{where}); {fix}") from None
    if not isinstance(args, dict):
        raise ConfigError(str(path), None, f"expected a mapping of settings, got {type(args).__name__}; {fix}")
    for k, v in saved.items():
        if k in ARGS_FREE or k == "arch":
            continue
        if k not in args:
            raise ConfigError(str(path), k, f"missing, the checkpoint has {v!r}; {fix}")
        if args[k] != v:
            raise ConfigError(str(path), k, f"{args[k]!r} differs from the checkpoint's {v!r}; {fix}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32  # set per worker by the DataLoader from its seeded generator
    np.random.seed(s)
    random.seed(s)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")  # temp file + rename: a kill mid-write must not truncate the history
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    tmp.replace(path)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for n, r in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            try:  # hand-edited or damaged: the history a resume extends, so say where
                missing = [c for c in ("epoch", "time") if r.get(c) is None]  # the columns a resume reads
                if missing:
                    raise ValueError(f"no {' or '.join(missing)} value")
                rows.append({k: (int(v) if k == "epoch" else float(v) if v != "" else float("nan"))
                             for k, v in r.items()})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}:{n}", None, f"unreadable row ({e}); restore the file, or delete it to "
                                                       "resume without the earlier epochs' rows") from None
    return rows


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def train(cfg: TrainConfig, on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train, evaluate each `val_interval` epochs on the EMA model, checkpoint, and return the best epoch's metrics.

    `on_epoch(epoch, metrics)` runs on rank 0 after each epoch's checkpoint (epoch counts from 1; metrics is the
    results.csv row); raising from it stops training and the exception propagates (e.g. optuna.TrialPruned).
    Under torchrun (RANK/WORLD_SIZE set) each process trains on its shard; only rank 0 evaluates and writes.
    """
    t_start = time.time()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    own_group = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        own_group = True
    writer = None
    threads = torch.get_num_threads()
    # first thing: the DataLoader workers forked below inherit it (freed batches stay in-process there too)
    retain_heap()
    try:
        if cfg.threads:  # process-wide, so restored below; 1 avoids OpenMP spin-waits on busy small machines
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device, local_rank, world)
        main = rank == 0
        show = cfg.progress and main

        # ---------------------------------------------------------------- run folder, resume
        ckpt = None
        if cfg.resume:
            name = cfg.name or (cfg.arch.name if cfg.arch is not None else None)
            if not name:
                raise ConfigError("train config", "name", "resume needs the run's name (runs/train/NAME)")
            run_dir = Path(cfg.project) / name
            if not (run_dir / "weights" / "last.pt").is_file():
                raise ConfigError(str(run_dir), None, "nothing to resume: weights/last.pt not found (check --project "
                                                      "and --name, or start without --resume)")
            ckpt = _resume_checkpoint(run_dir)
            known = {f.name for f in fields(TrainConfig)}
            saved = {k: v for k, v in ckpt["config"].items() if k in known}
            _check_args_yaml(run_dir, saved)
            runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
            cfg = TrainConfig(**{**saved, **runtime, "arch": loads_arch(ckpt["meta"]["arch_yaml"], str(run_dir)),
                                 "resume": True, "project": cfg.project, "name": run_dir.name})
            history = [r for r in _read_csv(run_dir / "results.csv") if r["epoch"] <= ckpt["epoch"]]
            if ckpt["epoch"] >= planned_epochs(cfg, [r["time"] for r in history]):
                budget = f" (time limit {cfg.time_limit_s:g} s)" if cfg.time_limit_s is not None else ""
                raise NasError(f"{run_dir}: already finished ({ckpt['epoch']} of at most {cfg.epochs} epochs{budget}); "
                               "nothing to resume")
        check_config(cfg)

        # ---------------------------------------------------------------- data
        # before the run folder: a bad data YAML or label set must not leave an empty PROJECT/NAME behind
        if cfg.data is None:
            if main:
                data_yaml = default_data(cfg, show)
            if world > 1:
                dist.barrier()
            if not main:
                data_yaml = default_data(cfg, False)
            cfg = replace(cfg, data=str(data_yaml))
        data = load_data_config(cfg.data)
        cfg = replace(cfg, data=str(Path(cfg.data).resolve()))  # a resumed run may start from another folder
        nc = data.nc
        train_ds = YoloDataset(data, "train", cfg.imgsz, augment=True, mosaic=cfg.mosaic, strict=cfg.strict,
                               seed=cfg.seed)
        # one sampler for 1 or N processes: the order is a pure function of (seed, epoch), so a resumed run repeats it
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        per_rank = max(cfg.batch // world, 1)
        # the CPUs this process may use (taskset, cgroups), not the machine's: more workers would only time-share
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cfg.workers, cpus)
        loader_gen = torch.Generator()
        loader = DataLoader(train_ds, per_rank, sampler=sampler, num_workers=workers, collate_fn=collate,
                            pin_memory=device.type == "cuda", worker_init_fn=_seed_worker, generator=loader_gen)
        val_loader = None
        if main:
            val_ds = YoloDataset(data, "val", cfg.imgsz, augment=False, strict=cfg.strict)
            val_loader = DataLoader(val_ds, per_rank, shuffle=False, num_workers=workers, collate_fn=collate,
                                    pin_memory=device.type == "cuda")

        # ---------------------------------------------------------------- run folder
        if not cfg.resume:
            name = cfg.name or cfg.arch.name
            project = Path(cfg.project)
            run_dir = _broadcast(project / name if cfg.exist_ok else _unique_dir(project, name), world)
            cfg = replace(cfg, name=run_dir.name)
        wdir = run_dir / "weights"
        if main:
            wdir.mkdir(parents=True, exist_ok=True)

        # ---------------------------------------------------------------- model, optimizer, EMA
        _seed_everything(cfg.seed)
        fmt = torch.channels_last if resolve_channels_last(cfg.channels_last, device) else torch.contiguous_format
        # converted before the EMA copy and the optimizer, so weights, EMA and momentum buffers share one layout
        model = Detector(cfg.arch, nc, neck=cfg.neck, width=cfg.width, depth=cfg.depth).to(device, memory_format=fmt)
        criterion = DetectionLoss(nc, model.strides, model.reg_max)
        lr0 = cfg.lr0 if cfg.lr0 is not None else (0.01 if cfg.optimizer == "sgd" else 0.001)
        optimizer = build_optimizer(model, cfg, lr0)
        lf = lr_lambda(cfg.schedule, cfg.epochs, cfg.lrf)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lf)
        amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
        start_epoch, best_fitness, best_epoch = 0, -1.0, 0
        if ckpt is None:
            history: list[dict[str, Any]] = []
        else:  # load_state_dict copies into the existing tensors, so the chosen layout stays
            try:  # loadable but edited or mismatched state fails here, as one line instead of a torch traceback
                model.load_state_dict(ckpt["model"])
                ema.module.load_state_dict(ckpt["ema"])
                ema.updates = ckpt["ema_updates"]
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                if ckpt.get("scaler"):
                    scaler.load_state_dict(ckpt["scaler"])
                set_rng_state(ckpt["rng"])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                raise NasError(f"{run_dir / 'weights' / 'last.pt'}: damaged nas checkpoint: cannot restore the "
                               f"training state ({detail}); {_resume_fix(run_dir)}") from None
            start_epoch, best_fitness, best_epoch = ckpt["epoch"], ckpt["best_fitness"], ckpt["best_epoch"]
        train_model: nn.Module = model
        if world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        if main:
            (run_dir / "args.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            save_arch(cfg.arch, run_dir / "arch.yaml")
            if cfg.tensorboard:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # slow import: only when used
                )

                writer = SummaryWriter(str(run_dir))

        # ---------------------------------------------------------------- loop
        nb = len(loader)
        nw = round(cfg.warmup_epochs * nb)  # warmup iterations
        bias_start = cfg.warmup_bias_lr if cfg.optimizer == "sgd" else 0.0
        final: dict[str, Any] = {}
        speed: dict[str, float] = {}
        stopped = False
        epochs = planned_epochs(cfg, [r["time"] for r in history])  # == cfg.epochs without a time limit
        if epochs != cfg.epochs:
            lf = _reschedule(scheduler, cfg, epochs)
        epoch = start_epoch
        while epoch < epochs:
            t_epoch = time.time()
            model.train()
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed + epoch)  # worker seeds
            train_ds.set_epoch(epoch)
            if epoch >= epochs - cfg.close_mosaic:
                train_ds.close_mosaic()
            mloss = torch.zeros(3)
            bar = tqdm(loader, total=nb, desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=True,
                       dynamic_ncols=True)
            for i, (imgs, targets, _) in enumerate(bar):
                ni = i + nb * epoch
                if ni <= nw and nw > 0:  # warmup: LR ramps to its scheduled value, momentum to its final value
                    for g in optimizer.param_groups:
                        start = bias_start if g["name"] == "bias" else 0.0
                        g["lr"] = float(np.interp(ni, [0, nw], [start, g["initial_lr"] * lf(epoch)]))
                        if "momentum" in g:
                            g["momentum"] = float(np.interp(ni, [0, nw], [cfg.warmup_momentum, cfg.momentum]))
                imgs = imgs.to(device, non_blocking=True, memory_format=fmt)
                with torch.autocast(device.type, enabled=amp):
                    preds = train_model(imgs)
                    loss, parts = criterion(preds, targets.to(device), cfg.imgsz)
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
                if world > 1:
                    dist.all_reduce(bad)  # every rank stops together
                if bad.item():
                    raise TrainingDiverged(
                        f"training diverged: the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}/{nb} "
                        f"(lr {optimizer.param_groups[2]['lr']:.3g}); try a lower --lr0, a longer warmup or "
                        "check the labels")
                # DDP averages gradients over ranks; the loss is per-rank-batch-summed, so scale back to the total
                scaler.scale(loss * world).backward()
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=cfg.clip_norm)
                # a finite loss can still give NaN gradients (e.g. sqrt at 0); stepping would make every weight NaN
                # and the run "finish" with mAP 0. With AMP the scaler skips such steps itself. DDP: gradients are
                # all-reduced, so every rank sees the same norm and stops together.
                if not amp and not torch.isfinite(grad_norm):
                    raise TrainingDiverged(
                        f"training diverged: the gradient norm became {grad_norm.item()} at epoch {epoch + 1}, "
                        f"step {i + 1}/{nb} (loss {loss.item():.4g}); try a lower --lr0 or check the labels")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
                mloss = (mloss * i + parts.float().cpu()) / (i + 1)
                if show:
                    bar.set_postfix({n.split("_")[0]: f"{v:.3f}" for n, v in zip(LOSS_NAMES, mloss.tolist())})
            bar.close()
            train_time = time.time() - t_epoch
            if cfg.time_limit_s is not None:  # re-plan before the LR step and the last-epoch evaluation use it
                n = 0
                if main:  # this epoch costs its training time plus the latest validation time
                    val_s = next((r["val_time"] for r in reversed(history) if r["val_time"] > 0), 0.0)
                    n = planned_epochs(cfg, [r["time"] for r in history] + [train_time + val_s])
                n = int(_broadcast(n, world))
                if n != epochs:
                    epochs, lf = n, _reschedule(scheduler, cfg, n)
            lrs = [g["lr"] for g in optimizer.param_groups]
            scheduler.step()

            # ------------------------------------------------------------ evaluate, log, checkpoint (rank 0)
            stop_exc: BaseException | None = None
            if main:
                last_epoch = epoch + 1 >= epochs
                metrics: dict[str, Any] = {}
                t_val = time.time()
                if (epoch + 1) % cfg.val_interval == 0 or last_epoch:
                    metrics = evaluate(ema.module, val_loader, device, num_classes=nc)
                    speed = metrics["speed"]
                val_time = time.time() - t_val
                fit = fitness(metrics)
                row = {"epoch": epoch + 1, **{f"train/{n}": v for n, v in zip(LOSS_NAMES, mloss.tolist())},
                       **{f"lr/pg{j}": lr for j, lr in enumerate(lrs)},
                       "map50": metrics.get("map50", float("nan")), "map50_95": metrics.get("map50_95", float("nan")),
                       "fitness": fit if metrics else float("nan"), "time": train_time + val_time,
                       "val_time": val_time}
                history.append(row)
                _write_csv(run_dir / "results.csv", history)
                if writer is not None:
                    for k, v in row.items():
                        if k != "epoch" and math.isfinite(v):
                            writer.add_scalar(TB_TAGS.get(k, k), v, epoch + 1)
                    writer.flush()
                improved = bool(metrics) and fit > best_fitness
                if improved:
                    best_fitness, best_epoch = fit, epoch + 1
                ckpt_out = {
                    "epoch": epoch + 1, "best_fitness": best_fitness, "best_epoch": best_epoch,
                    "model": _contiguous(model.state_dict()), "ema": _contiguous(ema.module.state_dict()),
                    "ema_updates": ema.updates,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if amp else None, "rng": rng_state(),
                    "config": cfg.to_dict(), "meta": model_meta(model, data.names),
                    "metrics": dict(row), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
                }
                save_checkpoint(ckpt_out, wdir / "last.pt")
                if improved:
                    save_checkpoint(ckpt_out, wdir / "best.pt")
                final = row
                if on_epoch is not None:
                    try:
                        on_epoch(epoch + 1, row)
                    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                        stop_exc = e
            if world > 1:
                flag = torch.tensor(float(stop_exc is not None), device=device)
                dist.broadcast(flag, 0)
                stopped = bool(flag.item())
            if stop_exc is not None:
                raise stop_exc
            if stopped:
                break
            epoch += 1

        summary = None
        if main:
            best_row = next((r for r in history if r["epoch"] == best_epoch), {})
            summary = {"epochs": final.get("epoch", start_epoch), "best_epoch": best_epoch,
                       "map50": best_row.get("map50", float("nan")), "map50_95": best_row.get("map50_95", float("nan")),
                       "fitness": max(best_fitness, 0.0), "final": final, "history": history, "speed": speed}
        summary = _broadcast(summary, world)
        return TrainResult(run_dir=run_dir, best=wdir / "best.pt", last=wdir / "last.pt",
                           seconds=time.time() - t_start, stopped=stopped, **summary)
    finally:
        torch.set_num_threads(threads)
        if writer is not None:
            writer.close()
        if own_group:
            dist.destroy_process_group()
