"""The one short training: a few epochs at a low resolution on a small DigitsDet, used to rank candidates cheaply
(the search's `kind: train` evaluator, and the rerank of a search's best before their long trainings)."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nas.arch.spec import dumps_arch
from nas.system import exclusive_lock

if TYPE_CHECKING:
    from nas.arch.spec import ArchSpec
    from nas.detect.trainconfig import TrainConfig


@dataclass(frozen=True)
class ShortSchedule:
    """The one short training used to rank candidates (and by benchmarks/proxy_quality.py as its target)."""
    epochs: int = 4
    imgsz: int = 128
    batch: int = 8
    optimizer: str = "adamw"      # learns much faster than SGD in a few epochs (SGD at 160 px: mAP 0 after one)
    lr0: float | None = None      # None: the trainer's default for the optimizer
    neck: str = "dw"
    # A candidate's score is its mean mAP over these training seeds (each seed: the same data order and
    # augmentations for every candidate); one seed is too noisy to order the top few (docs/BENCHMARKS.md,
    # benchmarks/rerank_noise.py).
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str | None = None       # a data YAML; None: DigitsDet of the sizes below, generated once
    train_images: int = 500
    val_images: int = 150
    data_seed: int = 0
    val_interval: int | None = None  # evaluate every N epochs (1: a pruner sees each one); None: after the last only
    threads: int = 1              # torch threads per training (changes speed, not what is learned)

    def dataset(self, root: Path, name: str | None = None) -> str:
        """The data YAML: `data`, or DigitsDet generated into root/name (default digits_<train>_<val>_<imgsz>), reused
        when complete; several processes may ask at once: the first generates under a lock, the others then wait."""
        if self.data is not None:
            return self.data
        from nas.detect.digits import digit_sizes, ensure_digits

        name = name or f"digits_{self.train_images}_{self.val_images}_{self.imgsz}"
        lo, hi = digit_sizes(self.imgsz)
        with exclusive_lock(root / f"{name}.lock"):
            return str(ensure_digits(root / name, self.train_images, self.val_images, self.imgsz, self.data_seed,
                                     min_size=lo, max_size=hi, progress=False, workers=0))

    def train_config(self, arch: ArchSpec, data: str, project: Path, name: str, seed: int,
                     **overrides: Any) -> TrainConfig:
        from nas.arch.headconfig import HeadConfig
        from nas.detect.trainconfig import TrainConfig

        cfg = TrainConfig(
            arch=arch, data=data, epochs=self.epochs, imgsz=self.imgsz, batch=self.batch,
            head=HeadConfig(neck=self.neck), optimizer=self.optimizer, lr0=self.lr0, seed=seed,
            # warm up for at most a third of the run, else a 4-epoch run never reaches its peak LR
            warmup_epochs=min(TrainConfig.warmup_epochs, self.epochs / 3),
            val_interval=self.val_interval or self.epochs,
            project=str(project), name=name, exist_ok=True,  # a killed candidate restarts from scratch
            workers=0, threads=self.threads, progress=False, tensorboard=False)
        return replace(cfg, **overrides)


def short_train(arch: ArchSpec, schedule: ShortSchedule, data: str, out: Path, seed: int, *,
                on_epoch: Callable[[int, dict[str, Any]], None] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train `arch` once with `schedule` and `seed` into out/ and return the best epoch's mAPs, the cost, the best
    epoch and its weights; `on_epoch` goes to `train` (raising from it stops the training). out/short.json records
    a finished one, reused while the arch, schedule and seed are the same."""
    from nas.detect.train import train

    marker = out / "short.json"
    # the other seeds and the threads do not change this training
    key = {**asdict(schedule), "seeds": None, "threads": None, "seed": seed, "arch": dumps_arch(arch)}
    try:
        prev = json.loads(marker.read_text())
        if prev.get("schedule") == key:
            return prev["result"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    c0 = time.process_time()
    r = train(schedule.train_config(arch, data, out.parent, out.name, seed, **overrides), on_epoch=on_epoch)
    result = {"map50_95": r.map50_95, "map50": r.map50, "train_s": round(r.seconds, 2),
              "train_cpu_s": round(time.process_time() - c0, 1), "best_epoch": r.best_epoch,
              "weights": str(r.best.resolve())}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schedule": key, "result": result}, indent=2) + "\n")
    tmp.replace(marker)  # atomic: a kill leaves the old marker or none
    return result


def short_score(arch: ArchSpec, schedule: ShortSchedule, data: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """`short_train` for every seed of the schedule into out/seed<N>: mean mAPs, total cost, per-seed mAP50-95."""
    runs = [short_train(arch, schedule, data, out / f"seed{s}", s, **overrides) for s in schedule.seeds]
    return {"map50_95": statistics.fmean(r["map50_95"] for r in runs),
            "map50": statistics.fmean(r["map50"] for r in runs),
            "train_s": round(sum(r["train_s"] for r in runs), 1),
            "train_cpu_s": round(sum(r["train_cpu_s"] for r in runs), 1),
            "per_seed": [r["map50_95"] for r in runs]}
