"""Learning-dynamics analysis: metrics × components × checkpoints → a tidy table, tensorboard scalars, plots.

    spec = load_spec("recipes/configs/analyze_ov.yaml", ["steps=[0,1000]"])   # or parse_spec({...})
    rows = analyze(["runs/tiny"], spec)        # list[Row], the tidy table
    save(rows, ["runs/tiny"], spec, plot=True)  # runs/tiny/analysis/<name>/{metrics.csv, tensorboard/, plots/}

Reads the run directory of contract 3 (`checkpoints/step_<N>/learning_dynamics/*.safetensors`). Every
checkpoint is opened once and read lazily: only the tensors a metric asks for, each at most once, straight
onto the compute device. The spec keys and output format are documented in docs/analysis.md.
"""

import csv
import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from safetensors import safe_open

from pico.components import COMPONENTS, DATA_TYPES, matches
from pico.metrics import get_metric

COLUMNS = ("run", "step", "split", "data_type", "component", "layer", "head", "metric", "value")
SPLITS = ("train", "eval")
COMPARE = ("steps", "runs")
DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}

# The analysis `python recipes/analyze.py --run DIR` runs; recipes/configs/analyze.yaml spells out the same.
DEFAULT_SPEC = {
    "name": "default",
    "steps": "all",
    "splits": ["train", "eval"],
    "data_types": ["weights", "gradients"],
    "metrics": ["per", "condition_number",
                {"name": "norm", "kind": "fro"}, {"name": "norm", "kind": "nuc"},
                {"name": "norm", "kind": "spectral"}, {"name": "norm", "kind": "inf"},
                {"name": "cka", "data_types": ["activations"], "splits": ["eval"]}],
    "compare": "steps",
    "target_step": "last",
}
_TOP_KEYS = ("name", "steps", "splits", "data_types", "components", "metrics", "compare", "target_step",
             "device", "dtype")
_METRIC_KEYS = ("name", "label", "data_types", "splits", "components", "compare", "target_step")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class Row(NamedTuple):
    """One value of the tidy table; split, layer and head are None where they do not apply."""

    run: str
    step: int
    split: str | None
    data_type: str
    component: str
    layer: int | None
    head: int | None
    metric: str
    value: float


class SpecError(ValueError):
    """An analysis spec (YAML or overrides) with an unknown key or an impossible value."""


@dataclass(frozen=True)
class ComponentSpec:
    """A component by name (a module-name suffix or a registered compound component), optionally some layers."""

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
    try:
        metric = get_metric(entry["name"])
    except ValueError as e:
        raise SpecError(f"{where}.name: {e}") from None
    _unknown(entry, _METRIC_KEYS + metric.params, f"{where}.")
    params = {k: v for k, v in entry.items() if k in metric.params}
    label = entry.get("label", _label(metric.name, params))
    if not isinstance(label, str) or not label:
        raise SpecError(f"{where}.label: expected a non-empty string, got {label!r}")
    data_types = _names(entry["data_types"], f"{where}.data_types", DATA_TYPES) if "data_types" in entry else None
    for data_type in data_types or ():
        if data_type not in metric.data_types:
            raise SpecError(f"{where}.data_types: {metric.name} does not suit {data_type} "
                            f"(it suits {', '.join(metric.data_types)})")
    return MetricSpec(
        name=metric.name, label=label, params=tuple(params.items()), data_types=data_types,
        splits=_names(entry["splits"], f"{where}.splits", SPLITS) if "splits" in entry else None,
        components=_components(entry["components"], f"{where}.components") if "components" in entry else None,
        compare=_compare(entry["compare"], f"{where}.compare") if "compare" in entry else None,
        target_step=_target(entry["target_step"], f"{where}.target_step") if "target_step" in entry else None)


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
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise SpecError(f"name: expected a folder name (letters, digits, _ . -), got {name!r}")
    steps = raw.get("steps", "all")
    if steps != "all":
        steps = tuple(sorted(set(_ints(steps, "steps"))))
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise SpecError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if raw.get("dtype", "auto") not in DTYPES:
        raise SpecError(f"dtype: must be one of {list(DTYPES)}, got {raw['dtype']!r}")
    return AnalysisSpec(
        metrics=metrics, name=name, steps=steps, device=device, dtype=raw.get("dtype", "auto"),
        splits=_names(raw["splits"], "splits", SPLITS) if "splits" in raw else SPLITS,
        data_types=_names(raw["data_types"], "data_types", DATA_TYPES) if "data_types" in raw else DATA_TYPES,
        components=_components(raw["components"], "components") if "components" in raw else None,
        compare=_compare(raw.get("compare", "steps"), "compare"),
        target_step=_target(raw.get("target_step", "last"), "target_step"))


def load_spec(path=None, overrides=()) -> AnalysisSpec:
    """The spec in YAML file `path` (default: DEFAULT_SPEC) with `key=value` overrides (values parsed as YAML)."""
    raw = dict(DEFAULT_SPEC)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such config file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: expected a mapping of keys at the top level")
        raw.setdefault("name", path.stem)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{item!r}: overrides look like key=value, e.g. steps=[0,100]")
        if key not in _TOP_KEYS:
            raise SpecError(f"{key}: unknown key (allowed: {', '.join(_TOP_KEYS)})")
        raw[key] = yaml.safe_load(value)
    return parse_spec(raw)


# ---------------------------------------------------------------- run directories


def discover_steps(run_dir) -> list[int]:
    """Steps N of `<run_dir>/checkpoints/step_<N>/` that hold `learning_dynamics/`, ascending."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"{run_dir}: not a run directory (no checkpoints/ folder)")
    steps = sorted(int(m.group(1)) for p in checkpoints.iterdir()
                   if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "learning_dynamics").is_dir())
    if not steps:
        raise ValueError(f"{checkpoints}: no step_<N>/learning_dynamics/ folders")
    return steps


class Checkpoint:
    """One checkpoint's learning dynamics, read lazily: files opened once, each tensor read at most once."""

    def __init__(self, run_dir, step: int, device: torch.device, dtype: torch.dtype):
        self.step, self.device, self.dtype = step, device, dtype
        self.dir = Path(run_dir) / "checkpoints" / f"step_{step}"
        self._files, self._tensors, self._derived, self._config = {}, {}, {}, None

    def _file(self, name: str):
        if name not in self._files:
            path = self.dir / "learning_dynamics" / f"{name}.safetensors"
            if not path.is_file():
                raise ValueError(f"{path}: missing")
            self._files[name] = safe_open(path, framework="pt", device=str(self.device))
        return self._files[name]

    def modules(self, data_type: str, split: str | None) -> list[str]:
        """Full module names that have `data_type` tensors (in `split`'s file, or weights.safetensors)."""
        prefix = data_type + "."
        return [k[len(prefix):] for k in self._file(split or "weights").keys() if k.startswith(prefix)]

    def load(self, data_type: str, module: str, split: str | None = None) -> torch.Tensor:
        """Tensor `<data_type>.<module>` on the compute device and dtype (weights ignore `split`)."""
        file = "weights" if data_type == "weights" else split
        key = f"{data_type}.{module}"
        if (file, key) not in self._tensors:
            handle = self._file(file)
            if key not in handle.keys():
                raise ValueError(f"{self.dir}/learning_dynamics/{file}.safetensors: no tensor {key!r}")
            self._tensors[file, key] = handle.get_tensor(key).to(self.dtype)
        return self._tensors[file, key]

    def input_ids(self, split: str) -> torch.Tensor | None:
        """The split's input_ids, or None when the file has none."""
        if (split, "input_ids") not in self._tensors:
            handle = self._file(split)
            self._tensors[split, "input_ids"] = handle.get_tensor("input_ids") if "input_ids" in handle.keys() else None
        return self._tensors[split, "input_ids"]

    @property
    def model_config(self) -> dict:
        """The HF config.json of `step_<N>/model/`."""
        if self._config is None:
            path = self.dir / "model" / "config.json"
            if not path.is_file():
                raise ValueError(f"{path}: missing (compound components read n_heads from it)")
            self._config = json.loads(path.read_text())
        return self._config

    def component(self, name: str, layer: int, data_type: str, split: str | None) -> torch.Tensor:
        """Compound component `name` at `layer`, computed once per checkpoint."""
        key = (name, layer, data_type, split)
        if key not in self._derived:
            self._derived[key] = COMPONENTS[name].fn(_SplitSource(self, split), layer, data_type)
        return self._derived[key]


class _SplitSource:
    """A checkpoint seen through one split: what compound components read from."""

    def __init__(self, checkpoint: Checkpoint, split: str | None):
        self.checkpoint, self.split = checkpoint, split

    def load(self, data_type: str, module: str) -> torch.Tensor:
        return self.checkpoint.load(data_type, module, self.split)

    @property
    def model_config(self) -> dict:
        return self.checkpoint.model_config


def _suffix(module: str) -> str:
    return _LAYER.sub("", module)


def _layer(module: str) -> int | None:
    m = _LAYER.match(module)
    return int(m.group(1)) if m else None


def _selections(ckpt: Checkpoint, comp: ComponentSpec, data_type: str, split: str | None):
    """(layer, module) pairs for a simple component, (layer, None) for a compound one, sorted by layer."""
    if comp.name in COMPONENTS:
        weights = set(ckpt.modules("weights", None))
        found = sorted(int(m.group(1)) for module in weights if (m := _LAYER.match(module))
                       and all(f"layers.{m.group(1)}.{s}" in weights for s in COMPONENTS[comp.name].modules))
        pairs = [(layer, None) for layer in dict.fromkeys(found)]
    else:
        pairs = sorted(((_layer(m), m) for m in ckpt.modules(data_type, split) if matches(m, comp.name)),
                       key=lambda p: -1 if p[0] is None else p[0])
    if not pairs:
        raise ValueError(f"{ckpt.dir}: no captured {data_type} for component {comp.name!r}")
    if comp.layers is None:
        return pairs
    missing = set(comp.layers) - {layer for layer, _ in pairs}
    if missing:
        raise ValueError(f"{ckpt.dir}: component {comp.name!r} has no layer {min(missing)} "
                         f"(captured layers: {[layer for layer, _ in pairs]})")
    return [p for p in pairs if p[0] in comp.layers]


# ---------------------------------------------------------------- computation


@dataclass(frozen=True)
class _Task:
    """A metric entry resolved against the spec's defaults."""

    spec: MetricSpec
    data_types: tuple[str, ...]
    splits: tuple[str, ...]
    components: tuple[ComponentSpec, ...] | None
    compare: str
    target_step: int | str


def _tasks(spec: AnalysisSpec) -> list[_Task]:
    tasks = []
    for i, m in enumerate(spec.metrics):
        metric = get_metric(m.name)
        data_types = m.data_types or tuple(d for d in spec.data_types if d in metric.data_types)
        if not data_types:
            raise SpecError(f"metrics[{i}]: {m.name} suits {', '.join(metric.data_types)}, none of data_types "
                            f"{list(spec.data_types)}; give it its own data_types")
        compare, splits = m.compare or spec.compare, m.splits or spec.splits
        if metric.comparative and compare == "steps":
            if m.splits and "train" in m.splits:
                raise SpecError(f"metrics[{i}].splits: {m.name} compares steps, and the train split holds a "
                                "different batch at every step; use splits: [eval]")
            splits = tuple(s for s in splits if s != "train")
            if not splits and "weights" not in data_types:
                raise SpecError(f"metrics[{i}]: {m.name} compares steps, which needs the eval split; "
                                "give it splits: [eval]")
        tasks.append(_Task(m, data_types, splits, m.components or spec.components, compare,
                           m.target_step if m.target_step is not None else spec.target_step))
    return tasks


def _measure(metric, params: dict, dtype, x: torch.Tensor, ref: torch.Tensor | None) -> float:
    kwargs = dict(params, dtype=dtype) if "dtype" in metric.__signature__.parameters else params
    return float(metric(x, **kwargs) if ref is None else metric(x, ref, **kwargs))


def _tensor(ckpt: Checkpoint, component: str, layer, module, data_type: str, split) -> torch.Tensor:
    """A simple component's tensor (module given) or a compound component's (module None)."""
    if module is None:
        return ckpt.component(component, layer, data_type, split)
    return ckpt.load(data_type, module, split)


def _task_rows(run: str, ckpt: Checkpoint, task: _Task, ref: Checkpoint | None, label: str) -> list[Row]:
    """All rows of one metric entry at one checkpoint (compared against `ref` for comparative metrics)."""
    metric, params, rows = get_metric(task.spec.name), dict(task.spec.params), []
    for data_type in task.data_types:
        for split in (None,) if data_type == "weights" else task.splits:
            if ref is not None and split is not None:
                ids, ref_ids = ckpt.input_ids(split), ref.input_ids(split)
                if ids is not None and ref_ids is not None and not torch.equal(ids, ref_ids):
                    raise ValueError(f"{task.spec.label}: {split} input_ids of {ckpt.dir} and {ref.dir} differ, "
                                     "so their activations describe different samples")
            components = task.components or [ComponentSpec(s) for s in
                                              dict.fromkeys(_suffix(m) for m in ckpt.modules(data_type, split))]
            for comp in components:
                compound = COMPONENTS.get(comp.name)
                if compound is not None and data_type not in compound.data_types:
                    continue
                for layer, module in _selections(ckpt, comp, data_type, split):
                    x = _tensor(ckpt, comp.name, layer, module, data_type, split)
                    y = None if ref is None else _tensor(ref, comp.name, layer, module, data_type, split)
                    heads = range(x.shape[0]) if compound and compound.per_head else [None]
                    for head in heads:
                        try:
                            value = _measure(metric, params, ckpt.dtype, x if head is None else x[head],
                                             None if y is None else (y if head is None else y[head]))
                        except ValueError as e:
                            where = " ".join(str(p) for p in (ckpt.dir, split, data_type, module or comp.name)
                                             if p is not None)
                            raise ValueError(f"{where}: {e}") from None
                        rows.append(Row(run, ckpt.step, split, data_type, comp.name, layer, head, label, value))
    return rows


def run_names(runs) -> list[str]:
    """Run names for the table: each run directory's folder name (they must differ)."""
    names = [Path(r).resolve().name for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two runs are both named {name!r}; the run column needs distinct folder names")
    return names


def _device_dtype(spec: AnalysisSpec) -> tuple[torch.device, torch.dtype]:
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device: {spec.device} asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[spec.dtype] or (torch.float64 if device.type == "cpu" else torch.float32)
    return device, dtype


def analyze(runs, spec: AnalysisSpec | dict | None = None, progress: bool = True) -> list[Row]:
    """Compute every metric of `spec` (default: DEFAULT_SPEC) over the checkpoints of each run directory."""
    from tqdm.auto import tqdm

    spec = spec if isinstance(spec, AnalysisSpec) else parse_spec(DEFAULT_SPEC if spec is None else spec)
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("analyze: no run directories given")
    names = dict(zip(runs, run_names(runs)))
    device, dtype = _device_dtype(spec)
    tasks = _tasks(spec)
    if any(t.compare == "runs" and get_metric(t.spec.name).comparative for t in tasks) and len(runs) < 2:
        raise SpecError("compare: 'runs' compares each run with the first, so it needs at least two --run")
    available = {run: discover_steps(run) for run in runs}
    selected = {}
    for run in runs:
        missing = [] if spec.steps == "all" else sorted(set(spec.steps) - set(available[run]))
        if missing:
            raise ValueError(f"{run}: no step {missing[0]} with learning_dynamics (steps: {available[run]})")
        selected[run] = available[run] if spec.steps == "all" else list(spec.steps)
    pinned: dict[tuple[Path, int], Checkpoint] = {}  # comparison targets, kept for the whole pass

    def checkpoint(run, step, keep=False):
        if (run, step) in pinned:
            return pinned[run, step]
        ckpt = Checkpoint(run, step, device, dtype)
        if keep:
            pinned[run, step] = ckpt
        return ckpt

    targets = {}
    for i, task in enumerate(tasks):
        if get_metric(task.spec.name).comparative and task.compare == "steps":
            for run in runs:
                target = available[run][-1] if task.target_step == "last" else task.target_step
                if target not in available[run]:
                    raise ValueError(f"{run}: target_step {target} has no learning_dynamics "
                                     f"(steps: {available[run]})")
                targets[i, run] = target

    rows = []
    steps = sorted(set().union(*selected.values()))
    with tqdm(total=sum(map(len, selected.values())), desc="analysis", unit="ckpt", disable=not progress) as bar:
        for step in steps:
            ckpts = {run: checkpoint(run, step) for run in runs if step in selected[run]}
            for run, ckpt in ckpts.items():
                for i, task in enumerate(tasks):
                    ref, label = None, task.spec.label
                    if get_metric(task.spec.name).comparative and task.compare == "steps":
                        ref = checkpoint(run, targets[i, run], keep=True)
                        label = f"{label}@step_{ref.step}"
                    elif get_metric(task.spec.name).comparative:
                        if run == runs[0] or runs[0] not in ckpts:
                            continue
                        ref, label = ckpts[runs[0]], f"{label}@{names[runs[0]]}"
                    rows.extend(_task_rows(names[run], ckpt, task, ref, label))
                bar.update()
    return rows


# ---------------------------------------------------------------- outputs


def write_csv(rows, path) -> Path:
    """The tidy table: header COLUMNS, empty cells for split/layer/head where they do not apply, nan/inf as such."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    return path


def read_csv(path) -> list[Row]:
    """Rows back from a metrics.csv written by `write_csv`."""
    def opt(v, cast):
        return None if v == "" else cast(v)

    with open(path, newline="") as f:
        return [Row(r["run"], int(r["step"]), opt(r["split"], str), r["data_type"], r["component"],
                    opt(r["layer"], int), opt(r["head"], int), r["metric"], float(r["value"]))
                for r in csv.DictReader(f)]


def scalar_tag(row: Row) -> str:
    """Tensorboard tag `<metric>/<data_type>[/<split>]/<component>[/layer_<l>][/head_<h>]`."""
    parts = [row.metric, row.data_type, row.split, row.component,
             None if row.layer is None else f"layer_{row.layer}", None if row.head is None else f"head_{row.head}"]
    return "/".join(p for p in parts if p is not None)


def write_tensorboard(rows, log_dir) -> Path:
    """Each row as a scalar `scalar_tag(row)` at global step `row.step` (NaN and inf included)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for row in rows:
            writer.add_scalar(scalar_tag(row), row.value, global_step=row.step)
    return Path(log_dir)


def plot_rows(rows, out_dir) -> list[Path]:
    """One PNG per (metric, data type, component, split): the metric against step, one line per layer.

    Per-head components plot the mean over heads with a band from the smallest to the largest head.
    NaN and inf are left out of the lines and counted in the title.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'pico[plot]'") from None
    groups = defaultdict(list)
    for row in rows:
        groups[row.run, row.metric, row.data_type, row.component, row.split].append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (run, metric, data_type, component, split), group in sorted(groups.items(), key=str):
        fig = Figure(figsize=(5.8, 3.4), dpi=150)
        ax = fig.add_subplot()
        layers = sorted({r.layer for r in group}, key=lambda layer: -1 if layer is None else layer)
        hidden, heads = 0, len({r.head for r in group})
        for i, layer in enumerate(layers):
            by_step = defaultdict(list)
            for r in group:
                if r.layer == layer:
                    by_step[r.step].append(r.value)
            steps = sorted(by_step)
            values = [np.asarray(by_step[s], dtype=float) for s in steps]  # one value per head
            hidden += sum(int((~np.isfinite(v)).sum()) for v in values)
            finite = [v[np.isfinite(v)] for v in values]
            color = colormaps["viridis"](0.85 * i / max(len(layers) - 1, 1))  # dark blue to green
            ax.plot(steps, [f.mean() if f.size else np.nan for f in finite], marker="o", markersize=3,
                    linewidth=1.5, color=color, label=component if layer is None else f"layer {layer}")
            if heads > 1:
                ax.fill_between(steps, [f.min() if f.size else np.nan for f in finite],
                                [f.max() if f.size else np.nan for f in finite], color=color, alpha=0.2, lw=0)
        notes = [f"mean of {heads} heads, band min to max"] if heads > 1 else []
        notes += [f"{hidden} non-finite values not shown"] if hidden else []
        title = f"{component} · {data_type}" + (f" ({split})" if split else "")
        ax.set_title("\n".join([title, "; ".join(notes)] if notes else [title]), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False, ncol=1 + len(layers) // 12, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        stem = "__".join([metric, data_type, split or "weights", component])
        path = out_dir / (re.sub(r"[^\w.@=-]+", "_", stem) + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths


def save(rows, runs, spec: AnalysisSpec, plot: bool = False) -> list[Path]:
    """Write each run's rows to `<run_dir>/analysis/<spec.name>/` (replacing an earlier analysis of that name)."""
    written = []
    for run, name in zip(runs, run_names(runs)):
        out = Path(run) / "analysis" / spec.name
        for old in (out / "tensorboard", out / "plots"):
            shutil.rmtree(old, ignore_errors=True)
        mine = [r for r in rows if r.run == name]
        written.append(write_csv(mine, out / "metrics.csv"))
        written.append(write_tensorboard(mine, out / "tensorboard"))
        if plot:
            written.extend(plot_rows(mine, out / "plots"))
    return written
