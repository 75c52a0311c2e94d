"""The search's `supernet` evaluator: a candidate's val mAP with weights inherited from a trained supernet (BatchNorm
recalibrated on a few hundred training images), cached per architecture; and where an experiment's supernet lives
and how `nas supernet train` trains it."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.arch.spec import ArchSpec, dumps_arch
from nas.errors import ConfigError
from nas.system import write_atomically

if TYPE_CHECKING:
    from nas.detect.trainconfig import TrainConfig
    from nas.search.experiment import Experiment
    from nas.space import SearchSpace

log = logging.getLogger("nas.inherited")


def supernet_run(exp: Experiment) -> Path:
    """The supernet's run folder: evaluator.run, or <output>/<name>/supernet."""
    return Path(exp.evaluator.run) if exp.evaluator.run else exp.run_dir / "supernet"


def supernet_config(exp: Experiment, **overrides: Any) -> TrainConfig:
    """The supernet training of an experiment: the evaluator's image size, batch, neck, data (DigitsDet of its
    train/val sizes generated into the run folder, as the `train` evaluator's) and epochs; AdamW (as the short
    training: SGD learns too little in a few epochs); into supernet_run(exp). `overrides` replace any field."""
    from nas.arch.headconfig import HeadConfig
    from nas.detect.short import ShortSchedule
    from nas.detect.trainconfig import TrainConfig

    ev, run = exp.evaluator, supernet_run(exp)
    epochs = overrides.get("epochs") or ev.epochs
    data = overrides.pop("data", None) or ShortSchedule(
        imgsz=ev.imgsz, data=ev.data, train_images=ev.train_images, val_images=ev.val_images,
        data_seed=exp.seed).dataset(exp.run_dir, "digits")
    cfg = TrainConfig(data=data, epochs=epochs, imgsz=ev.imgsz, batch=ev.train_batch, device=exp.device,
                      head=HeadConfig(neck=ev.neck), optimizer="adamw", seed=exp.seed,
                      warmup_epochs=min(TrainConfig.warmup_epochs, epochs / 3), project=str(run.parent), name=run.name,
                      exist_ok=True)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


class SupernetEvaluator:
    """Scores an architecture by its inherited val mAP50-95. The supernet loads once per worker, on first use; scores
    are kept per architecture (and supernet checkpoint, and calibration size) in RUN/supernet_scores/, so resumed
    searches and other workers reuse them."""

    def __init__(self, exp: Experiment, space: SearchSpace):
        self.exp, self.space, self.run = exp, space, supernet_run(exp)
        self.weights = self.run / "weights" / "last.pt"
        if not self.weights.is_file():
            raise ConfigError(exp.source, "evaluator.run", f"no trained supernet in {self.run} (weights/last.pt not "
                                                           "found); train it first: nas supernet train "
                                                           f"{exp.source.split(' + ')[0]}")
        self.cache_dir = exp.run_dir / "supernet_scores"
        self._supernet = None

    def _key(self, arch: ArchSpec) -> str:
        st = self.weights.stat()
        # the score does not depend on the name or on arch.resolution (it is measured at the supernet's image size)
        text = dumps_arch(replace(arch, name="-", info={}, resolution=32))
        ident = f"{text}|{self.weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.exp.evaluator.calib_images}"
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def supernet(self):
        if self._supernet is None:
            from nas.arch.elastic import ArchDoesNotFit, check_fits
            from nas.detect.inherit import load_supernet
            from nas.detect.supernet import largest_arch, smallest_arch

            sn = load_supernet(self.run, self.exp.device)
            for arch in (largest_arch(self.space), smallest_arch(self.space)):  # else every trial fails alike
                try:
                    check_fits(sn.model.spec, arch)
                except ArchDoesNotFit as e:
                    raise ConfigError(self.exp.source, "evaluator.run", f"the supernet in {self.run} does not cover "
                                                                        f"the space {self.exp.space}: {e}") from None
            self._supernet = sn
        return self._supernet

    def __call__(self, arch: ArchSpec) -> tuple[float, dict[str, Any]]:
        from nas.detect.inherit import inherited_map

        path = self.cache_dir / f"{self._key(arch)}.json"
        try:
            r = json.loads(path.read_text())
            return r["map50_95"], {**r, "cached": True}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        r = inherited_map(self.supernet(), arch, self.exp.evaluator.calib_images)
        write_atomically(path, json.dumps(r) + "\n", "caching a supernet score", "free space and resume the search")
        log.debug("%s: inherited mAP50-95 %.4f in %.2f s", arch.name, r["map50_95"], r["eval_s"])
        return r["map50_95"], {**r, "cached": False}
