"""nas: hardware-aware neural architecture search for mobile YOLO detectors.

The public API is re-exported here; see README.md for the command line.
"""
from nas.arch.backbone import Backbone, build_backbone
from nas.arch.cost import Cost, arch_cost, count_macs, count_params
from nas.arch.spec import ArchSpec, BlockSpec, HeadSpec, StageSpec, dumps_arch, load_arch, loads_arch, make_divisible, save_arch
from nas.arch.zoo import get_arch, zoo_names
from nas.errors import ConfigError, NasError
from nas.space import SearchSpace, load_space

__all__ = [
    "ArchSpec", "BlockSpec", "HeadSpec", "StageSpec", "Backbone", "build_backbone", "Cost", "arch_cost",
    "count_macs", "count_params", "dumps_arch", "load_arch", "loads_arch", "make_divisible", "save_arch",
    "get_arch", "zoo_names", "ConfigError", "NasError", "SearchSpace", "load_space",
]
__version__ = "0.1.0"
