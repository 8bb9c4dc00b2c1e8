"""Groups of runs (the seeds of one arm): per step and series, the group's mean and its Student-t interval.

    groups = group_runs({"base": "runs/base-*", "relora": "runs/relora-*"})   # name -> run directories
    rows = analyze([run for runs in groups.values() for run in runs], spec)
    table = group_rows(rows, groups)          # Rows of GroupRow; .to_frame() for pandas
    write_groups_csv(table, "groups.csv")

A series is everything of a row but its run and value: (split, data_type, component, layer, head, metric).
The interval is over the group's runs that have the series at that step (their number is `n`); see
docs/analysis.md, "Groups of runs".
"""

import csv
import glob
import math
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pico.analysis.evals import EvalRow
from pico.analysis.student_t import t_ppf
from pico.analysis.table import Rows, series_of, write_rows
from pico.errors import AnalysisError
from pico.run_dir import run_name


class GroupRow(NamedTuple):
    """One series of a group at one step: the mean over the group's runs that have it, the interval's
    bounds (NaN when n = 1), and n."""

    group: str
    step: int
    split: str | None
    data_type: str
    component: str
    layer: int | None
    head: int | None
    metric: str
    mean: float
    ci_low: float
    ci_high: float
    n: int


GROUP_COLUMNS = GroupRow._fields


def group_runs(groups) -> dict[str, list[Path]]:
    """The run directories that each group's glob matches (`{name: glob}` or (name, glob) pairs), sorted;
    an AnalysisError for a glob that matches no directory and for a run in two groups."""
    found, owner = {}, {}
    for name, pattern in dict(groups).items():
        runs = [Path(p) for p in sorted(glob.glob(str(Path(pattern).expanduser()))) if Path(p).is_dir()]
        if not runs:
            raise AnalysisError(f"group {name}: {pattern!r} matches no directory")
        for run in runs:
            if (other := owner.setdefault(run.resolve(), name)) != name:
                raise AnalysisError(f"{run}: in two groups, {other} and {name}; a run belongs to one group")
        found[name] = runs
    return found


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` ± t_{(1+level)/2, n-1} · s / sqrt(n), s the sample standard
    deviation (ddof 1); low and high are NaN for a single value, and non-finite values give NaN bounds."""
    if not 0.0 < level < 1.0:
        raise AnalysisError(f"confidence level: expected 0 < level < 1, got {level!r}")
    values = np.asarray(values, dtype=np.float64)  # (n,)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    with np.errstate(invalid="ignore"):  # inf - inf: the bounds of a series with a non-finite value are NaN
        half = t_ppf(0.5 + level / 2, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _members(groups) -> dict[str, str]:
    """Run name -> group, the runs given by name (the `run` column) or as paths (named by run_name)."""
    owner = {}
    for name, runs in dict(groups).items():
        for run in runs:
            run = run_name(run) if isinstance(run, Path) else str(run)
            if (other := owner.setdefault(run, name)) != name:
                raise AnalysisError(
                    f"run {run}: in two groups, {other} and {name}; a run belongs to one group"
                )
    return owner


def group_rows(rows, groups, level: float = 0.95) -> Rows:
    """Rows of GroupRow: per group (`{name: runs}`), step and series of `rows` (Row or EvalRow, as
    `analyze`, `read_csv` and `Run.evals` give them), the mean over the group's runs that have it and its
    `level` Student-t interval (`t_interval`); in the groups' order, then by step. Runs in no group are
    left out; a group with no rows, and a run with two values of one series at one step, are errors."""
    owner = _members(groups)
    values = defaultdict(dict)  # (group, step, series...) -> {run: value}
    for row in rows:
        row = row.as_row() if isinstance(row, EvalRow) else row
        if row.run not in owner:
            continue
        key = (owner[row.run], *row[1:-1])
        if row.run in values[key]:
            raise AnalysisError(f"run {row.run}: two values of {key[2:]} at step {row.step}")
        values[key][row.run] = row.value
    order = {name: i for i, name in enumerate(dict(groups))}
    for name in order:
        if not any(key[0] == name for key in values):
            runs = ", ".join(run for run, group in owner.items() if group == name)
            raise AnalysisError(f"group {name}: none of its runs ({runs}) has rows")
    table = Rows()
    for key in sorted(values, key=lambda key: (order[key[0]], key[1])):  # stable: series in row order
        runs = values[key]
        table.append(GroupRow(*key, *t_interval(list(runs.values()), level), len(runs)))
    return table


def write_groups_csv(rows, path) -> Path:
    """groups.csv: header GROUP_COLUMNS, empty cells for split/layer/head where they do not apply, nan as
    such."""
    return write_rows(rows, path, GROUP_COLUMNS)


def read_groups_csv(path) -> Rows:
    """Rows of GroupRow back from a groups.csv written by `write_groups_csv`."""
    with open(path, newline="") as f:
        return Rows(
            GroupRow(
                r["group"],
                *series_of(r),
                float(r["mean"]),
                float(r["ci_low"]),
                float(r["ci_high"]),
                int(r["n"]),
            )
            for r in csv.DictReader(f)
        )
