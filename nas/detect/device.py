"""Where training runs: the device of this process (one GPU per torchrun rank), the memory format, and rank 0's
values shared with the other ranks."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nas.errors import ConfigError


def resolve_channels_last(setting: bool | None, device: torch.device) -> bool:
    """TrainConfig.channels_last: None means on for CPU (oneDNN's convolutions run NHWC natively, so NCHW pays
    reorders around them: 15-25% of a training step here) and off elsewhere."""
    return device.type == "cpu" if setting is None else setting


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


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's `obj` on every rank (a no-op in a single process)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]
