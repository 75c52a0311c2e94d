"""The checked parts of a latency table's header beyond the protocol: the calibration and, for a table adapted
from another machine's (`nas.latency.adapt`), where it came from and how the transfer was fitted."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nas.config import check_keys, read, require_mapping
from nas.errors import ConfigError
from nas.latency.protocol import BACKENDS

SCALE_RANGE = (0.5, 2.0)  # a calibration outside this says the table and the machine disagree: rebuild, don't scale
ADAPTED_FROM_KEYS = ("table", "cpu_id", "backend", "threads")
ADAPTATION_KEYS = ("ops", "networks", "residuals", "minutes", "seed", "method", "factors", "held_out")


def check_header_records(header: Mapping[str, Any], source: str) -> None:
    """ConfigError naming the field for a malformed `calibration`, `adapted_from` or `adaptation`."""
    _check_calibration(header.get("calibration"), source)
    if header.get("adapted_from") is not None or header.get("adaptation") is not None:
        _check_adapted_from(header.get("adapted_from"), source)
        _check_adaptation(header.get("adaptation"), source)


def _check_calibration(c: Any, source: str) -> None:
    if c is None:
        return
    c = require_mapping(c, source, "header.calibration")
    check_keys(c, ("scale", "archs", "seed", "fitted"), source, "header.calibration")
    v = c.get("scale")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not SCALE_RANGE[0] <= v <= SCALE_RANGE[1]:
        raise ConfigError(source, "header.calibration.scale",
                          f"must be a number in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}], got {v!r}; re-fit it with "
                          f"`nas lut calibrate TABLE --space SPACE.yaml`")


def _at_least(minimum: float):
    return lambda v: None if v >= minimum else f"must be >= {minimum}"


def _check_adapted_from(a: Any, source: str) -> None:
    where = "header.adapted_from"
    if a is None:
        raise ConfigError(source, where, "required with header.adaptation: the source table's name, cpu_id, "
                                         "backend and threads")
    a = require_mapping(a, source, where)
    check_keys(a, ADAPTED_FROM_KEYS, source, where)
    read(a, "table", str, source, where)
    read(a, "cpu_id", (str, type(None)), source, where)
    read(a, "backend", str, source, where,
         check=lambda b: None if b in BACKENDS else f"unknown backend; one of {', '.join(BACKENDS)}")
    read(a, "threads", int, source, where, check=_at_least(1))


def _check_adaptation(a: Any, source: str) -> None:
    where = "header.adaptation"
    if a is None:
        raise ConfigError(source, where, "required with header.adapted_from: what the transfer measured and fitted")
    a = require_mapping(a, source, where)
    check_keys(a, ADAPTATION_KEYS, source, where)
    for key in ("ops", "networks", "seed"):
        read(a, key, int, source, where, check=_at_least(0))
    read(a, "minutes", float, source, where, check=_at_least(0))
    read(a, "method", str, source, where)
    for key in ("residuals", "factors", "held_out"):
        d = require_mapping(read(a, key, dict, source, where, default={}), source, f"{where}.{key}")
        for k in d:
            read(d, k, (float, type(None)), source, f"{where}.{key}")
