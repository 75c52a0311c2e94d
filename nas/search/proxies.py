"""Zero-cost accuracy proxies: score an untrained backbone from its ArchSpec (higher = better predicted accuracy),
with #params and MACs as the baselines every proxy has to beat."""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
from torch import nn

from nas.arch.backbone import build_backbone
from nas.arch.blocks import ACT_LAYERS
from nas.arch.cost import arch_cost
from nas.arch.spec import ArchSpec
from nas.config import suggest
from nas.errors import NasError

# The network's activation units (the SE gate's Hardsigmoid is a gate, not a unit).
ACTIVATIONS = tuple(dict.fromkeys(ACT_LAYERS.values()))
# MAE-DET's multi-scale entropy prior [0, 0, 1, 1, 6] over C1..C5, keyed by stride (C3..C5 = strides 8, 16, 32).
ENTROPY_STAGE_WEIGHTS = {2: 0.0, 4: 0.0, 8: 1.0, 16: 1.0, 32: 6.0}
ZEN_ALPHA = 0.01      # Zen-score input perturbation scale (Lin et al. 2021)


class ProxyError(NasError):
    """A proxy could not score an architecture (NaN/inf features or score, degenerate kernel)."""

    def __init__(self, reason: str, proxy: str | None = None, arch: str | None = None):
        self.reason, self.proxy, self.arch = reason, proxy, arch
        super().__init__(f"proxy {proxy!r} failed on arch {arch!r}: {reason}" if proxy else reason)


class UnknownProxyError(NasError, ValueError):
    """The requested proxy name is not in PROXIES."""


# ---------------------------------------------------------------- networks and inputs

def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _network(arch: ArchSpec, gen: torch.Generator, *, init: str, bn: str, dtype: torch.dtype = torch.float32,
             device: str = "cpu", declip: bool = False) -> nn.Module:
    """The backbone with every weight redrawn from `gen`: init "he" (normal, std sqrt(2/fan_in)) or "gauss"
    (standard normal, MAE-DET/Zen). bn: "train" (batch statistics), "eval" (default stats: identity) or "remove"."""
    with torch.random.fork_rng(devices=[]):  # default init draws from the global RNG; leave it as it was
        net = build_backbone(arch)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = 1.0 if init == "gauss" else math.sqrt(2.0 / m.weight[0].numel())
                m.weight.normal_(0.0, std, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()  # weight 1, bias 0, running mean 0, var 1
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if bn == "remove" and isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
            elif declip and isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU())  # huge activations: a clip at 6 would zero the flow / variance
    net.train(bn == "train")
    return net.to(device=device, dtype=dtype)


def _images(arch: ArchSpec, gen: torch.Generator, batch: int, resolution: int, dtype: torch.dtype,
            device: str) -> torch.Tensor:
    return torch.randn(batch, arch.channels, resolution, resolution, generator=gen, dtype=dtype).to(device)


def _require_finite(tensors: Iterable[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ProxyError(f"{what} contain NaN or inf")


def _log(value: torch.Tensor | float, what: str) -> float:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise ProxyError(f"{what} is {v!r} (NaN or inf)")
    if v <= 0:
        raise ProxyError(f"{what} is {v!r}; its log is undefined")
    return math.log(v)


def _weights(net: nn.Module) -> list[torch.Tensor]:
    """Conv and linear weights: the layers the zero-cost papers sum over (BN and biases are left out)."""
    return [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------- proxies
# Each takes (arch, resolution, batch, seed, device) and returns a log-scale float, higher = better.

def synflow(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log sum |θ ⊙ dR/dθ|, R = sum of the feature maps for an all-ones input with |θ| (Tanaka et al. 2020).

    float64 against overflow. BN in eval mode with default statistics (mean 0, var 1, weight 1, bias 0): an
    identity up to 1/sqrt(1+eps), so the network stays the positive linear path product synflow measures;
    train-mode BN would normalise the near-constant all-ones activations to ~0 and break the flow.
    """
    net = _network(arch, _generator(seed), init="he", bn="eval", dtype=torch.float64, device=device, declip=True)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    x = torch.ones(1, arch.channels, resolution, resolution, dtype=torch.float64, device=device)  # input-independent
    feats = net(x)
    _require_finite(feats, "feature maps")
    weights = _weights(net)
    grads = torch.autograd.grad(sum(f.sum() for f in feats), weights)
    _require_finite(grads, "gradients")
    return _log(sum((w * g).abs().sum() for w, g in zip(weights, grads)), "synflow sum")


def _random_target_grads(arch: ArchSpec, resolution: int, batch: int, seed: int,
                         device: str) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Weights and gradients of a label-free loss: MSE of each feature map against a fixed N(0, 1) target.

    A backbone has no labels or classes; with train-mode BN its outputs are ~N(0, 1) too, so the loss is a
    random regression at every position of every detection scale (what a dense head would see)."""
    gen = _generator(seed)
    net = _network(arch, gen, init="he", bn="train", device=device)
    feats = net(_images(arch, gen, batch, resolution, torch.float32, device))
    _require_finite(feats, "feature maps")
    targets = [torch.randn(f.shape, generator=gen).to(device) for f in feats]
    loss = sum(nn.functional.mse_loss(f, t) for f, t in zip(feats, targets))
    weights = _weights(net)
    grads = torch.autograd.grad(loss, weights)
    _require_finite(grads, "gradients")
    return weights, grads


def grad_norm(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log of the summed per-layer gradient L2 norms (Abdelfattah et al. 2021) under the random-target loss."""
    _, grads = _random_target_grads(arch, resolution, batch, seed, device)
    return _log(sum(g.norm() for g in grads), "gradient norm")


def snip(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log sum |θ ⊙ dL/dθ| (Lee et al. 2019, as in Abdelfattah et al. 2021) under the random-target loss."""
    weights, grads = _random_target_grads(arch, resolution, batch, seed, device)
    return _log(sum((w * g).abs().sum() for w, g in zip(weights, grads)), "snip sum")


def naswot(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log det K, K[i, j] = units where images i and j have the same activation code (Mellor et al. 2021).

    Every activation module is hooked (SE's ReLU included); a unit is "on" when its input is > 0, which is
    the ReLU code and the natural binarisation of Hardswish/SiLU/GELU. Gaussian noise images (data-free),
    He init, train-mode BN. K = N_A - Hamming distance = c c^T + (1-c)(1-c)^T, summed over layers.
    """
    if batch < 2:
        raise ProxyError("naswot needs a batch of at least 2 images")
    gen = _generator(seed)
    net = _network(arch, gen, init="he", bn="train", device=device)
    kernel = torch.zeros(batch, batch, dtype=torch.float64)

    def hook(_module, inputs, _output):
        c = (inputs[0].detach().flatten(1) > 0).float()
        on = c.sum(1, dtype=torch.float64)
        same_on = (c @ c.T).double().cpu()  # 0/1 products: exact in float32 up to 2^24 units per layer
        kernel.add_(2 * same_on - on[:, None].cpu() - on[None, :].cpu() + c.shape[1])

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, ACTIVATIONS)]
    try:
        with torch.no_grad():
            feats = net(_images(arch, gen, batch, resolution, torch.float32, device))
    finally:
        for h in handles:
            h.remove()
    _require_finite(feats, "feature maps")
    if not handles:
        raise ProxyError("the network has no activation units to code")
    sign, logdet = torch.linalg.slogdet(kernel)
    if sign <= 0:
        raise ProxyError("the activation-code kernel is singular (images share identical codes)")
    return float(logdet)


def entropy(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """MAE-DET (Sun et al. 2022): sum over detection scales of weight * log Var(feature map).

    Standard-normal weights and input, BN removed (the paper's Gaussian-entropy setting), float64 because
    the variance grows by ~fan_in per layer; weights by stride from ENTROPY_STAGE_WEIGHTS ([0,0,1,1,6]).
    ReLU6 becomes ReLU: with unit-variance weights every unit saturates at 6 and the variance would collapse.
    One image whatever `batch`: the variance is taken over C*H*W values and its seed-to-seed spread comes
    from the weight draw (measured: same spread with 1 and 8 images), so 8 images only cost 8x float64 compute.
    """
    gen = _generator(seed)
    net = _network(arch, gen, init="gauss", bn="remove", dtype=torch.float64, device=device, declip=True)
    with torch.no_grad():
        feats = net(_images(arch, gen, 1, resolution, torch.float64, device))
    _require_finite(feats, "feature maps (float64 overflow?)")
    total = 0.0
    for f, stride in zip(feats, net.strides):
        w = ENTROPY_STAGE_WEIGHTS.get(stride, 6.0 if stride > 32 else 1.0)
        if w:
            total += w * _log(f.var(), f"variance of the stride-{stride} features")
    return total


def zen(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """Zen-score (Lin et al. 2021): log E||f(x) - f(x + αε)||_F + Σ_BN log sqrt(mean batch variance of its input).

    Standard-normal weights, train-mode BN; f = all detection feature maps together; the BN term restores
    the scale the BN layers normalised away.
    """
    gen = _generator(seed)
    net = _network(arch, gen, init="gauss", bn="train", device=device)
    x = _images(arch, gen, batch, resolution, torch.float32, device)
    noise = _images(arch, gen, batch, resolution, torch.float32, device)
    log_scales: list[float] = []

    def hook(_module, inputs, _output):
        v = inputs[0].detach().var(dim=(0, 2, 3), unbiased=False).mean()
        log_scales.append(0.5 * _log(v, "a BN input variance"))

    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        handles = [m.register_forward_hook(hook) for m in bns]
        try:
            clean = net(x)
        finally:
            for h in handles:
                h.remove()
        _require_finite(clean, "feature maps")
        moved = net(x + ZEN_ALPHA * noise)
    _require_finite(moved, "feature maps")
    sq = sum(((a - b) ** 2).flatten(1).sum(1) for a, b in zip(clean, moved))
    return _log(sq.sqrt().mean(), "feature-map change") + sum(log_scales)


# The training-speed proxy trains on real images of its own size, whatever resolution/batch the random-input proxies
# use: 16 steps of 4 images at 128 px (~1.5 CPU s). On 30 archs 16x4 ranked trained mAP at tau 0.43, 16x8 at 0.35
# and 8x8 at 0.21 (docs/BENCHMARKS.md); 15 other archs confirmed the choice.
TSE_STEPS = 16
TSE_BATCH = 4
TSE_RESOLUTION = 128
TSE_CLASSES = 10      # DigitsDet's digits


@functools.lru_cache(maxsize=4)
def _digits_batches(resolution: int, batch: int, steps: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """`steps` batches of DigitsDet images rendered in memory (no files, nothing downloaded): (images in [0, 1],
    targets (N, 6) = batch index, class, cx, cy, w, h normalised), the same for every architecture."""
    import numpy as np

    from nas.detect.digits import DigitsParams, digit_sizes, load_glyphs, make_image

    glyphs, classes = load_glyphs()["train"]
    lo, hi = digit_sizes(resolution)
    params = DigitsParams(n_train=batch * steps, n_val=0, imgsz=resolution, seed=seed, min_size=lo, max_size=hi)
    out = []
    for b in range(steps):
        imgs, targets = [], []
        for i in range(batch):
            img, boxes = make_image(params, "train", b * batch + i, glyphs, classes)
            imgs.append(torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255))
            for c, x1, y1, x2, y2 in boxes:
                targets.append([i, c, (x1 + x2) / 2 / resolution, (y1 + y2) / 2 / resolution,
                                (x2 - x1) / resolution, (y2 - y1) / resolution])
        out.append((torch.stack(imgs), torch.tensor(targets, dtype=torch.float32).reshape(-1, 6)))
    return tuple(out)


def _digits_detector(arch: ArchSpec, seed: int, device: str):
    """The whole detector (dw neck, DigitsDet's classes) seeded from `seed`, in train mode, with its loss."""
    from nas.arch.detector import Detector
    from nas.arch.headconfig import HeadConfig
    from nas.detect.loss import DetectionLoss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Detector(arch, HeadConfig(neck="dw", num_classes=TSE_CLASSES)).to(device).train()
    return model, DetectionLoss(TSE_CLASSES, model.strides, model.reg_max)


def _checked_loss(criterion, model: nn.Module, imgs: torch.Tensor, targets: torch.Tensor, res: int,
                  step: int, device: str) -> torch.Tensor:
    loss, _ = criterion(model(imgs.to(device)), targets.to(device), res)
    if not bool(torch.isfinite(loss)):
        raise ProxyError(f"training loss is {float(loss.detach())!r} at step {step}")
    return loss


def tse(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """Training speed estimate (Ru et al. 2021): minus the mean detection loss over the first TSE_STEPS AdamW
    steps of the whole detector (dw neck, YOLOv8 loss) on DigitsDet images rendered in memory, TSE_BATCH images of
    TSE_RESOLUTION px each (`resolution` and `batch` are the random-input proxies' and are not used). Not
    zero-cost: it trains, briefly; a network that learns faster in its first steps leads after a short training."""
    res = TSE_RESOLUTION
    model, criterion = _digits_detector(arch, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step, (imgs, targets) in enumerate(_digits_batches(res, TSE_BATCH, TSE_STEPS, seed), 1):
        loss = _checked_loss(criterion, model, imgs, targets, res, step, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / len(imgs))
    return -sum(losses) / len(losses)


# ZiCo's setting, fixed before it was measured here: the paper's two batches, of real DigitsDet images and labels
# at the tse resolution, through the whole detector and its detection loss.
ZICO_BATCHES = 2
ZICO_BATCH = 8


def zico(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """ZiCo (Li et al. 2023): Σ over conv/linear layers of log Σ_θ mean|g_θ| / std(g_θ), the gradient g_θ of the
    detection loss taken on ZICO_BATCHES batches of DigitsDet images (whole detector, no weight update).
    Weights whose gradient does not vary between batches (std 0) are left out, as in the paper. Like tse it
    ignores `resolution` and `batch`."""
    res = TSE_RESOLUTION
    model, criterion = _digits_detector(arch, seed, device)
    weights = _weights(model)
    grads: list[list[torch.Tensor]] = [[] for _ in weights]
    for step, (imgs, targets) in enumerate(_digits_batches(res, ZICO_BATCH, ZICO_BATCHES, seed), 1):
        loss = _checked_loss(criterion, model, imgs, targets, res, step, device)
        for store, g in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
            if g is not None:
                store.append(g.detach())
    total = 0.0
    layers = 0
    for store in grads:
        if len(store) < ZICO_BATCHES:
            continue  # a layer the loss does not reach
        g = torch.stack(store)
        _require_finite([g], "gradients")
        mean, std = g.abs().mean(0), g.std(0)
        varying = std > 0
        if bool(varying.any()):
            total += _log((mean[varying] / std[varying]).sum(), "a layer's mean/std gradient sum")
            layers += 1
    if not layers:
        raise ProxyError("no layer's gradient varies between batches")
    return total


def params(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log #parameters of the backbone (baseline)."""
    return _log(arch_cost(arch, resolution).params, "parameter count")


def macs(arch: ArchSpec, resolution: int, batch: int, seed: int, device: str) -> float:
    """log multiply-adds of the backbone at the proxy resolution (baseline)."""
    return _log(arch_cost(arch, resolution).macs, "MAC count")


PROXIES: dict[str, Callable[[ArchSpec, int, int, int, str], float]] = {
    "synflow": synflow, "grad_norm": grad_norm, "snip": snip, "naswot": naswot, "entropy": entropy,
    "zen": zen, "tse": tse, "zico": zico, "params": params, "macs": macs,
}


# ---------------------------------------------------------------- public entry points

def default_resolution(arch: ArchSpec) -> int:
    """The arch's own input size, so proxies see the space's resolution choice. Fast enough on this 2-core CPU:
    measured over 10 random uib_yolo archs at 256/320, batch 8: median <= 0.47 s, max <= 1.15 s per proxy."""
    return arch.resolution


def score(arch: ArchSpec, proxy: str, *, resolution: int | None = None, batch: int = 8, seed: int = 0,
          device: str = "cpu") -> float:
    """One proxy's score for `arch` (higher = better predicted accuracy); raises ProxyError on NaN/inf."""
    if proxy not in PROXIES:
        raise UnknownProxyError(f"unknown proxy {proxy!r}{suggest(proxy, PROXIES)}; valid: {', '.join(PROXIES)}")
    res = resolution or default_resolution(arch)
    try:
        value = PROXIES[proxy](arch, res, batch, seed, device)
    except ProxyError as e:
        raise ProxyError(e.reason, proxy, arch.name) from None
    if not math.isfinite(value):
        raise ProxyError(f"score is {value!r}", proxy, arch.name)
    return value


def score_all(arch: ArchSpec, proxies: Iterable[str] | None = None, *, resolution: int | None = None,
              batch: int = 8, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """{proxy: score} for each name in `proxies` (default: all of PROXIES)."""
    names = list(PROXIES if proxies is None else proxies)
    for n in names:  # fail on a typo before spending time on the others
        if n not in PROXIES:
            raise UnknownProxyError(f"unknown proxy {n!r}{suggest(n, PROXIES)}; valid: {', '.join(PROXIES)}")
    return {n: score(arch, n, resolution=resolution, batch=batch, seed=seed, device=device) for n in names}
