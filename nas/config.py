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
MAX_NODES = 200_000  # values after alias expansion: far above any real config, far below a billion-laughs bomb
# Integers beyond this come from 0x/0o/0b/sexagesimal literals only; they would break float() and str() downstream.
MAX_INT_BITS = 256


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only) whose bad values (`!!int abc`, `2001-13-45`, a 5000-digit number, `!!int ''`,
    a `!!timestamp` tag on a mapping) raise a marked YAMLError instead of whatever PyYAML's constructor tripped on."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # ValueError, IndexError, AttributeError, ...: PyYAML trusts explicit tags
            kind = node.tag.rsplit(":", 1)[-1]
            value = short_repr(node.value) if isinstance(node, yaml.ScalarNode) else f"a {node.id}"
            why = f" ({str(e).splitlines()[0].split(';')[0]})" if isinstance(e, ValueError) and str(e) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {kind} value {value}{why}", node.start_mark) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        if value.bit_length() > MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer too large ({short_repr(node.value)}, more than {MAX_INT_BITS} bits)", node.start_mark)
        return value


_SafeLoader.add_constructor("tag:yaml.org,2002:int", _SafeLoader.construct_yaml_int)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse alias bombs, self-containing aliases, deep nesting and duplicate keys before anything is constructed.

    Sizes and depths are memoised per node, so this is linear in the file even when aliases would expand
    exponentially (loaders and dumpers downstream walk the expanded tree).
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()  # nodes on the current path: meeting one again means a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES:
                raise ConfigError(source, None, f"YAML expands to more than {MAX_NODES} values (aliases repeated "
                                                "inside aliases?); refusing to load it")
            if depth[key] > MAX_DEPTH:
                raise ConfigError(source, None, f"YAML nested deeper than {MAX_DEPTH} levels")
            continue
        if key in size:
            continue
        if key in active:
            mark = node.start_mark
            raise ConfigError(source, None, f"recursive YAML alias at line {mark.line + 1} (a value that contains "
                                            "itself)")
        if isinstance(node, yaml.MappingNode):  # PyYAML keeps the last of two equal keys; say so instead
            seen: set[tuple[str, str]] = set()
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if (k.tag, k.value) in seen:
                        raise ConfigError(source, None, f"duplicate key {short_repr(k.value)} at line "
                                                        f"{k.start_mark.line + 1}; which one was meant?")
                    seen.add((k.tag, k.value))
        active.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))


def parse_yaml(text: str | bytes, source: str = "<string>") -> Any:
    """Parse YAML with the safe loader; any failure becomes a one-line ConfigError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(source, None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise ConfigError(source, None, "file is empty")
    loader = None
    try:
        loader = _SafeLoader(text)  # the reader already rejects control characters such as NUL here
        node = loader.get_single_node()  # compose only: nothing is built until the node graph is checked
        if node is None:
            raise ConfigError(source, None, "file has no YAML content, only comments")
        _check_nodes(node, source)
        data = loader.construct_document(node)
    except yaml.constructor.ConstructorError as e:
        problem = getattr(e, "problem", "") or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "could not determine a constructor" in problem:
            raise ConfigError(source, None, f"YAML tag not allowed{pos} ({problem}); only plain YAML data is "
                                            "accepted") from None
        raise ConfigError(source, None, f"invalid YAML{pos}: {problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if getattr(e, "context", None):  # "expected a single document in the stream, but found another document"
            problem = f"{e.context}, {problem}"
        raise ConfigError(source, None, f"invalid YAML at {pos}{problem}") from None
    except RecursionError:
        raise ConfigError(source, None, "YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
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
            # the key is user text: keep the one-line message one line (no newlines, no megabyte keys)
            shown = key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else short_repr(key)
            raise ConfigError(source, join(field, shown),
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
            try:
                v = float(v)
            except OverflowError:  # an integer beyond float range (1e309 written out in digits)
                raise ConfigError(source, path, f"number too large, got {short_repr(obj[key])}") from None
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
        raise ConfigError(source, path, f"expected {want}, got {type_name(v)} {short_repr(v)}")
    if check is not None:
        problem = check(v)
        if problem:
            raise ConfigError(source, path, f"{problem}, got {short_repr(v)}")
    return v


def short_repr(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
