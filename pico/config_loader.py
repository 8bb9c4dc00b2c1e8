"""The one loader of pico's YAML configs: a mapping from a file, `key.path=value` overrides, dataclasses.

A leaf module (it imports nothing from pico but pico.errors), so that every module that reads a config or a
section of one (pico.config, pico.hub, pico.analysis.spec) uses it without importing the others.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from pico.errors import ConfigError


def load_tree(
    path: str | Path | None, overrides=(), sections: bool = True, default: dict | None = None
) -> dict:
    """The mapping in YAML file `path` (or a copy of `default`) with `key.path=value` overrides applied.

    The one loader of every pico config (training runs and analysis specs); errors are ConfigErrors.
    """
    tree = dict(default or {})
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}".splitlines()[0]) from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"{path}: expected a mapping of keys at the top level, got {type(tree).__name__}"
            )
    for override in overrides:
        _set_override(tree, override, sections)
    return tree


def section(tree: dict, key: str) -> dict:
    """The mapping at dotted `key` of `tree` (e.g. `checkpointing.hub`), {} where it is absent or null."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts):
        node = node.get(part)
        node = {} if node is None else node
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: expected a mapping, got {node!r}")
    return node


def build(cls, data: dict, prefix: str):
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and wrong types; `prefix` is the
    dotted key of `data` in the file ("" at the top), which every error names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(key, value, tp)
    return cls(**kwargs)


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`, converting where lossless (int → float, '3e-4' → float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):  # a list entry such as a task: a mapping, or its name alone
        return build(tp, {"name": value} if isinstance(value, str) else value, key)
    if origin is list:
        if isinstance(value, (str, int, float, dict)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:  # float()'s answer to text that is no number: the error below names the key
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no pico key means anything by NaN or ±inf (null disables)
                raise ConfigError(f"{key}: expected a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def _set_override(tree: dict, override: str, sections: bool) -> None:
    """Apply one override to the nested dict `tree`: `section.key=value` (or `section.sub.key=value` for
    a nested section) when `sections`, else `key=value`; the value is parsed as YAML."""
    shape = "section.key" if sections else "key"
    path, sep, raw = override.partition("=")
    parts = path.strip().split(".")
    if not sep or not all(parts) or (len(parts) < 2 if sections else len(parts) != 1):
        raise ConfigError(f"{override}: overrides look like {shape}=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{override}: the value is not YAML ({e})".splitlines()[0]) from None
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{part}: expected a mapping, got {tree!r}")
    tree[parts[-1]] = value
