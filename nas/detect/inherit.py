"""Subnets with weights inherited from a trained supernet run: its val mAP after BatchNorm recalibration (the
search's `supernet` evaluator) and the subnet saved as a `nas train` checkpoint (`nas supernet extract`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from nas.arch.elastic import Supernet
from nas.arch.spec import ArchSpec, dumps_arch
from nas.detect.bnstats import calibration_loader, recalibrate_bn
from nas.detect.checkpoint import load_checkpoint, model_meta, save_checkpoint
from nas.detect.data import YoloDataset, collate, load_data_config
from nas.detect.evaluate import evaluate
from nas.detect.supernet import supernet_from_meta
from nas.errors import NasError
from nas.system import write_atomically


@dataclass
class TrainedSupernet:
    """A supernet run's EMA weights (eval mode) and what scoring a subnet needs: its data, image size, batch."""
    run: Path
    model: Supernet
    config: dict[str, Any]         # the run's TrainConfig as saved (flat)
    names: list[str]
    epoch: int
    device: torch.device
    loaders: dict[tuple[str, int], DataLoader] = field(default_factory=dict)

    @property
    def imgsz(self) -> int:
        return int(self.config["imgsz"])

    def loader(self, split: str, images: int = 0) -> DataLoader:
        """The validation loader, or ("train", N) the calibration loader of the first N training images; made once."""
        key = (split, images)
        if key not in self.loaders:
            data, batch = load_data_config(self.config["data"]), int(self.config["batch"])
            self.loaders[key] = (calibration_loader(data, self.imgsz, images, batch) if split == "train" else
                                 DataLoader(YoloDataset(data, "val", self.imgsz), batch, shuffle=False, num_workers=0,
                                            collate_fn=collate))
        return self.loaders[key]


def load_supernet(run: str | Path, device: str = "cpu") -> TrainedSupernet:
    """RUN/weights/last.pt of `nas supernet train` (weights_only), with its EMA weights."""
    run = Path(run)
    path = run / "weights" / "last.pt"
    if not path.is_file():
        raise NasError(f"{run}: no trained supernet here (weights/last.pt not found); train one with "
                       "`nas supernet train EXPERIMENT`, or point evaluator.run at its folder")
    ckpt = load_checkpoint(path)
    model = supernet_from_meta(ckpt["meta"], str(path))
    try:
        model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    except RuntimeError as e:
        raise NasError(f"{path}: damaged supernet checkpoint ({str(e).splitlines()[0][:200]})") from None
    dev = torch.device(device)
    return TrainedSupernet(run, model.to(dev).eval(), dict(ckpt["config"]), list(ckpt["meta"].get("names", [])),
                           int(ckpt.get("epoch", 0)), dev)


def inherited_subnet(sn: TrainedSupernet, arch: ArchSpec, calib_images: int) -> torch.nn.Module:
    """`arch` as a plain Detector with the supernet's weights, BatchNorm recalibrated on `calib_images` training
    images (0: the supernet's own, mixed statistics)."""
    model = sn.model.extract(arch).to(sn.device)
    if calib_images > 0:
        recalibrate_bn(model, sn.loader("train", calib_images), sn.device)
    return model.eval()


def inherited_map(sn: TrainedSupernet, arch: ArchSpec, calib_images: int = 256) -> dict[str, Any]:
    """Val mAP of `arch` with inherited weights, at the supernet's training image size (whatever arch.resolution
    says), and the seconds it took."""
    t0 = time.perf_counter()
    model = inherited_subnet(sn, arch, calib_images)
    m = evaluate(model, sn.loader("val"), sn.device, num_classes=model.head_config.num_classes)
    return {"map50": m["map50"], "map50_95": m["map50_95"], "imgsz": sn.imgsz, "calib_images": calib_images,
            "supernet_epoch": sn.epoch, "eval_s": round(time.perf_counter() - t0, 2)}


def save_subnet(sn: TrainedSupernet, arch: ArchSpec, out: str | Path, calib_images: int = 256) -> dict[str, Any]:
    """Write out/arch.yaml and out/weights/best.pt: `arch` with inherited, recalibrated weights as a `nas train`
    checkpoint (nas.detect.checkpoint.load_detector reads it), its val mAP in the checkpoint's metrics."""
    out = Path(out)
    model = inherited_subnet(sn, arch, calib_images)
    m = evaluate(model, sn.loader("val"), sn.device, num_classes=model.head_config.num_classes)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metrics = {"map50": m["map50"], "map50_95": m["map50_95"]}
    config = {**sn.config, "arch": arch.name, "resume": False, "name": out.name, "project": str(out.parent)}
    ckpt = {"epoch": 0, "best_fitness": 0.1 * m["map50"] + 0.9 * m["map50_95"], "best_epoch": 0, "model": state,
            "ema": state, "config": config, "meta": model_meta(model, sn.names), "metrics": metrics,
            "supernet": {"run": str(sn.run.resolve()), "epoch": sn.epoch, "calib_images": calib_images},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": str(torch.__version__)}
    fix = "free space and extract again"
    write_atomically(out / "arch.yaml", dumps_arch(replace(arch, info={**arch.info, "supernet": str(sn.run)})),
                     "writing arch.yaml", fix)
    weights = save_checkpoint(ckpt, out / "weights" / "best.pt", fix)
    return {"weights": str(weights), "arch": str(out / "arch.yaml"), **metrics, "imgsz": sn.imgsz,
            "params": sum(p.numel() for p in model.parameters())}
