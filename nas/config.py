"""Safe YAML loading and strict field readers shared by every file format (arch, space, experiment, tables, data).

Every reader raises ConfigError naming the file and the dotted field, so a bad file gives one precise line.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from nas.errors import ConfigError

MAX_FILE_BYTES = 16 * 1024 * 1024  # config files are small; refuse to parse something huge by mistake
MAX_DEPTH = 32


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(obj, Mapping):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


def parse_yaml(text: str | bytes, source: str = "<string>") -> Any:
    """Parse YAML with the safe loader; any failure becomes a one-line ConfigError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(source, None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise ConfigError(source, None, "file is empty")
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or str(e).splitlines()[0]
        raise ConfigError(source, None, f"YAML tag not allowed ({tag}); only plain YAML data is accepted") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, None, f"invalid YAML at {pos}{problem}") from None
    except RecursionError:
        raise ConfigError(source, None, "YAML nested too deeply") from None
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(source, None, f"YAML nested deeper than {MAX_DEPTH} levels")
    return data


def load_yaml(path: str | Path) -> Any:
    """Read and safely parse a YAML file; missing, huge, binary or empty files give a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), None, "file not found" if not p.exists() else "not a regular file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(str(p), None, f"file larger than {MAX_FILE_BYTES // 2**20} MiB; is this the right file?")
    return parse_yaml(p.read_bytes(), str(p))


def join(prefix: str | None, key: str | int) -> str:
    """Dotted field path: join('stages[1]', 'blocks') -> 'stages[1].blocks'; ints become [i]."""
    if isinstance(key, int):
        return f"{prefix or ''}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def suggest(key: str, valid: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close valid key exists, else ''."""
    match = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def require_mapping(obj: Any, source: str, field: str | None) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ConfigError(source, field, f"expected a mapping (key: value), got {type_name(obj)}")
    return obj


def check_keys(obj: Mapping, allowed: Iterable[str], source: str, field: str | None) -> None:
    """Reject unknown keys, suggesting the nearest valid one."""
    allowed = list(allowed)
    for key in obj:
        if not isinstance(key, str) or key not in allowed:
            raise ConfigError(source, join(field, str(key)),
                              f"unknown key{suggest(str(key), allowed)}; valid keys: {', '.join(allowed)}")


def type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "nothing (null)"}.get(type(v), type(v).__name__)


MISSING = object()


def read(obj: Mapping, key: str, kind: type | tuple, source: str, field: str | None, *,
         default: Any = MISSING, check: Callable[[Any], str | None] | None = None) -> Any:
    """Read obj[key] as `kind` (int, float, str, bool, list, dict); `check` returns an error text or None.

    bool is never accepted as int/float and ints are accepted as float, mirroring what users expect from YAML.
    """
    path = join(field, key)
    if key not in obj:
        if default is MISSING:
            raise ConfigError(source, path, "required field is missing")
        return default
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = False
    for k in kinds:
        if k is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
            if not math.isfinite(v):
                raise ConfigError(source, path, f"must be a finite number, got {obj[key]}")
            ok = True
            break
        if k is int and isinstance(v, int) and not isinstance(v, bool):
            ok = True
            break
        if k not in (int, float) and isinstance(v, k):
            ok = True
            break
    if not ok:
        want = " or ".join(type_name(k()) if k is not type(None) else "null" for k in kinds)
        raise ConfigError(source, path, f"expected {want}, got {type_name(v)} {_short(v)}")
    if check is not None:
        problem = check(v)
        if problem:
            raise ConfigError(source, path, f"{problem}, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
