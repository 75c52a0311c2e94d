"""Weight-sharing modules: one detector whose weights hold every subnet of a search space (a supernet). A subnet is
an ordinary ArchSpec run through the shared weights: the first k blocks of a stage, the first channels of every
width (BatchNorm statistics sliced alike), the centre crop of the largest kernel, UIB's start and middle depthwise
convs switched on or off (IB, ConvNext, ExtraDW and FFN are points of one block), FusedIB as its own weights at a
position. `Supernet.extract(arch)` copies a subnet's weights into a plain Detector that computes the same function.

Kernels are shared by plain centre crop (no learned transform): a 3x3 is the middle of the 5x5 and 7x7, so the
extracted subnet is an ordinary Detector without extra matrices, and the forward pass is exactly what it runs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from nas.arch.decode import decode
from nas.arch.detector import Detector, build_neck_head, scale_width
from nas.arch.headconfig import STRIDES, HeadConfig
from nas.arch.spec import UIB_OPS, ArchSpec, BlockSpec
from nas.errors import NasError

ACT_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "hswish": F.hardswish, "swish": F.silu, "silu": F.silu,
                 "gelu": F.gelu}  # what blocks.ACT_LAYERS' modules compute, as functions: activations have no weights


class ArchDoesNotFit(NasError):
    """An architecture asks for more than the supernet holds (a deeper stage, a wider block, a larger kernel...)."""


@dataclass(frozen=True)
class SlotSpec:
    """The largest shapes one block position must hold: over every op, input width and expansion it can take."""
    cin: int
    out: int
    stride: int
    kernel: int                  # largest depthwise / fused kernel
    mid: int                     # largest UIB expanded width (0: no UIB op here)
    se: int                      # largest UIB SE width (0: no SE)
    start: bool                  # some op here has a start depthwise conv (convnext, extra_dw)
    middle: bool                 # some op here has a middle depthwise conv (ib, extra_dw)
    fused_mid: int = 0           # largest FusedIB expanded width (0: no FusedIB here)
    fused_se: int = 0


@dataclass(frozen=True)
class SupernetSpec:
    """A search space's largest shapes, position by position (made from a SearchSpace by nas.detect.supernet)."""
    channels: int
    stem_out: int
    stages: tuple[tuple[str, tuple[SlotSpec, ...]], ...]
    features: tuple[str, ...]

    def feature_channels(self) -> list[int]:
        outs = {name: slots[0].out for name, slots in self.stages}
        return [outs[f] for f in self.features]


class ElasticConvBN(nn.Sequential):
    """ConvBN at its largest shape (the same children '0' conv, '1' BN as blocks.ConvBN, so state_dict keys match);
    `run` uses the first `cout` filters over the input's channels, the centre k x k of the kernel and the first
    `cout` BatchNorm entries (statistics updated in place through the slices)."""

    def __init__(self, cin: int, cout: int, kernel: int, depthwise: bool = False):
        super().__init__(nn.Conv2d(cin, cout, kernel, groups=cout if depthwise else 1, bias=False),
                         nn.BatchNorm2d(cout))
        self.depthwise = depthwise

    def run(self, x: Tensor, cout: int, k: int, stride: int = 1, act: str | None = None) -> Tensor:
        conv, bn = self[0], self[1]
        w = slice_weight(conv.weight, (cout, 1 if self.depthwise else x.shape[1], k, k))
        y = F.conv2d(x, w, None, stride, k // 2, groups=cout if self.depthwise else 1)
        momentum = bn.momentum
        if self.training:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        y = F.batch_norm(y, bn.running_mean[:cout], bn.running_var[:cout], bn.weight[:cout], bn.bias[:cout],
                         self.training, momentum or 0.0, bn.eps)
        return ACT_FUNCTIONS[act](y) if act else y


class ElasticSE(nn.Module):
    """blocks.SqueezeExcite at its largest widths; `run` uses the first `channels` and `reduced` of each."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def run(self, x: Tensor, reduced: int) -> Tensor:
        c = x.shape[1]
        s = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), self.reduce.weight[:reduced, :c], self.reduce.bias[:reduced]))
        return x * F.hardsigmoid(F.conv2d(s, self.expand.weight[:c, :reduced], self.expand.bias[:c]))


class ElasticUIB(nn.Module):
    """The UIB weights of one position: [start dw] -> [expand 1x1] -> [middle dw] -> [SE] -> project 1x1, with
    blocks.UniversalInvertedBottleneck's names; the op of the block run picks which convs take part."""

    def __init__(self, s: SlotSpec):
        super().__init__()
        mid = max(s.mid, s.cin)  # expand 1 with a depthwise conv: no expansion, the middle dw runs at the input width
        self.dw_start = ElasticConvBN(s.cin, s.cin, s.kernel, depthwise=True) if s.start else None
        self.expand = ElasticConvBN(s.cin, s.mid, 1)
        self.dw_mid = ElasticConvBN(mid, mid, s.kernel, depthwise=True) if s.middle else None
        self.se = ElasticSE(mid, s.se) if s.se else None
        self.project = ElasticConvBN(mid, s.out, 1)

    def run(self, x: Tensor, b: BlockSpec) -> Tensor:
        cin, sk, mk = x.shape[1], b.start_kernel, b.mid_kernel
        skip_expand = b.expand == 1.0 and bool(sk or mk)  # as blocks.build_block
        mid = cin if skip_expand else b.mid(cin)
        y = self.dw_start.run(x, cin, sk, 1 if mk else b.stride) if sk else x
        y = y if skip_expand else self.expand.run(y, mid, 1, act=b.act)
        y = self.dw_mid.run(y, mid, mk, b.stride, b.act) if mk else y
        y = self.se.run(y, b.se_width(cin)) if b.se else y
        y = self.project.run(y, b.out, 1)
        return x + y if b.residual(cin) else y


class ElasticFusedIB(nn.Module):
    """blocks.FusedIB at its largest shape: full k x k conv expands (BN + act), [SE], 1x1 projects."""

    def __init__(self, s: SlotSpec):
        super().__init__()
        self.conv = ElasticConvBN(s.cin, s.fused_mid, s.kernel)
        self.se = ElasticSE(s.fused_mid, s.fused_se) if s.fused_se else None
        self.project = ElasticConvBN(s.fused_mid, s.out, 1)

    def run(self, x: Tensor, b: BlockSpec) -> Tensor:
        cin = x.shape[1]
        y = self.conv.run(x, b.mid(cin), b.kernel, b.stride, b.act)
        y = self.se.run(y, b.se_width(cin)) if b.se else y
        y = self.project.run(y, b.out, 1)
        return x + y if b.residual(cin) else y


class ElasticSlot(nn.Module):
    """One block position: the UIB weights and, where the space allows it, FusedIB's own."""

    def __init__(self, s: SlotSpec):
        super().__init__()
        self.spec = s
        self.uib = ElasticUIB(s) if s.mid else None
        self.fused = ElasticFusedIB(s) if s.fused_mid else None

    def forward(self, x: Tensor, b: BlockSpec) -> Tensor:
        return (self.fused if b.op == "fused_ib" else self.uib).run(x, b)


class ElasticBackbone(nn.Module):
    """Stem + stages of slots; `forward(x, arch)` runs the first len(blocks) slots of each stage as `arch` says and
    returns the feature maps of the spec's feature stages."""

    def __init__(self, spec: SupernetSpec):
        super().__init__()
        self.spec = spec
        self.stem = ElasticConvBN(spec.channels, spec.stem_out, 3)
        names = [n for n, _ in spec.stages]
        n_build = max(names.index(f) for f in spec.features) + 1  # as Backbone: no dead stages after the features
        self.stages = nn.ModuleList(nn.ModuleList(ElasticSlot(s) for s in slots) for _, slots in spec.stages[:n_build])
        self.feature_index = [names.index(f) for f in spec.features]

    def forward(self, x: Tensor, arch: ArchSpec) -> list[Tensor]:
        x = self.stem.run(x, arch.stem.out, arch.stem.kernel, arch.stem.stride, arch.stem.act)
        outs = []
        for slots, st in zip(self.stages, arch.stages):
            for slot, b in zip(slots, st.blocks):
                x = slot(x, b)
            outs.append(x)
        return [outs[i] for i in self.feature_index]


def slice_weight(w: Tensor, shape: tuple[int, ...], in_index: Tensor | None = None) -> Tensor:
    """The first entries of every dim of `w` down to `shape`, the centre of the kernel dims (2 and 3); `in_index`
    picks dim 1 instead (the neck's concatenated inputs). A view where possible: gradients reach the shared weight."""
    if w.ndim == 0:
        return w
    out = w.index_select(1, in_index) if in_index is not None else w
    for d, n in enumerate(shape):
        if d == 1 and in_index is not None:
            continue
        start = (out.shape[d] - n) // 2 if d >= 2 else 0
        out = out.narrow(d, start, n)
    return out


def neck_input_index(head: HeadConfig, max_in: list[int], active: list[int]) -> dict[str, Tensor]:
    """The neck's convs that read the backbone's features, and which of their input channels (dim 1 of the weight)
    a subnet with feature widths `active` uses. The yolov8 neck concatenates: td4 reads (P5 up, P4), td3 (T4 up, P3),
    bu5 (P4 out down, P5); the dw neck's 1x1 laterals read P3, P4, P5 alone."""
    ar = torch.arange
    if head.neck == "dw":
        return {f"lateral.{i}.0.weight": ar(c) for i, c in enumerate(active)}
    m5, (a3, a4, a5) = max_in[2], active
    c4 = scale_width(512, head.width)
    return {"td4.split.0.weight": torch.cat((ar(a5), m5 + ar(a4))),
            "td3.split.0.weight": torch.cat((ar(c4), c4 + ar(a3))),
            "bu5.split.0.weight": torch.cat((ar(c4), c4 + ar(a5)))}


class Supernet(nn.Module):
    """Elastic backbone + the neck and head at the largest feature widths. `forward(x, arch)` runs subnet `arch`
    (default: `self.arch`, the largest): raw level maps in training mode, decoded detections in eval mode, as a
    Detector. `arch` and `head_config` are what nas.detect.checkpoint's model_meta records."""

    def __init__(self, spec: SupernetSpec, largest: ArchSpec, head: HeadConfig):
        super().__init__()
        self.spec, self.arch, self.head_config = spec, largest, head
        self.reg_max, self.strides = head.reg_max, STRIDES
        self.backbone = ElasticBackbone(spec)
        self.neck, self.head = build_neck_head(spec.feature_channels(), head)
        self.head.init_bias(self.strides)
        check_fits(spec, largest)

    def forward(self, x: Tensor, arch: ArchSpec | None = None) -> list[Tensor] | Tensor:
        arch = arch or self.arch
        feats = self.backbone(x, arch)
        index = neck_input_index(self.head_config, self.spec.feature_channels(), [f.shape[1] for f in feats])
        params = dict(self.neck.named_parameters())
        sliced = {k: slice_weight(params[k], (params[k].shape[0], len(i), *params[k].shape[2:]), i.to(x.device))
                  for k, i in index.items()}
        preds = self.head(functional_call(self.neck, sliced, (feats,)))
        return preds if self.training else decode(preds, self.strides, self.reg_max)

    def extract(self, arch: ArchSpec) -> Detector:
        """A plain Detector of `arch` (this supernet's head) holding the weights `arch` uses here, in eval mode."""
        check_fits(self.spec, arch)
        model = Detector(arch, self.head_config)
        src = self.state_dict()
        index = neck_input_index(self.head_config, self.spec.feature_channels(), model.backbone.out_channels)
        ops = {f"{st.name}.{i}": b.op for st in arch.stages for i, b in enumerate(st.blocks)}
        names = [st.name for st in arch.stages]
        with torch.no_grad():
            for key, dst in model.state_dict().items():
                m = _BLOCK_KEY.match(key)
                if m:  # backbone.stages.S.I.rest -> backbone.stages.S.I.(uib|fused).rest
                    part = "fused" if ops[f"{names[int(m[1])]}.{m[2]}"] == "fused_ib" else "uib"
                    skey = f"backbone.stages.{m[1]}.{m[2]}.{part}.{m[3]}"
                else:
                    skey = key
                i = index.get(key.removeprefix("neck.")) if key.startswith("neck.") else None
                dst.copy_(slice_weight(src[skey], tuple(dst.shape), i))
        return model.eval()


_BLOCK_KEY = re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.(.+)$")


def check_fits(spec: SupernetSpec, arch: ArchSpec) -> None:
    """ArchDoesNotFit naming the first stage or block of `arch` the supernet cannot run."""
    def refuse(where: str, why: str) -> None:
        raise ArchDoesNotFit(f"{arch.name}: {where}: {why}; the supernet was trained on another search space")

    if arch.channels != spec.channels or arch.stem.out > spec.stem_out or arch.stem.kernel != 3:
        refuse("stem", f"the supernet's stem is a 3x3 conv from {spec.channels} to at most {spec.stem_out} channels")
    if [s.name for s in arch.stages] != [n for n, _ in spec.stages] or tuple(arch.features) != spec.features:
        refuse("stages", f"expected stages {[n for n, _ in spec.stages]} with features {list(spec.features)}")
    cin = arch.stem.out
    for st, (_, slots) in zip(arch.stages, spec.stages):
        if len(st.blocks) > len(slots):
            refuse(st.name, f"depth {len(st.blocks)} > the supernet's {len(slots)}")
        for i, (b, s) in enumerate(zip(st.blocks, slots)):
            why = _slot_refusal(b, s, cin)
            if why:
                refuse(f"stages.{st.name}.blocks[{i}]", why)
            cin = b.out


def _slot_refusal(b: BlockSpec, s: SlotSpec, cin: int) -> str | None:
    if b.op not in (*UIB_OPS, "fused_ib") or b.layer_scale:
        return f"op {b.op!r}{' with layer_scale' if b.layer_scale else ''} is not in the supernet"
    fused = b.op == "fused_ib"
    if (fused and not s.fused_mid) or (not fused and not s.mid):
        return f"no {b.op} weights at this position"
    if (b.start_kernel and not s.start) or (b.mid_kernel and not s.middle):
        return f"no {b.op} depthwise conv at this position"
    if max(b.start_kernel, b.mid_kernel, b.kernel or 0) > s.kernel or b.stride != s.stride:
        return f"kernel/stride beyond the supernet's (largest kernel {s.kernel}, stride {s.stride})"
    mid = b.mid(cin)
    if cin > s.cin or b.out > s.out or mid > max(s.fused_mid if fused else s.mid, s.cin):
        return f"widths in {cin} / mid {mid} / out {b.out} beyond the supernet's {s.cin} / {s.mid} / {s.out}"
    if b.se and b.se_width(cin) > (s.fused_se if fused else s.se):
        return "SE wider than the supernet's"
    return None
