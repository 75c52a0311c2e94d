"""What a training run depends on (TrainConfig, checked by check_config) and what it returns (TrainResult)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from nas.arch.detector import check_detector
from nas.arch.headconfig import HeadConfig
from nas.arch.spec import ArchSpec
from nas.detect.augment import AugmentConfig
from nas.errors import ConfigError

# may change when a run is resumed (they change speed or checking, not what is learned)
RUNTIME_FIELDS = ("device", "workers", "threads", "progress", "tensorboard", "channels_last", "strict", "retain_heap")
# the head's fields as flat keys in args.yaml and checkpoints (as before `head` existed); classes come from the data
HEAD_KEYS = tuple(f.name for f in fields(HeadConfig) if f.name != "num_classes")
HYP_KEYS = tuple(f.name for f in fields(AugmentConfig))  # augmentation strengths, flat too (ultralytics' names)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults follow ultralytics where it has one.

    CPU fast path: on CPU the model and batches run in channels-last memory format (`channels_last` None = auto: on
    for CPU, off for CUDA, where it pays off mainly with AMP on tensor cores; set True to try it), and `nas train`
    also retains the heap (`retain_heap`); docs/BENCHMARKS.md has the measurements (benchmarks/train_step.py).
    Checkpoints hold standard contiguous tensors whatever the layout used in training.
    """
    arch: ArchSpec | None = None  # None only with resume=True (the checkpoint has it)
    data: str | None = None       # data YAML; None = DigitsDet generated into the user cache
    epochs: int = 10
    imgsz: int = 320              # a multiple of 32
    batch: int = 16               # total over all DDP processes
    device: str = "cpu"
    workers: int = 2
    head: HeadConfig = field(default_factory=HeadConfig)  # neck, width, depth, ...; num_classes is the data's
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
    # flips, HSV, affine: fliplr 0 for handed objects (text, digits, road signs), whose mirror image is another class
    hyp: AugmentConfig = field(default_factory=AugmentConfig)
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
    # keep freed memory in the process (nas.system.retain_heap): fewer page faults, but process-wide and permanent
    retain_heap: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: arch by name (its YAML is stored separately), the head as flat keys."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "head":
                d.update({k: getattr(self.head, k) for k in HEAD_KEYS})
            elif f.name == "hyp":
                d.update({k: getattr(self.hyp, k) for k in HYP_KEYS})
            elif f.name != "arch":
                d[f.name] = getattr(self, f.name)
        d["arch"] = self.arch.name if self.arch is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **given: Any) -> TrainConfig:
        """A config from `to_dict`'s keys (unknown keys ignored, e.g. `arch`), overridden by `given`."""
        known = {f.name for f in fields(cls)} - {"arch", "head", "hyp"}
        kw = {k: v for k, v in d.items() if k in known}
        head = HeadConfig(**{k: d[k] for k in HEAD_KEYS if k in d})
        hyp = AugmentConfig(**{k: d[k] for k in HYP_KEYS if k in d})  # runs from before: the defaults they used
        return cls(**{**kw, "head": head, "hyp": hyp, **given})


@dataclass(frozen=True)
class Recipe:
    """What a training trains when it is not one Detector (nas.detect.supernet: the weight-sharing supernet). The
    model must carry what a Detector carries for the loss and checkpoints: arch, head_config, strides, reg_max."""
    build: Callable[[TrainConfig, int], Any]     # (config, number of classes) -> model
    loss: Callable[..., tuple[Any, Any]]         # (model, criterion, imgs, targets, imgsz) -> (loss, box/cls/dfl parts)
    validate: Callable[[Any, Any], dict[str, Any]]  # (EMA model, the run) -> evaluate()'s metrics
    meta: dict[str, Any] = field(default_factory=dict)  # merged into every checkpoint's meta


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
    if isinstance(cfg.mosaic, bool) or not isinstance(cfg.mosaic, (int, float)) or not 0 <= cfg.mosaic <= 1:
        raise ConfigError(src, "mosaic", f"must be a probability in [0, 1], got {cfg.mosaic!r}")
    if not isinstance(cfg.hyp, AugmentConfig):
        raise ConfigError(src, "hyp", f"must be an AugmentConfig, got {type(cfg.hyp).__name__}")
    AugmentConfig.from_mapping({k: getattr(cfg.hyp, k) for k in HYP_KEYS}, src)  # the bounds, named per field
    if cfg.workers < 0 or cfg.close_mosaic < 0 or cfg.warmup_epochs < 0:
        raise ConfigError(src, "workers/close_mosaic/warmup_epochs", "must not be negative")
    limit = cfg.time_limit_s
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not 0 < limit < math.inf):
        raise ConfigError(src, "time_limit_s", f"must be a positive number of seconds, got {limit!r}")
    for k in ("strict", "retain_heap"):
        if not isinstance(getattr(cfg, k), bool):
            raise ConfigError(src, k, f"must be true or false, got {getattr(cfg, k)!r}")
    if cfg.channels_last is not None and not isinstance(cfg.channels_last, bool):
        raise ConfigError(src, "channels_last", f"must be true, false or null (auto), got {cfg.channels_last!r}")
    check_detector(cfg.arch, cfg.head)
