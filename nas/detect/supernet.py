"""Training the weight-sharing supernet of a search space (nas.arch.elastic) with the sandwich rule: each step runs
the largest subnet on the detection loss, and the smallest and random subnets on in-place distillation from the
largest's head outputs; one backward pass, one optimizer step. The loop, checkpoints, resume, EMA, progress and
TensorBoard are nas.detect.train's (a Recipe swaps the model, the loss and the evaluation)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nas.arch.elastic import SlotSpec, Supernet, SupernetSpec
from nas.arch.spec import UIB_OPS, ArchSpec, BlockSpec, make_divisible
from nas.config import parse_yaml
from nas.detect.bnstats import calibration_loader, recalibrate_bn
from nas.detect.checkpoint import load_checkpoint
from nas.detect.evaluate import evaluate
from nas.detect.train import train
from nas.detect.trainconfig import Recipe, TrainConfig, TrainResult
from nas.errors import ConfigError, NasError
from nas.space import Chooser, SearchSpace, space_from_dict

log = logging.getLogger("nas.supernet")

# op preference of the sandwich's two ends: the largest runs every shared UIB weight (both depthwise convs), the
# smallest the fewest (FFN has no depthwise conv; ConvNext's runs at the narrow input width)
LARGEST_OPS = ("extra_dw", "ib", "fused_ib", "convnext", "ffn")
SMALLEST_OPS = ("ffn", "convnext", "ib", "fused_ib", "extra_dw")
CLS_GAIN, DFL_GAIN = 0.5, 1.5  # the detection loss's class and DFL gains, so distillation weighs like it


def supernet_spec(space: SearchSpace, channels: int = 3) -> SupernetSpec:
    """The largest shapes each block position of `space` must hold (over ops, input widths and expansions)."""
    stages, cins = [], space.stem_out
    for st in space.stages:
        slots = []
        for i in range(max(st.depth)):
            ins = cins if i == 0 else st.out
            ops = set(st.block_ops(i))
            if not space.per_block and i == 0 and len(ops) < len(st.ops):
                ops.add("ib")  # a per-stage draw of ffn becomes ib in a striding first block (SearchSpace.sample)
            mids = [BlockSpec("ib", out=8, expand=e).mid(c) for c in ins for e in st.expand]
            se = max(make_divisible(m * space.se_ratio) for m in mids) if True in st.se else 0
            uib, fused = bool(ops & set(UIB_OPS)), "fused_ib" in ops
            slots.append(SlotSpec(
                cin=max(ins), out=max(st.out), stride=st.stride if i == 0 else 1, kernel=max(st.kernels),
                mid=max(mids) if uib else 0, se=se if uib else 0,
                start=bool(ops & {"convnext", "extra_dw"}), middle=bool(ops & {"ib", "extra_dw"}),
                fused_mid=max(mids) if fused else 0, fused_se=se if fused else 0))
        stages.append((st.name, tuple(slots)))
        cins = st.out
    return SupernetSpec(channels=channels, stem_out=max(space.stem_out), stages=tuple(stages),
                        features=space.features)


def extreme_chooser(largest: bool) -> Chooser:
    """Every choice at its largest (or smallest): depth, widths, kernels, expansion, SE; activations the first."""
    ops = LARGEST_OPS if largest else SMALLEST_OPS

    def choose(name: str, choices):
        field = name.rsplit(".", 1)[-1]
        if field == "op":
            return next(o for o in ops if o in choices)
        if field == "act":
            return choices[0]
        return max(choices) if largest else min(choices)
    return choose


def torch_chooser() -> Chooser:
    """Uniform draws from torch's global generator: a checkpoint's RNG state makes a resumed run draw the same."""
    return lambda name, choices: choices[int(torch.randint(len(choices), ()))]


def largest_arch(space: SearchSpace) -> ArchSpec:
    return space.sample(extreme_chooser(True), f"{space.name}-largest")


def smallest_arch(space: SearchSpace) -> ArchSpec:
    return space.sample(extreme_chooser(False), f"{space.name}-smallest")


def distill_loss(student: list[Tensor], teacher: list[Tensor], nc: int, reg_max: int) -> Tensor:
    """In-place distillation of the head outputs (per anchor): class logits to the teacher's probabilities (BCE),
    box side distributions to the teacher's (KL), both weighted by the teacher's confidence, per image."""
    s = torch.cat([p.flatten(2) for p in student], 2)  # B, 4*reg_max + nc, anchors
    t = torch.cat([p.flatten(2) for p in teacher], 2).detach()
    (box_s, cls_s), (box_t, cls_t) = s.split((4 * reg_max, nc), 1), t.split((4 * reg_max, nc), 1)
    p_t = cls_t.sigmoid()
    w = p_t.amax(1)                                    # B, anchors: where the teacher sees an object
    norm = w.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(cls_s, p_t, reduction="none").sum() / norm
    b, _, a = box_s.shape
    ls, lt = box_s.view(b, 4, reg_max, a).log_softmax(2), box_t.view(b, 4, reg_max, a).log_softmax(2)
    kl = (lt.exp() * (lt - ls)).sum(2).mean(1)         # B, anchors
    return (CLS_GAIN * cls + DFL_GAIN * (kl * w).sum() / norm) * b


def sandwich_loss(space: SearchSpace, n_random: int = 2) -> Callable[..., tuple[Tensor, Tensor]]:
    """The step's loss: the largest subnet's detection loss plus the distillation loss of the smallest and
    `n_random` random subnets; the parts (box, cls, dfl) are the largest's."""
    big, small = largest_arch(space), smallest_arch(space)

    def loss(model: Supernet, criterion, imgs: Tensor, targets: Tensor, imgsz: int) -> tuple[Tensor, Tensor]:
        preds = model(imgs, big)
        total, parts = criterion(preds, targets, imgsz)
        nc, reg_max = model.head_config.num_classes, model.reg_max
        for arch in (small, *(space.sample(torch_chooser()) for _ in range(n_random))):
            total = total + distill_loss(model(imgs, arch), preds, nc, reg_max)
        return total, parts
    return loss


def largest_validator(calib_images: int) -> Callable[[Supernet, Any], dict[str, Any]]:
    """An epoch's evaluation: the largest subnet extracted from the EMA weights, BatchNorm recalibrated on the
    first `calib_images` training images, scored on the validation set (results.csv's mAP is the largest's)."""
    loaders: dict[str, Any] = {}

    def validate(model: Supernet, r) -> dict[str, Any]:
        if "calib" not in loaders:
            loaders["calib"] = calibration_loader(r.data, r.cfg.imgsz, calib_images, r.val_loader.batch_size)
        subnet = model.extract(model.arch).to(r.device)
        recalibrate_bn(subnet, loaders["calib"], r.device)
        return evaluate(subnet, r.val_loader, r.device, num_classes=r.data.nc)
    return validate


def supernet_recipe(space: SearchSpace, space_text: str, n_random: int = 2, calib_images: int = 256) -> Recipe:
    spec, big = supernet_spec(space), largest_arch(space)
    return Recipe(build=lambda cfg, nc: Supernet(spec, big, replace(cfg.head, num_classes=nc)),
                  loss=sandwich_loss(space, n_random), validate=largest_validator(calib_images),
                  meta={"supernet_space": space_text, "supernet_random": n_random})


def supernet_from_meta(meta: dict[str, Any], source: str) -> Supernet:
    """The Supernet a checkpoint's meta describes (its space text and head), untrained."""
    from nas.arch.headconfig import HeadConfig

    if not isinstance(meta.get("supernet_space"), str):
        raise NasError(f"{source}: not a supernet checkpoint (no supernet_space in its meta); "
                       "train one with `nas supernet train EXPERIMENT`")
    space = space_from_dict(parse_yaml(meta["supernet_space"], source), f"{source} (space)")
    head = HeadConfig(neck=meta["neck"], width=meta["width"], depth=meta["depth"], num_classes=meta["num_classes"],
                      reg_max=meta["reg_max"], act=meta.get("act", "silu"))
    return Supernet(supernet_spec(space), largest_arch(space), head)


def _check_same_space(run: Path, space_text: str) -> None:
    """A resume must train the space it started with: another space's shapes would not load, or mean other weights."""
    meta = load_checkpoint(run / "weights" / "last.pt")["meta"]
    saved = meta.get("supernet_space")
    if not isinstance(saved, str) or parse_yaml(saved, str(run)) != parse_yaml(space_text, "space"):
        raise ConfigError(str(run), "space", "this supernet run was trained on another search space; train into "
                                             "another run folder (evaluator.run), or use the space it was started with")


def train_supernet(space_path: str | Path, cfg: TrainConfig, *, n_random: int = 2, calib_images: int = 256,
                   on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the supernet of the space in `space_path` into cfg.project/cfg.name with cfg's schedule; a run folder
    with weights/last.pt is resumed (same settings, same space). cfg.arch is set to the space's largest subnet (what
    args.yaml, arch.yaml and results.csv's mAP describe). One process: torchrun is refused."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NasError("supernet training runs in one process: start it without torchrun")
    text = Path(space_path).read_text()
    space = space_from_dict(parse_yaml(text, str(space_path)), str(space_path))
    run = Path(cfg.project) / (cfg.name or "supernet")
    cfg = replace(cfg, arch=largest_arch(space), name=run.name, exist_ok=True)
    if (run / "weights" / "last.pt").is_file():
        _check_same_space(run, text)
        cfg = replace(cfg, resume=True)
        log.info("%s: resuming the supernet training after its last saved epoch", run)
    return train(cfg, on_epoch, recipe=supernet_recipe(space, text, n_random, calib_images))
