"""Backbone nn.Module built from an ArchSpec: returns the feature maps of the stages named in `features`,
or class logits when built with the ImageNet-style classifier head (for zoo checks)."""
from __future__ import annotations

import torch
from torch import nn

from nas.arch.blocks import ConvBN, build_block, make_act
from nas.arch.spec import ArchSpec, HeadSpec


class ClassifierHead(nn.Module):
    """[1x1 conv + BN + act] -> global pool -> [1x1 hidden (+BN or bias) + act] -> dropout -> linear."""

    def __init__(self, cin: int, head: HeadSpec):
        super().__init__()
        self.conv = ConvBN(cin, head.conv, 1, act=head.act) if head.conv else nn.Identity()
        width = head.conv or cin
        if head.hidden:
            layers = [nn.Conv2d(width, head.hidden, 1, bias=not head.hidden_norm)]
            if head.hidden_norm:
                layers.append(nn.BatchNorm2d(head.hidden))
            self.hidden = nn.Sequential(*layers, make_act(head.act))
            width = head.hidden
        else:
            self.hidden = nn.Identity()
        self.dropout = nn.Dropout(head.dropout)
        self.fc = nn.Linear(width, head.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3), keepdim=True)
        return self.fc(self.dropout(self.hidden(x).flatten(1)))


class Backbone(nn.Module):
    """Stem + stages. `forward` returns [feature map of each stage in arch.features] (or logits with a head).

    Without the classifier, stages after the last feature stage are not built: they would be dead weight.
    """

    def __init__(self, arch: ArchSpec, classifier: bool = False):
        super().__init__()
        if classifier and arch.head is None:
            raise ValueError(f"arch {arch.name!r} has no head section; a classifier needs one")
        names = [s.name for s in arch.stages]
        self.feature_index = [names.index(f) for f in arch.features]
        n_build = len(arch.stages) if classifier else max(self.feature_index, default=len(arch.stages) - 1) + 1
        self.arch = arch
        self.stem = build_block(arch.stem, arch.channels)
        self.stages = nn.ModuleList()
        cin = arch.stem.out
        for st in arch.stages[:n_build]:
            blocks = []
            for b in st.blocks:
                blocks.append(build_block(b, cin))
                cin = b.out
            self.stages.append(nn.Sequential(*blocks))
        self.out_channels = arch.feature_channels()
        self.strides = [arch.stage_strides()[f] for f in arch.features]
        self.head = ClassifierHead(cin, arch.head) if classifier else None

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        if self.head is not None:
            return self.head(x)
        return [outs[i] for i in self.feature_index]


def build_backbone(arch: ArchSpec, classifier: bool = False) -> Backbone:
    """nn.Module for `arch`; `classifier=True` adds the head section (ImageNet-style logits)."""
    return Backbone(arch, classifier=classifier)
