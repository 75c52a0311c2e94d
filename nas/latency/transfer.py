"""The model behind `nas.latency.adapt`: log(target / source) latency of an op as a ridge regression on groups of
its fields (op kind, kind x kernel, kind x expansion, kind x input size, ...) and its log source latency, shrunk
toward one global factor; and the stratified choice of which ops to measure for it. Pure functions, no timing."""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nas.errors import NasError
from nas.latency.coverage import TableOp, key_of

ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0)   # ridge penalties tried by cross-validation
OUTLIER_MADS = 4.0                     # ops this many robust deviations off the first fit are left out of the second
LOG_US_CENTER = 5.0                    # log(150 µs): keeps the intercept the factor of a typical op


def op_fields(key: str) -> tuple[str, dict[str, str]]:
    """('ib', {'kernel': '3', ..., 'C': '32', 'H': '80'}) from an op key; the input's C and H become fields of their
    own, ExtraDW's 'kernels=3/5' also gives 'k_start' and 'k_mid'."""
    kind, *parts = key.split()
    fields = dict(p.split("=", 1) for p in parts if "=" in p)
    dims = fields.get("in", "").split("x")
    if len(dims) == 3:
        fields["C"], fields["H"] = dims[0], dims[1]
        del fields["in"]
    if "/" in fields.get("kernels", ""):
        fields["k_start"], fields["k_mid"] = fields["kernels"].split("/", 1)
    if "se" in fields:
        fields["se"] = "on" if float(fields["se"]) > 0 else "off"
    return kind, fields


def group_features(key: str) -> list[str]:
    """The one-hot groups an op belongs to: its kind, each of its fields (shared by all kinds: a 160x160 input or
    a 7x7 kernel transfers alike in any block), and its kind crossed with each field."""
    kind, fields = op_fields(key)
    items = sorted(fields.items())
    return [f"kind={kind}"] + [f"{k}={v}" for k, v in items] + [f"{kind}|{k}={v}" for k, v in items]


def features(key: str, source_us: float) -> dict[str, float]:
    """Groups (1.0) plus log source latency, globally and per kind: per-call overhead and cache effects make
    small and large ops transfer differently."""
    x = {g: 1.0 for g in group_features(key)}
    z = math.log(source_us) - LOG_US_CENTER
    x["log_us"] = z
    x[f"{key.split()[0]}|log_us"] = z
    return x


@dataclass(frozen=True)
class Transfer:
    """A fitted transfer: `ratio(key, source_us)` is the predicted target / source latency of one op."""

    intercept: float
    weights: Mapping[str, float]
    alpha: float
    cv_errors: tuple[float, ...]      # cross-validated relative errors of the measured ops' predictions
    outliers: int                     # measured ops left out of the final fit

    def ratio(self, key: str, source_us: float) -> float:
        w = self.weights
        return math.exp(self.intercept + sum(w.get(f, 0.0) * v for f, v in features(key, source_us).items()))

    def kind_factors(self, keys: Mapping[str, float]) -> dict[str, float]:
        """Geometric mean predicted ratio per op kind over `keys` (op key -> source µs), and overall."""
        logs: dict[str, list[float]] = {}
        for k, us in keys.items():
            r = math.log(self.ratio(k, us))
            logs.setdefault(k.split()[0], []).append(r)
            logs.setdefault("all", []).append(r)
        return {kind: round(math.exp(float(np.mean(v))), 4) for kind, v in sorted(logs.items())}


def _design(keys: Sequence[str], source_us: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    rows = [features(k, s) for k, s in zip(keys, source_us)]
    names = sorted({f for r in rows for f in r})
    index = {n: i for i, n in enumerate(names)}
    x = np.zeros((len(rows), len(names)))
    for i, r in enumerate(rows):
        for f, v in r.items():
            x[i, index[f]] = v
    return x, names


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
    """Unpenalised intercept, every other weight penalised alike: shrinkage toward one global factor."""
    xm, ym = x.mean(axis=0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return float(ym - xm @ w), w


def _cv_predictions(x: np.ndarray, y: np.ndarray, alpha: float, folds: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty_like(y)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        b, w = _ridge(x[train], y[train], alpha)
        pred[test] = b + x[test] @ w
    return pred


def fit_transfer(source_us: Mapping[str, float], target_us: Mapping[str, float], *, alphas: Sequence[float] = ALPHAS,
                 folds: int = 5, seed: int = 0) -> Transfer:
    """Fit log(target / source) over the ops measured on both sides; the penalty chosen by `folds`-fold
    cross-validation, then one refit without the ops far off the first (a call preempted on a busy machine)."""
    keys = sorted(k for k in target_us if k in source_us)
    if len(keys) < 2:
        raise NasError(f"need at least 2 ops measured on both sides to fit a transfer, got {len(keys)}")
    s = [source_us[k] for k in keys]
    y = np.log(np.array([target_us[k] for k in keys]) / np.array(s))
    x, names = _design(keys, s)
    folds = max(2, min(folds, len(keys)))
    cv = {a: _cv_predictions(x, y, a, folds, seed) for a in alphas}
    alpha = min(alphas, key=lambda a: float(np.mean((cv[a] - y) ** 2)))
    b, w = _ridge(x, y, alpha)
    resid = y - (b + x @ w)
    mad = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) or 1e-9
    keep = np.abs(resid - np.median(resid)) <= OUTLIER_MADS * mad
    if keep.sum() >= 2 and not keep.all():
        b, w = _ridge(x[keep], y[keep], alpha)
    errors = tuple(float(v) for v in np.exp(cv[alpha] - y) - 1)
    return Transfer(b, dict(zip(names, (float(v) for v in w))), alpha, errors, int((~keep).sum()))


def sample_ops(candidates: Sequence[TableOp], n: int, seed: int) -> list[TableOp]:
    """`n` ops spread evenly over strata (op kind x input size) and, within each, balanced over the model's
    groups: each pick is, among a few random candidates, the one whose kernel, expansion, SE, activation, width...
    have been measured least so far. Every group gets data, so little is left to the shrinkage."""
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list[TableOp]] = {}
    for op in candidates:
        kind, fields = op_fields(key_of(op))
        strata.setdefault((kind, fields.get("H", fields.get("res", ""))), []).append(op)
    for pool in strata.values():
        rng.shuffle(pool)
    counts: Counter = Counter()
    picked: list[TableOp] = []
    cells = sorted(strata)
    while len(picked) < n and any(strata.values()):
        rng.shuffle(cells)
        for cell in cells:
            pool = strata[cell]
            if not pool or len(picked) >= n:
                continue
            window = [group_features(key_of(op)) for op in pool[:32]]
            best = min(range(len(window)), key=lambda i: sum(counts[g] for g in window[i]))
            picked.append(pool.pop(best))
            counts.update(window[best])
    return picked
