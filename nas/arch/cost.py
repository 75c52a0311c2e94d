"""Parameters and multiply-adds of an architecture, per block and in total.

MACs follow the papers' convention: conv and linear layers (SE convs included) plus attention matmuls;
BN, activations, pooling and additions are not counted. Counting runs on the meta device: no memory, no compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas.arch.spec import ArchSpec


@dataclass(frozen=True)
class BlockCost:
    name: str           # "stem", "<stage>.<index>" or "head"
    params: int
    macs: int
    out_shape: tuple[int, ...]   # C, H, W after the block


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    blocks: tuple[BlockCost, ...]


def count_params(module: nn.Module) -> int:
    """Trainable and frozen parameters; BN running statistics are buffers and not counted."""
    return sum(p.numel() for p in module.parameters())


def macs_and_output(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as fc:
        y = module(x)
    return fc.get_total_flops() // 2, y


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass at `input_shape` (C, H, W), batch 1, counted on the meta device."""
    module = module.to("meta").eval()
    return macs_and_output(module, torch.empty(1, *input_shape, device="meta"))[0]


def arch_cost(arch: ArchSpec, resolution: int | None = None, classifier: bool = False) -> Cost:
    """Per-block params and MACs of `arch` at `resolution` (default: the arch's own)."""
    from nas.arch.backbone import build_backbone

    res = resolution or arch.resolution
    with torch.device("meta"):
        net = build_backbone(arch, classifier=classifier).eval()
    x = torch.empty(1, arch.channels, res, res, device="meta")
    rows = []
    macs, x = macs_and_output(net.stem, x)
    rows.append(BlockCost("stem", count_params(net.stem), macs, tuple(x.shape[1:])))
    for st, stage in zip(arch.stages, net.stages):
        for i, block in enumerate(stage):
            macs, x = macs_and_output(block, x)
            rows.append(BlockCost(f"{st.name}.{i}", count_params(block), macs, tuple(x.shape[1:])))
    if net.head is not None:
        macs, x = macs_and_output(net.head, x)
        rows.append(BlockCost("head", count_params(net.head), macs, tuple(x.shape[1:])))
    return Cost(sum(r.params for r in rows), sum(r.macs for r in rows), tuple(rows))
