"""The analysis pass: every metric of a spec over the checkpoints of each run, as rows of the tidy table.

A step without a split (pico-train's final step has only val) has no rows for it, and a data type a file
refuses (pico-train's one-device activations) has none either: `analyze` says so, one line per run, on stderr.
"""

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pico.analysis.checkpoints import BATCH_MEAN, Checkpoint
from pico.analysis.device import compute_device
from pico.analysis.evals import eval_rows, select_evals
from pico.analysis.spec import DEFAULT_SPEC, AnalysisSpec, ComponentSpec, MetricSpec, SpecError, parse_spec
from pico.analysis.table import Row, Rows
from pico.components import COMPONENTS
from pico.errors import AnalysisError
from pico.metrics import Metric, get_metric
from pico.run_dir import dynamics_file, list_steps, module_matches, run_name, step_dir

_LAYER = re.compile(r"^layers\.(\d+)\.")
SVD_NORMS = ("nuc", "spectral")  # the norm kinds computed from singular values


@dataclass(frozen=True)
class _ResolvedMetric:
    """One metric entry of a spec, the spec's defaults filled in: what it measures, where, against what."""

    spec: MetricSpec
    data_types: tuple[str, ...]
    splits: tuple[str, ...]
    components: tuple[ComponentSpec, ...] | None
    compare: str
    target_step: int | str


def _resolve_metrics(spec: AnalysisSpec) -> list[_ResolvedMetric]:
    """The spec's metric entries, its defaults filled in; a SpecError for an entry that measures nothing."""
    resolved = []
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
        resolved.append(
            _ResolvedMetric(
                m,
                data_types,
                splits,
                m.components or spec.components,
                compare,
                m.target_step if m.target_step is not None else spec.target_step,
            )
        )
    return resolved


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


def _measured(ckpt: Checkpoint, entry: _ResolvedMetric, ref: Checkpoint | None) -> Iterator[tuple]:
    """(data_type, split, component, layer, module) of every tensor that `entry` measures at `ckpt`;
    module None for a compound component. Comparing with `ref` needs the same samples in both."""
    for data_type in entry.data_types:
        for split in (None,) if data_type == "weights" else entry.splits:
            if not _readable(ckpt, data_type, split) or (
                ref is not None and not _readable(ref, data_type, split)
            ):
                continue  # analyze() has said so
            if ref is not None and data_type == "activations":
                _same_positions(ckpt, ref, split, entry.spec.label)
            if ref is not None and split is not None:
                ids, ref_ids = ckpt.input_ids(split), ref.input_ids(split)
                if ids is not None and ref_ids is not None and not torch.equal(ids, ref_ids):
                    raise AnalysisError(
                        f"{entry.spec.label}: {split} input_ids of {ckpt.dir} and {ref.dir} differ, "
                        "so their activations describe different samples"
                    )
            components = entry.components or [  # every captured module (opens the split's file)
                ComponentSpec(s) for s in dict.fromkeys(_suffix(m) for m in ckpt.modules(data_type, split))
            ]
            for comp in components:
                compound = COMPONENTS.get(comp.name)
                if compound is not None and data_type not in compound.data_types:
                    continue
                for layer, module in _selections(ckpt, comp, data_type, split):
                    yield data_type, split, comp.name, layer, module


def _same_positions(ckpt: Checkpoint, ref: Checkpoint, split: str, label: str) -> None:
    """Raise unless both checkpoints captured `split`'s activations at the same positions."""
    positions, ref_positions = (c.metadata(split).get("positions", "last") for c in (ckpt, ref))
    if positions != ref_positions:
        raise AnalysisError(
            f"{label}: {split} activations of {ckpt.dir} are at positions {positions!r} and of {ref.dir} "
            f"at {ref_positions!r}, so they describe different tokens"
        )


def _readable(ckpt: Checkpoint, data_type: str, split: str | None) -> bool:
    """Whether the step has `split` and its file does not refuse `data_type`."""
    return ckpt.has(split) and not ckpt.refused(data_type, split)


def _read_splits(entries: list[_ResolvedMetric], data_types=("activations", "gradients")) -> list[str]:
    """The splits the entries read `data_types` from."""
    return sorted({s for e in entries if set(e.data_types) & set(data_types) for s in e.splits})


def _first(run: Path, steps: list[int], split: str) -> Checkpoint | None:
    """The first of `steps` that has `split` (on the CPU: only its metadata is read), or None."""
    step = next((s for s in steps if dynamics_file(step_dir(run, s), split).is_file()), None)
    return None if step is None else Checkpoint(run, step, torch.device("cpu"), torch.float32)


def _notes(run: Path, steps: list[int], entries: list[_ResolvedMetric]) -> list[str]:
    """What the run's rows will lack and why, one note each: the steps without a split the spec reads, the
    data types its files refuse, gradients that are not the batch mean."""
    gaps, refused, notes = [], {}, []
    for split in _read_splits(entries):
        missing = [s for s in steps if not dynamics_file(step_dir(run, s), split).is_file()]
        if missing:
            gaps.append(f"no {split} split at step{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}")
        ckpt = _first(run, steps, split)
        if ckpt is None:
            continue
        for data_type in ("activations", "gradients"):
            reason = ckpt.refused(data_type, split)
            if reason and split in _read_splits(entries, (data_type,)):
                refused.setdefault((data_type, reason), []).append(split)
        meaning = ckpt.gradients_meaning(split)
        if meaning != BATCH_MEAN and split in _read_splits(entries, ("gradients",)):
            notes.append(f"{split} gradients are the {meaning}, not the batch mean")
    refusals = [f"{d} ({', '.join(s)}) are not analysed: {reason}" for (d, reason), s in refused.items()]
    return ([f"{'; '.join(gaps)} (no rows for those)"] if gaps else []) + refusals + notes


def _check_gradients(runs: list[Path], names: dict, selected: dict, entries: list[_ResolvedMetric]) -> None:
    """Refuse runs whose gradients mean different things in one analysis (pico-train's mean of uneven
    sub-batch means beside batch means): the tidy table has no column to tell them apart."""
    for split in _read_splits(entries, ("gradients",)) if len(runs) > 1 else ():
        meanings = {
            run: ckpt.gradients_meaning(split)
            for run in runs
            if (ckpt := _first(run, selected[run], split)) is not None
        }
        first = next(iter(meanings), None)
        other = next((r for r, m in meanings.items() if m != meanings[first]), None)
        if other is not None:
            raise AnalysisError(
                f"{split} gradients of {names[first]} are the {meanings[first]} and of {names[other]} the "
                f"{meanings[other]}: comparing them would mix two quantities; analyse the runs apart, or "
                "without gradients (data_types)"
            )


def _uses_sv(metric: Metric, params: dict) -> bool:
    """Whether the metric with these parameters computes singular values (norm does for nuc and spectral)."""
    return metric.takes_sv and (metric.name != "norm" or params.get("kind", "fro") in SVD_NORMS)


def _tensor(ckpt: Checkpoint, component: str, layer, module, data_type: str, split) -> torch.Tensor:
    """A simple component's tensor (module given) or a compound component's (module None)."""
    if module is None:
        return ckpt.component(component, layer, data_type, split)
    return ckpt.load(data_type, module, split)


def _measure(metric: Metric, params: dict, x: torch.Tensor, ref: torch.Tensor | None, sv, where) -> float:
    """The metric of `x` (against `ref` for a comparative one); its bad-input error names `where`."""
    kwargs = params if sv is None else dict(params, sv=sv)
    try:
        return float(metric.fn(x, **kwargs) if ref is None else metric.fn(x, ref, **kwargs))
    except ValueError as e:  # a metric's one documented error for tensors it cannot measure (docs/metrics.md)
        raise AnalysisError(f"{where}: {e}") from None


def _metric_rows(run: str, ckpt: Checkpoint, entry: _ResolvedMetric, ref: Checkpoint | None, label: str):
    """All rows of one metric entry at one checkpoint (compared against `ref` for comparative metrics)."""
    metric, params, rows = get_metric(entry.spec.name), dict(entry.spec.params), []
    if "dtype" in metric.__signature__.parameters:
        params["dtype"] = ckpt.dtype
    shares_sv = ref is None and _uses_sv(metric, params)
    for data_type, split, component, layer, module in _measured(ckpt, entry, ref):
        x = _tensor(ckpt, component, layer, module, data_type, split)
        y = None if ref is None else _tensor(ref, component, layer, module, data_type, split)
        per_head = component in COMPONENTS and COMPONENTS[component].per_head
        where = " ".join(str(p) for p in (ckpt.dir, split, data_type, module or component) if p is not None)
        for head in range(x.shape[0]) if per_head else [None]:
            xh = x if head is None else x[head]
            yh = y if head is None or y is None else y[head]
            key = (data_type, split, component, layer, module, head)
            sv = ckpt.singular_values(key, xh) if shares_sv else None
            value = _measure(metric, params, xh, yh, sv, where)
            rows.append(Row(run, ckpt.step, split, data_type, component, layer, head, label, value))
    return rows


def run_names(runs) -> list[str]:
    """Run names for the table: each run directory's name (pico.run_dir.run_name; they must differ)."""
    names = [run_name(r) for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise AnalysisError(
                f"two runs are both named {name!r}; the run column needs distinct folder names"
            )
    return names


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


def _target_steps(entries: list[_ResolvedMetric], runs: list[Path], available: dict) -> dict:
    """The step each comparative `compare: steps` entry compares against, per (entry index, run)."""
    targets = {}
    for i, entry in enumerate(entries):
        if get_metric(entry.spec.name).comparative and entry.compare == "steps":
            for run in runs:
                target = available[run][-1] if entry.target_step == "last" else entry.target_step
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
    entries = _resolve_metrics(spec)
    if any(e.compare == "runs" and get_metric(e.spec.name).comparative for e in entries) and len(runs) < 2:
        raise SpecError("compare: 'runs' compares each run with the first, so it needs at least two --run")
    available, selected = _selected_steps(runs, spec)
    _check_gradients(runs, names, selected, entries)
    notes = {run: _notes(run, selected[run], entries) for run in runs}
    for run in runs:
        for note in notes[run]:
            print(f"analysis: {names[run]}: {note}", file=sys.stderr)
    targets = _target_steps(entries, runs, available)
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
                for i, entry in enumerate(entries):
                    ref, label = None, entry.spec.label
                    if (i, run) in targets:
                        ref = pinned[run, targets[i, run]]
                        label = f"{label}@step_{ref.step}"
                    elif get_metric(entry.spec.name).comparative:  # the first run: the reference, itself too
                        if runs[0] not in ckpts:
                            continue
                        ref, label = ckpts[runs[0]], f"{label}@{names[runs[0]]}"
                    rows.extend(_metric_rows(names[run], ckpt, entry, ref, label))
                bar.update()
    empty = [run for run in runs if notes[run] and not any(r.run == names[run] for r in rows)]
    if empty:
        raise AnalysisError(f"nothing left to analyse in {names[empty[0]]}: {'; '.join(notes[empty[0]])}")
    for run in runs if spec.evals else ():
        for e in select_evals(eval_rows(run), spec.evals, run):
            if spec.steps == "all" or e.step in spec.steps:
                rows.append(e.as_row())  # its run is run_name(run), names[run]
    return rows
