"""Analysis specs: their keys, DEFAULT_SPEC, and parsing and validation (keys documented in docs/analysis.md).

Specs are read by pico.config_loader (YAML + `key=value` overrides); a bad one is a SpecError, a ConfigError.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pico.config_loader import ConfigError, load_tree
from pico.learning_dynamics import DTYPES as TORCH_DTYPES
from pico.metrics import METRICS
from pico.run_dir import DATA_TYPES, SPLITS

COMPARE = ("steps", "runs")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # the values of the spec key `device`
DTYPES = {
    "auto": None,
    "float32": TORCH_DTYPES["float32"],
    "float64": TORCH_DTYPES["float64"],
}  # compute dtypes

# The analysis `python recipes/analyze.py --run DIR` runs; recipes/configs/analyze.yaml spells out the same.
DEFAULT_SPEC = {
    "name": "default",
    "steps": "all",
    "splits": ["train", "eval"],
    "data_types": ["weights", "gradients"],
    "metrics": [
        "per",
        "condition_number",
        {"name": "norm", "kind": "fro"},
        {"name": "norm", "kind": "nuc"},
        {"name": "norm", "kind": "spectral"},
        {"name": "norm", "kind": "inf"},
        {"name": "cka", "data_types": ["activations"], "splits": ["eval"]},
    ],
    "compare": "steps",
    "target_step": "last",
}
_TOP_KEYS = (
    "name",
    "steps",
    "splits",
    "data_types",
    "components",
    "metrics",
    "compare",
    "target_step",
    "device",
    "dtype",
    "evals",
    "groups",
)
_METRIC_KEYS = ("name", "label", "data_types", "splits", "components", "compare", "target_step")


class SpecError(ConfigError):
    """An analysis spec (YAML or overrides) with an unknown key or an impossible value."""

    kind = "spec error"


@dataclass(frozen=True)
class ComponentSpec:
    """A component by name (a module-name suffix or a registered compound component), optionally
    some layers."""

    name: str
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MetricSpec:
    """One metric entry: its parameters, table label, and what it applies to (None: the spec's default)."""

    name: str
    label: str
    params: tuple[tuple[str, Any], ...] = ()
    data_types: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None
    components: tuple[ComponentSpec, ...] | None = None
    compare: str | None = None
    target_step: int | str | None = None


@dataclass(frozen=True)
class AnalysisSpec:
    """What to compute: metrics × data types × splits × components × steps (docs/analysis.md)."""

    metrics: tuple[MetricSpec, ...]
    name: str = "default"
    steps: str | tuple[int, ...] = "all"
    splits: tuple[str, ...] = SPLITS
    data_types: tuple[str, ...] = DATA_TYPES
    components: tuple[ComponentSpec, ...] | None = None  # None: every captured module
    compare: str = "steps"
    target_step: int | str = "last"
    device: str = "auto"
    dtype: str = "auto"
    evals: tuple[str, ...] = ()  # eval.json selectors: task, task/metric or task/subset/metric
    groups: tuple[tuple[str, str], ...] = ()  # (name, glob of run directories): docs/analysis.md, "Groups"


# ---------------------------------------------------------------- spec parsing


def _names(value, where: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise SpecError(f"{where}: expected a non-empty list of names from {list(allowed)}, got {value!r}")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SpecError(f"{where}: unknown {bad[0]!r}; choose from {list(allowed)}")
    return tuple(items)


def _ints(value, where: str) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not items or not all(type(v) is int and v >= 0 for v in items):
        raise SpecError(f"{where}: expected a non-negative integer or a list of them, got {value!r}")
    return tuple(items)


def _unknown(raw: dict, allowed, where: str):
    for key in raw:
        if key not in allowed:
            raise SpecError(f"{where}{key}: unknown key (allowed: {', '.join(allowed)})")


def _components(value, where: str) -> tuple[ComponentSpec, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: expected a non-empty list of component names or {{name, layers}} entries")
    specs = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SpecError(f"{where}[{i}]: expected a name or a mapping with 'name', got {entry!r}")
        _unknown(entry, ("name", "layers"), f"{where}[{i}].")
        layers = _ints(entry["layers"], f"{where}[{i}].layers") if "layers" in entry else None
        specs.append(ComponentSpec(entry["name"], layers))
    return tuple(specs)


def _compare(value, where: str) -> str:
    if value not in COMPARE:
        raise SpecError(f"{where}: must be one of {list(COMPARE)}, got {value!r}")
    return value


def _target(value, where: str) -> int | str:
    if value != "last" and not (type(value) is int and value >= 0):
        raise SpecError(f"{where}: must be 'last' or a step number, got {value!r}")
    return value


def _label(name: str, params: dict) -> str:
    """`norm` + {kind: fro} -> `norm_fro`; True flags add their key (`cka_debiased`), False ones nothing."""
    parts = [name]
    for key, value in params.items():
        if value is True:
            parts.append(key)
        elif value is not False:
            parts.append(str(value))
    return "_".join(parts)


def _metric(entry, i: int) -> MetricSpec:
    where = f"metrics[{i}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SpecError(f"{where}: expected a metric name or a mapping with 'name', got {entry!r}")
    if entry["name"] not in METRICS:
        known = ", ".join(sorted(METRICS))
        raise SpecError(f"{where}.name: unknown metric {entry['name']!r}; registered: {known}")
    metric = METRICS[entry["name"]]
    _unknown(entry, _METRIC_KEYS + metric.params, f"{where}.")
    params = {k: v for k, v in entry.items() if k in metric.params}
    label = entry.get("label", _label(metric.name, params))
    if not isinstance(label, str) or not label:
        raise SpecError(f"{where}.label: expected a non-empty string, got {label!r}")
    data_types = (
        _names(entry["data_types"], f"{where}.data_types", DATA_TYPES) if "data_types" in entry else None
    )
    for data_type in data_types or ():
        if data_type not in metric.data_types:
            raise SpecError(
                f"{where}.data_types: {metric.name} does not suit {data_type} "
                f"(it suits {', '.join(metric.data_types)})"
            )
    return MetricSpec(
        name=metric.name,
        label=label,
        params=tuple(params.items()),
        data_types=data_types,
        splits=_names(entry["splits"], f"{where}.splits", SPLITS) if "splits" in entry else None,
        components=_components(entry["components"], f"{where}.components") if "components" in entry else None,
        compare=_compare(entry["compare"], f"{where}.compare") if "compare" in entry else None,
        target_step=_target(entry["target_step"], f"{where}.target_step") if "target_step" in entry else None,
    )


def _evals(value) -> tuple[str, ...]:
    """`all` or a list of `task`, `task/metric`, `task/subset/metric` selectors of eval.json numbers."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise SpecError(f"evals: expected a list like [blimp/acc, paloma/perplexity], got {value!r}")
    for i, item in enumerate(items):
        if not 1 <= len(item.split("/")) <= 3 or not all(item.split("/")):
            raise SpecError(f"evals[{i}]: expected task, task/metric or task/subset/metric, got {item!r}")
    return tuple(items)


def _groups(value, where: str = "groups") -> tuple[tuple[str, str], ...]:
    """`{name: glob}`: groups of runs, each the run directories a glob matches (pico.analysis.groups)."""
    if not isinstance(value, dict):
        raise SpecError(
            f"{where}: expected a mapping of NAME: GLOB, e.g. {{base: runs/base-*}}, got {value!r}"
        )
    for name, pattern in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise SpecError(f"{where}: group name {name!r}: expected letters, digits, _ . -")
        if not isinstance(pattern, str) or not pattern:
            raise SpecError(f"{where}: group {name}: expected a glob of run directories, got {pattern!r}")
    return tuple(value.items())


def with_groups(spec: AnalysisSpec, options) -> AnalysisSpec:
    """`spec` with the groups of `--group NAME=GLOB` options added (one replaces a spec group of its name);
    a SpecError for an option that is not NAME=GLOB and for a name given twice."""
    groups, given = dict(spec.groups), set()
    for option in options:
        name, sep, pattern = option.partition("=")
        if not sep:
            raise SpecError(f"--group {option!r}: expected NAME=GLOB, e.g. base='runs/base-*'")
        if name in given:
            raise SpecError(f"--group {option!r}: group {name} given twice")
        given.add(name)
        groups.update(_groups({name: pattern}, f"--group {option!r}"))
    return replace(spec, groups=tuple(groups.items()))


def check_device(device, dtype) -> None:
    """Raise SpecError unless `device` and `dtype` are values of the spec keys of those names."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise SpecError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SpecError(f"dtype: must be one of {list(DTYPES)}, got {dtype!r}")


def parse_spec(raw: dict) -> AnalysisSpec:
    """Validate a spec mapping (as read from YAML); a SpecError names the first bad key."""
    if not isinstance(raw, dict):
        raise SpecError(f"analysis config: expected a mapping of keys, got {type(raw).__name__}")
    _unknown(raw, _TOP_KEYS, "")
    if not isinstance(raw.get("metrics"), list) or not raw["metrics"]:
        raise SpecError("metrics: expected a non-empty list of metric names or {name, ...} entries")
    metrics = tuple(_metric(entry, i) for i, entry in enumerate(raw["metrics"]))
    labels = [m.label for m in metrics]
    for label in labels:
        if labels.count(label) > 1:
            raise SpecError(f"metrics: two entries share the label {label!r}; give one a distinct 'label'")
    name = raw.get("name", "default")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise SpecError(f"name: expected a folder name (letters, digits, _ . -), got {name!r}")
    steps = raw.get("steps", "all")
    if steps != "all":
        steps = tuple(sorted(set(_ints(steps, "steps"))))
    device, dtype = raw.get("device", "auto"), raw.get("dtype", "auto")
    check_device(device, dtype)
    return AnalysisSpec(
        metrics=metrics,
        name=name,
        steps=steps,
        device=device,
        dtype=dtype,
        splits=_names(raw["splits"], "splits", SPLITS) if "splits" in raw else SPLITS,
        data_types=_names(raw["data_types"], "data_types", DATA_TYPES) if "data_types" in raw else DATA_TYPES,
        components=_components(raw["components"], "components") if "components" in raw else None,
        compare=_compare(raw.get("compare", "steps"), "compare"),
        target_step=_target(raw.get("target_step", "last"), "target_step"),
        evals=_evals(raw.get("evals", [])),
        groups=_groups(raw.get("groups", {})),
    )


def load_spec(path=None, overrides=()) -> AnalysisSpec:
    """The spec in YAML file `path` (default: DEFAULT_SPEC) with `key=value` overrides (values parsed
    as YAML)."""
    if path is not None and not Path(path).is_file():
        raise SpecError(f"{path}: no such config file")
    try:
        raw = load_tree(path, overrides, sections=False, default=DEFAULT_SPEC)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    if path is not None:
        raw.setdefault("name", Path(path).stem)
    return parse_spec(raw)
