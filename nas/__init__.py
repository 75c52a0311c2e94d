"""nas: hardware-aware neural architecture search for mobile YOLO detectors.

The public API is re-exported here, imported on first use so that `nas --help` does not pay for torch; see
README.md for the command line.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "nas.arch.backbone": ("Backbone", "build_backbone"),
    "nas.arch.cost": ("Cost", "arch_cost", "count_macs", "count_params"),
    "nas.arch.spec": ("ArchSpec", "BlockSpec", "HeadSpec", "StageSpec", "dumps_arch", "load_arch", "loads_arch",
                      "make_divisible", "save_arch"),
    "nas.arch.zoo": ("get_arch", "zoo_names"),
    "nas.errors": ("ConfigError", "NasError"),
    "nas.space": ("SearchSpace", "load_space"),
    "nas.arch.detector": ("Detector",),
    "nas.arch.headconfig": ("HeadConfig",),
    "nas.latency.table": ("LatencyTable",),
    "nas.latency.adapt": ("adapt",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
