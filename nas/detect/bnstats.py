"""BatchNorm recalibration: a subnet cut out of a supernet inherits statistics that mix every subnet the supernet
ran, so before it is scored its running mean and variance are measured again on a few training images."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from nas.detect.data import DataConfig, YoloDataset, collate


def calibration_loader(data: DataConfig | str, imgsz: int, images: int, batch: int) -> DataLoader:
    """The first `images` training images, letterboxed like the validation images (no augmentation), in order."""
    ds = YoloDataset(data, "train", imgsz, augment=False)
    return DataLoader(Subset(ds, range(min(images, len(ds)))), batch_size=max(1, batch), shuffle=False,
                      num_workers=0, collate_fn=collate)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> int:
    """Reset every BatchNorm's running statistics and average them over `loader`'s images (train-mode forward
    passes without gradients, momentum None: a cumulative average, each batch weighing alike). Parameters stay
    bit-identical; the model comes back in the mode it was in. Returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta, was_training = [bn.momentum for bn in bns], model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    seen = 0
    model.train()
    try:
        for batch in loader:
            imgs = batch[0].to(device)
            model(imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs)
            seen += len(imgs)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return seen
