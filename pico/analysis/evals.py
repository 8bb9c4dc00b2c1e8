"""The evaluations of a run: each step's eval.json (written by pico.checkpoint) as rows of a tidy table."""

import json
import math
from pathlib import Path
from typing import NamedTuple

from pico.analysis.table import Row, Rows
from pico.errors import AnalysisError
from pico.manifest import verify_files
from pico.run_dir import CHECKPOINTS, EVAL, checkpoints_dir, list_steps, run_name, step_dir


class EvalRow(NamedTuple):
    """One number of a step's eval.json; subset is None for a task's overall metric."""

    run: str
    step: int
    task: str
    subset: str | None
    metric: str
    value: float

    def as_row(self) -> Row:
        """The row of the analysis table: data_type `eval`, component `<task>[/<subset>]`, no split."""
        component = self.task if self.subset is None else f"{self.task}/{self.subset}"
        return Row(self.run, self.step, None, "eval", component, None, None, self.metric, self.value)


_COUNTS = ("n", "tokens", "documents")  # counts, not metrics (as in pico.evaluation.flat_metrics)
_GROUPS = ("subsets", "fields", "sources")  # breakdowns: BLiMP paradigms and fields, Paloma sources


def _paloma_as_now(metrics: dict) -> dict:
    """A paloma entry in today's shape. The earlier shape held sources under `subsets`, and its top-level
    loss and perplexity were means over sources: that perplexity is today's `macro_perplexity`; the
    token-level loss is recomputed exactly from each source's loss and tokens (the mean loss is dropped)."""
    subsets = metrics.get("subsets")
    if not isinstance(subsets, dict) or not subsets or "sources" in metrics:
        return metrics
    if not all(isinstance(s, dict) and {"loss", "tokens"} <= s.keys() for s in subsets.values()):
        return metrics  # not the earlier shape: read as it stands
    loss = sum(s["loss"] * s["tokens"] for s in subsets.values()) / sum(s["tokens"] for s in subsets.values())
    rest = {k: v for k, v in metrics.items() if k not in ("loss", "perplexity", "subsets")}
    now = {"perplexity": math.exp(loss), "loss": loss, "macro_perplexity": metrics.get("perplexity")}
    return now | rest | {"sources": subsets}


def read_evals(path, run: str = "") -> list[EvalRow]:
    """The rows of one eval.json, `{"step", "<task>": {...}}` or the old `{"step", "perplexity": {...}}`
    (task "paloma"; an earlier paloma entry as today's, `_paloma_as_now`); counts and failed tasks
    (`{"error": ...}`) are left out."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path}: not a readable eval.json ({e})") from None
    if not isinstance(raw, dict) or type(raw.get("step")) is not int:
        raise AnalysisError(f"{path}: expected an object with an integer 'step'")
    rows = []

    def numbers(task: str, subset: str | None, metrics) -> None:
        if not isinstance(metrics, dict):
            raise AnalysisError(f"{path}: {task}{'/' + subset if subset else ''} is not an object of metrics")
        for name, value in metrics.items():
            if name not in _COUNTS + _GROUPS + ("error",) and isinstance(value, (int, float)):
                rows.append(EvalRow(run, raw["step"], task, subset, name, float(value)))

    for task, metrics in raw.items():
        if task == "step" or (isinstance(metrics, dict) and "error" in metrics):
            continue
        task = "paloma" if task == "perplexity" else task  # eval.json before the task registry
        metrics = _paloma_as_now(metrics) if task == "paloma" and isinstance(metrics, dict) else metrics
        numbers(task, None, metrics)
        for group in _GROUPS:
            subsets = metrics.get(group, {})
            if not isinstance(subsets, dict):
                raise AnalysisError(f"{path}: {task}.{group} is not an object of subsets")
            for subset, sub in subsets.items():
                numbers(task, subset, sub)
    return rows


def eval_rows(run_dir) -> Rows:
    """The rows of every `step_<N>/eval.json` of a run, by step ([] when the run has none); each file is
    verified against its step's manifest first."""
    run_dir = Path(run_dir)
    if not checkpoints_dir(run_dir).is_dir():
        raise AnalysisError(f"{run_dir}: not a run directory (no {CHECKPOINTS}/ folder)")
    if not any(checkpoints_dir(run_dir).glob(f"step_*/{EVAL}")):  # no step has one (list_steps would raise)
        return Rows()
    steps, name = list_steps(run_dir, require=EVAL), run_name(run_dir)
    for step in steps:
        verify_files(step_dir(run_dir, step), [EVAL])
    return Rows(row for step in steps for row in read_evals(step_dir(run_dir, step) / EVAL, name))


def _matches(row: EvalRow, selector: str) -> bool:
    if selector == "all":
        return row.subset is None
    task, *rest = selector.split("/")
    if task != row.task:
        return False
    if len(rest) < 2:
        return row.subset is None and (not rest or row.metric == rest[0])
    return row.subset == rest[0] and row.metric == rest[1]


def select_evals(rows: list[EvalRow], selectors, where) -> Rows:
    """The rows that spec key `evals` selects: `all` (every task's overall metrics), `task` (its overall
    metrics), `task/metric`, `task/subset/metric`; a selector that matches nothing names `where`."""
    for i, selector in enumerate(selectors):
        if not any(_matches(row, selector) for row in rows):
            held = sorted({f"{r.task}/{r.metric}" for r in rows if r.subset is None})
            raise AnalysisError(
                f"{where}: evals[{i}] {selector!r} matches nothing in its eval.json files "
                f"({'they hold ' + ', '.join(held) if held else 'there are none'})"
            )
    return Rows(row for row in rows if any(_matches(row, s) for s in selectors))
