"""The analysis pass: every metric of a spec over the checkpoints of each run, as rows of the tidy table."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pico.analysis.checkpoints import Checkpoint
from pico.analysis.evals import eval_rows, select_evals
from pico.analysis.spec import (
    DEFAULT_SPEC,
    DTYPES,
    AnalysisSpec,
    ComponentSpec,
    MetricSpec,
    SpecError,
    parse_spec,
)
from pico.analysis.table import Row, Rows
from pico.components import COMPONENTS
from pico.errors import AnalysisError
from pico.metrics import Metric, get_metric
from pico.run_dir import list_steps, module_matches

_LAYER = re.compile(r"^layers\.(\d+)\.")
SVD_NORMS = ("nuc", "spectral")  # the norm kinds computed from singular values


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
            raise SpecError(
                f"metrics[{i}]: {m.name} suits {', '.join(metric.data_types)}, none of data_types "
                f"{list(spec.data_types)}; give it its own data_types"
            )
        compare, splits = m.compare or spec.compare, m.splits or spec.splits
        if metric.comparative and compare == "steps":
            if m.splits and "train" in m.splits:
                raise SpecError(
                    f"metrics[{i}].splits: {m.name} compares steps, and the train split holds a "
                    "different batch at every step; use splits: [eval]"
                )
            splits = tuple(s for s in splits if s != "train")
            if not splits and "weights" not in data_types:
                raise SpecError(
                    f"metrics[{i}]: {m.name} compares steps, which needs the eval split; "
                    "give it splits: [eval]"
                )
        tasks.append(
            _Task(
                m,
                data_types,
                splits,
                m.components or spec.components,
                compare,
                m.target_step if m.target_step is not None else spec.target_step,
            )
        )
    return tasks


def _suffix(module: str) -> str:
    return _LAYER.sub("", module)


def _layer(module: str) -> int | None:
    m = _LAYER.match(module)
    return int(m.group(1)) if m else None


def _selections(ckpt: Checkpoint, comp: ComponentSpec, data_type: str, split: str | None):
    """(layer, module) pairs for a simple component, (layer, None) for a compound one, sorted by layer."""
    if comp.name in COMPONENTS:
        weights = set(ckpt.modules("weights", None))
        found = sorted(
            int(m.group(1))
            for module in weights
            if (m := _LAYER.match(module))
            and all(f"layers.{m.group(1)}.{s}" in weights for s in COMPONENTS[comp.name].modules)
        )
        pairs = [(layer, None) for layer in dict.fromkeys(found)]
    else:
        pairs = sorted(
            ((_layer(m), m) for m in ckpt.modules(data_type, split) if module_matches(m, comp.name)),
            key=lambda p: -1 if p[0] is None else p[0],
        )
    if not pairs:
        raise AnalysisError(f"{ckpt.dir}: no captured {data_type} for component {comp.name!r}")
    if comp.layers is None:
        return pairs
    missing = set(comp.layers) - {layer for layer, _ in pairs}
    if missing:
        raise AnalysisError(
            f"{ckpt.dir}: component {comp.name!r} has no layer {min(missing)} "
            f"(captured layers: {[layer for layer, _ in pairs]})"
        )
    return [p for p in pairs if p[0] in comp.layers]


def _uses_sv(metric: Metric, params: dict) -> bool:
    """Whether the metric with these parameters computes singular values (norm does for nuc and spectral)."""
    return metric.takes_sv and (metric.name != "norm" or params.get("kind", "fro") in SVD_NORMS)


def _measure(metric: Metric, kwargs: dict, x: torch.Tensor, ref: torch.Tensor | None, sv) -> float:
    kwargs = kwargs if sv is None else dict(kwargs, sv=sv)
    return float(metric.fn(x, **kwargs) if ref is None else metric.fn(x, ref, **kwargs))


def _tensor(ckpt: Checkpoint, component: str, layer, module, data_type: str, split) -> torch.Tensor:
    """A simple component's tensor (module given) or a compound component's (module None)."""
    if module is None:
        return ckpt.component(component, layer, data_type, split)
    return ckpt.load(data_type, module, split)


def _task_rows(run: str, ckpt: Checkpoint, task: _Task, ref: Checkpoint | None, label: str) -> list[Row]:
    """All rows of one metric entry at one checkpoint (compared against `ref` for comparative metrics)."""
    metric, params, rows = get_metric(task.spec.name), dict(task.spec.params), []
    shares_sv = ref is None and _uses_sv(metric, params)
    if "dtype" in metric.__signature__.parameters:
        params["dtype"] = ckpt.dtype
    for data_type in task.data_types:
        for split in (None,) if data_type == "weights" else task.splits:
            if ref is not None and split is not None:
                ids, ref_ids = ckpt.input_ids(split), ref.input_ids(split)
                if ids is not None and ref_ids is not None and not torch.equal(ids, ref_ids):
                    raise AnalysisError(
                        f"{task.spec.label}: {split} input_ids of {ckpt.dir} and {ref.dir} differ, "
                        "so their activations describe different samples"
                    )
            components = task.components or [
                ComponentSpec(s) for s in dict.fromkeys(_suffix(m) for m in ckpt.modules(data_type, split))
            ]
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
                            key = (data_type, split, comp.name, layer, module, head)
                            value = _measure(
                                metric,
                                params,
                                x if head is None else x[head],
                                None if y is None else (y if head is None else y[head]),
                                ckpt.singular_values(key, x if head is None else x[head])
                                if shares_sv
                                else None,
                            )
                        except AnalysisError as e:  # a metric or component refused the tensor
                            where = " ".join(
                                str(p)
                                for p in (ckpt.dir, split, data_type, module or comp.name)
                                if p is not None
                            )
                            raise AnalysisError(f"{where}: {e}") from None
                        rows.append(
                            Row(run, ckpt.step, split, data_type, comp.name, layer, head, label, value)
                        )
    return rows


def run_names(runs) -> list[str]:
    """Run names for the table: each run directory's folder name (they must differ)."""
    names = [Path(r).resolve().name for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise AnalysisError(
                f"two runs are both named {name!r}; the run column needs distinct folder names"
            )
    return names


def compute_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype of the spec keys `device` and `dtype` (auto: a GPU in float32 when
    torch sees one, else the CPU in float64)."""
    name = device
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise SpecError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device: {name} asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype not in DTYPES:
        raise SpecError(f"dtype: must be one of {list(DTYPES)}, got {dtype!r}")
    return device, DTYPES[dtype] or (torch.float64 if device.type == "cpu" else torch.float32)


def _selected_steps(runs: list[Path], spec: AnalysisSpec) -> tuple[dict, dict]:
    """(steps with learning dynamics, steps to analyse) per run; a missing requested step is an error."""
    available = {run: list_steps(run) for run in runs}
    selected = {}
    for run in runs:
        missing = [] if spec.steps == "all" else sorted(set(spec.steps) - set(available[run]))
        if missing:
            raise AnalysisError(
                f"{run}: no step {missing[0]} with learning_dynamics (steps: {available[run]})"
            )
        selected[run] = available[run] if spec.steps == "all" else list(spec.steps)
    return available, selected


def _target_steps(tasks: list[_Task], runs: list[Path], available: dict) -> dict:
    """The step each comparative `compare: steps` entry compares against, per (entry index, run)."""
    targets = {}
    for i, task in enumerate(tasks):
        if get_metric(task.spec.name).comparative and task.compare == "steps":
            for run in runs:
                target = available[run][-1] if task.target_step == "last" else task.target_step
                if target not in available[run]:
                    raise AnalysisError(
                        f"{run}: target_step {target} has no learning_dynamics (steps: {available[run]})"
                    )
                targets[i, run] = target
    return targets


def analyze(runs, spec: AnalysisSpec | dict | None = None, progress: bool = True) -> Rows:
    """Compute every metric of `spec` (default: DEFAULT_SPEC) over the checkpoints of each run directory,
    then add the eval.json numbers that `spec.evals` selects (data_type `eval`)."""
    from tqdm.auto import tqdm

    spec = spec if isinstance(spec, AnalysisSpec) else parse_spec(DEFAULT_SPEC if spec is None else spec)
    runs = [Path(r) for r in runs]
    if not runs:
        raise AnalysisError("analyze: no run directories given")
    names = dict(zip(runs, run_names(runs)))
    device, dtype = compute_device(spec.device, spec.dtype)
    tasks = _tasks(spec)
    if any(t.compare == "runs" and get_metric(t.spec.name).comparative for t in tasks) and len(runs) < 2:
        raise SpecError("compare: 'runs' compares each run with the first, so it needs at least two --run")
    available, selected = _selected_steps(runs, spec)
    targets = _target_steps(tasks, runs, available)
    pinned = {(run, step): Checkpoint(run, step, device, dtype) for (_, run), step in targets.items()}  # kept

    def checkpoint(run, step):
        return pinned.get((run, step)) or Checkpoint(run, step, device, dtype)

    rows = Rows()
    steps = sorted(set().union(*selected.values()))
    with tqdm(
        total=sum(map(len, selected.values())), desc="analysis", unit="ckpt", disable=not progress
    ) as bar:
        for step in steps:
            ckpts = {run: checkpoint(run, step) for run in runs if step in selected[run]}
            for run, ckpt in ckpts.items():
                for i, task in enumerate(tasks):
                    ref, label = None, task.spec.label
                    if (i, run) in targets:
                        ref = pinned[run, targets[i, run]]
                        label = f"{label}@step_{ref.step}"
                    elif get_metric(task.spec.name).comparative:
                        if run == runs[0] or runs[0] not in ckpts:
                            continue
                        ref, label = ckpts[runs[0]], f"{label}@{names[runs[0]]}"
                    rows.extend(_task_rows(names[run], ckpt, task, ref, label))
                bar.update()
    for run in runs if spec.evals else ():
        for e in select_evals(eval_rows(run), spec.evals, run):
            if spec.steps == "all" or e.step in spec.steps:
                component = e.task if e.subset is None else f"{e.task}/{e.subset}"
                rows.append(Row(names[run], e.step, None, "eval", component, None, None, e.metric, e.value))
    return rows
