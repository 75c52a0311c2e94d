"""Shared fixtures: a tiny search space and its latency table, measured for real once per test session."""
from pathlib import Path

import pytest
import torch
import yaml

from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable
from nas.space import space_from_dict

TINY = {
    "format": "nas/space@1", "name": "tiny", "resolution": [64], "stem": {"out": [8], "act": ["relu"]},
    "stages": [
        {"name": "s1", "stride": 2, "depth": [1], "out": [16], "ops": ["ib", "fused_ib"], "kernels": [3],
         "expand": [2.0], "act": ["relu"]},
        {"name": "s2", "stride": 2, "depth": [1, 2], "out": [16, 24], "ops": ["ib", "extra_dw", "ffn"], "kernels": [3],
         "expand": [2.0], "se": [False, True], "act": ["hswish"]},
        {"name": "s3", "stride": 2, "depth": [1], "out": [32], "ops": ["convnext"], "kernels": [3, 5], "expand": [2.0],
         "act": ["relu"]},
    ],
    "features": ["s1", "s2", "s3"],
}
# A tiny space that can feed a detector: features at strides 8, 16, 32.
DET = {
    "format": "nas/space@1", "name": "det-tiny", "resolution": [64], "stem": {"out": [8], "act": ["relu"]},
    "stages": [
        {"name": "s1", "stride": 2, "depth": [1], "out": [8], "ops": ["ib"], "kernels": [3], "expand": [2.0],
         "act": ["relu"]},
        {"name": "s2", "stride": 2, "depth": [1, 2], "out": [16, 24], "ops": ["ib", "convnext"], "kernels": [3],
         "expand": [2.0], "act": ["relu"]},
        {"name": "s3", "stride": 2, "depth": [1], "out": [24], "ops": ["ib"], "kernels": [3], "expand": [2.0],
         "act": ["relu"]},
        {"name": "s4", "stride": 2, "depth": [1], "out": [32], "ops": ["ib"], "kernels": [3], "expand": [2.0],
         "act": ["relu"]},
    ],
    "features": ["s2", "s3", "s4"],
}
# Few repeats: the tests check behaviour, not precision.
FAST = Protocol(warmup_runs=2, warmup_s=0.0, repeats=5, min_time_s=0.0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    (d / "space.yaml").write_text(yaml.safe_dump(TINY))
    return d


@pytest.fixture(scope="session")
def tiny_space(tiny_dir):
    return space_from_dict(TINY, str(tiny_dir / "space.yaml"))


@pytest.fixture(scope="session")
def tiny_table(tiny_space, tiny_dir) -> LatencyTable:
    t = LatencyTable.new(FAST, "tiny-test", space="tiny")
    t.extend(tiny_space.ops(), path=tiny_dir / "table.csv", progress=False)
    return t


def median_budget(tiny_dir, tiny_table) -> float:
    """A budget with about half of the tiny space's archs over it, halfway between two distinct predicted latencies:
    a budget equal to one arch's (rounded) latency would make that arch's side depend on the rounding."""
    space = space_from_dict(TINY, str(tiny_dir / "space.yaml"))
    lat = sorted(tiny_table.predict(space.random(i)).total_ms for i in range(40))
    mid = len(lat) // 2
    while mid < len(lat) - 1 and lat[mid] - lat[mid - 1] < 1e-3:
        mid += 1
    return round((lat[mid - 1] + lat[mid]) / 2, 6)


@pytest.fixture(scope="session")
def det_space(tmp_path_factory):
    """The DET space (a detector: features at strides 8/16/32) and its table file: (space YAML, table path)."""
    d = tmp_path_factory.mktemp("det_tiny")
    (d / "space.yaml").write_text(yaml.safe_dump(DET))
    table = LatencyTable.new(FAST, "det-tiny-test", space="det-tiny")
    table.extend(space_from_dict(DET, str(d / "space.yaml")).ops(), path=d / "table.csv", progress=False)
    return d / "space.yaml", table.path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waits made
    2 threads 10-50x slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hide_package(monkeypatch, package: str) -> None:
    """Make `import PACKAGE` (and its submodules) raise ImportError for the rest of the test, as if not installed."""
    import builtins

    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
