"""Outputs of an analysis: metrics.csv, tensorboard scalars and plots under `<run_dir>/analysis/<name>/`."""

import csv
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from pico.analysis.compute import Row, run_names
from pico.analysis.spec import AnalysisSpec
from pico.run_dir import analysis_dir

COLUMNS = ("run", "step", "split", "data_type", "component", "layer", "head", "metric", "value")


def write_csv(rows, path) -> Path:
    """The tidy table: header COLUMNS, empty cells for split/layer/head where they do not apply,
    nan/inf as such."""
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
        return [
            Row(
                r["run"],
                int(r["step"]),
                opt(r["split"], str),
                r["data_type"],
                r["component"],
                opt(r["layer"], int),
                opt(r["head"], int),
                r["metric"],
                float(r["value"]),
            )
            for r in csv.DictReader(f)
        ]


def scalar_tag(row: Row) -> str:
    """Tensorboard tag `<metric>/<data_type>[/<split>]/<component>[/layer_<l>][/head_<h>]`."""
    parts = [
        row.metric,
        row.data_type,
        row.split,
        row.component,
        None if row.layer is None else f"layer_{row.layer}",
        None if row.head is None else f"head_{row.head}",
    ]
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
    from matplotlib import colormaps  # imported here: the tidy table alone needs no plotting library
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups = defaultdict(list)
    for row in rows:
        groups[row.run, row.metric, row.data_type, row.component, row.split].append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (_run, metric, data_type, component, split), group in sorted(groups.items(), key=str):
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
            ax.plot(
                steps,
                [f.mean() if f.size else np.nan for f in finite],
                marker="o",
                markersize=3,
                linewidth=1.5,
                color=color,
                label=component if layer is None else f"layer {layer}",
            )
            if heads > 1:
                ax.fill_between(
                    steps,
                    [f.min() if f.size else np.nan for f in finite],
                    [f.max() if f.size else np.nan for f in finite],
                    color=color,
                    alpha=0.2,
                    lw=0,
                )
        notes = [f"mean of {heads} heads, band min to max"] if heads > 1 else []
        notes += [f"{hidden} non-finite values not shown"] if hidden else []
        title = f"{component} · {data_type}" + (f" ({split})" if split else "")
        ax.set_title("\n".join([title, "; ".join(notes)] if notes else [title]), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(
            fontsize=7, frameon=False, ncol=1 + len(layers) // 12, loc="upper left", bbox_to_anchor=(1.0, 1.0)
        )
        fig.tight_layout()
        stem = "__".join([metric, data_type, split or "weights", component])
        path = out_dir / (re.sub(r"[^\w.@=-]+", "_", stem) + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths


def save(rows, runs, spec: AnalysisSpec, plot: bool = False) -> list[Path]:
    """Write each run's rows to `<run_dir>/analysis/<spec.name>/` (replacing an earlier analysis of
    that name)."""
    written = []
    for run, name in zip(runs, run_names(runs)):
        out = analysis_dir(run, spec.name)
        for old in (out / "tensorboard", out / "plots"):
            shutil.rmtree(old, ignore_errors=True)
        mine = [r for r in rows if r.run == name]
        written.append(write_csv(mine, out / "metrics.csv"))
        written.append(write_tensorboard(mine, out / "tensorboard"))
        if plot:
            written.extend(plot_rows(mine, out / "plots"))
    return written
