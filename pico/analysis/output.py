"""Outputs of an analysis: metrics.csv, tensorboard scalars and plots under `<run_dir>/analysis/<name>/`
(and groups.csv with its plots, for groups of runs)."""

import csv
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from pico.analysis.compute import run_names
from pico.analysis.groups import group_rows, write_groups_csv
from pico.analysis.spec import AnalysisSpec
from pico.analysis.table import Row, Rows, series_of, write_rows
from pico.run_dir import TENSORBOARD, analysis_dir

COLUMNS = ("run", "step", "split", "data_type", "component", "layer", "head", "metric", "value")


def write_csv(rows, path) -> Path:
    """The tidy table: header COLUMNS, empty cells for split/layer/head where they do not apply,
    nan/inf as such."""
    return write_rows(rows, path, COLUMNS)


def read_csv(path) -> Rows:
    """Rows back from a metrics.csv written by `write_csv`."""
    with open(path, newline="") as f:
        return Rows(Row(r["run"], *series_of(r), float(r["value"])) for r in csv.DictReader(f))


def scalar_tag(row: Row) -> str:
    """Tensorboard tag `<metric>/<data_type>[/<split>]/<component>[/layer_<l>][/head_<h>]`; evaluation rows
    keep the training run's tag, `eval/<task>[/<subset>]/<metric>`."""
    if row.data_type == "eval":
        return f"eval/{row.component}/{row.metric}"
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


def _mean_by_step(rows) -> tuple[list[int], list[np.ndarray]]:
    """Steps, ascending, and the values of `rows` at each step."""
    by_step = defaultdict(list)
    for r in rows:
        by_step[r.step].append(r.value)
    steps = sorted(by_step)
    return steps, [np.asarray(by_step[s], dtype=float) for s in steps]


def _line(ax, rows, color, label, band: bool) -> int:
    """The mean of `rows` at each step (a band from min to max if `band`); returns the non-finite count."""
    steps, values = _mean_by_step(rows)
    finite = [v[np.isfinite(v)] for v in values]
    ax.plot(
        steps,
        [f.mean() if f.size else np.nan for f in finite],
        marker="o",
        markersize=3,
        linewidth=1.5,
        color=color,
        label=label,
    )
    if band:
        lo = [f.min() if f.size else np.nan for f in finite]
        hi = [f.max() if f.size else np.nan for f in finite]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    return sum(int((~np.isfinite(v)).sum()) for v in values)


def _style(ax, ylabel: str, n_lines: int) -> None:
    """Labels, grid and legend; a log y axis when the plotted values, all positive, span a decade or more
    (perplexity from its start at about vocab_size, a condition number), so that every step stays readable."""
    _log_if_spanning(ax)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, ncol=1 + n_lines // 12, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _log_if_spanning(ax) -> None:
    """A log y axis when the plotted values, all positive, span a decade or more."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if np.isfinite([low, high]).all() and low > 0 and high >= 10 * low:
        ax.set_yscale("log")


def _step_ticks(ax, steps) -> None:
    """x ticks at the checkpoint `steps`: a mark at each, a label on the first, the last and those between
    at least 1/8 of the axis from the labelled ones."""
    steps = sorted(set(steps))
    gap, labelled = (steps[-1] - steps[0]) / 8, steps[:1]
    for step in steps[1:-1]:
        if step - labelled[-1] >= gap and steps[-1] - step >= gap:
            labelled.append(step)
    ax.set_xticks(labelled + steps[-1:] if len(steps) > 1 else labelled)
    ax.set_xticks(steps, minor=True)


def _figure(n_evals: int):
    """A figure with `n_evals` eval panels above the main one, all sharing the step axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.8, 3.4 + 1.5 * n_evals), dpi=150)
    axes = fig.subplots(n_evals + 1, 1, sharex=True, height_ratios=[1] * n_evals + [2], squeeze=False)[:, 0]
    return fig, list(axes[:-1]), axes[-1]


def _eval_panels(panels, eval_rows, colors) -> None:
    """One panel per eval series (task[/subset], metric), one line per run, coloured as `colors[run]`."""
    series = defaultdict(list)
    for r in eval_rows:
        series[r.component, r.metric].append(r)
    for ax, ((component, metric), group) in zip(panels, sorted(series.items())):
        for run, color in colors.items():
            mine = [r for r in group if r.run == run]
            if mine:
                _line(ax, mine, color, run if len(colors) > 1 else component, band=False)
        _style(ax, f"{component}\n{metric}", len(colors))


def _stem(metric: str, data_type: str, split, component: str) -> str:
    """`<metric>__<data_type>[__<split>]__<component>` (weights have no split), or
    `eval__<task>[/<subset>]__<metric>`."""
    if data_type == "eval":
        return f"eval__{component}__{metric}"
    return "__".join(p for p in (metric, data_type, split, component) if p is not None)


def _save_figure(fig, out_dir: Path, stem: str) -> Path:
    fig.tight_layout()
    path = out_dir / (re.sub(r"[^\w.@=-]+", "_", stem) + ".png")
    fig.savefig(path)
    return path


def _title(component: str, data_type: str, split, notes: list[str]) -> str:
    title = f"{component} · {data_type}" + (f" ({split})" if split else "")
    return "\n".join([title, "; ".join(notes)] if notes else [title])


def _n_eval_series(rows) -> int:
    return len({(r.component, r.metric) for r in rows})


def plot_rows(rows, out_dir) -> list[Path]:
    """One PNG per (metric, data type, component, split): the metric against step, one line per layer.

    Per-head components plot the mean over heads with a band from the smallest to the largest head.
    NaN and inf are left out of the lines and counted in the title. Evaluation rows (data_type `eval`) get
    their own PNGs and a panel each above every other plot of their run, on the same step axis.
    """
    from matplotlib import colormaps  # imported here: the tidy table alone needs no plotting library

    groups, evals = defaultdict(list), defaultdict(list)
    for row in rows:
        groups[row.run, row.metric, row.data_type, row.component, row.split].append(row)
        if row.data_type == "eval":
            evals[row.run].append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (run, metric, data_type, component, split), group in sorted(groups.items(), key=str):
        panels = [] if data_type == "eval" else evals[run]
        fig, eval_axes, ax = _figure(_n_eval_series(panels))
        _eval_panels(eval_axes, panels, {run: "tab:red"})
        layers = sorted({r.layer for r in group}, key=lambda layer: -1 if layer is None else layer)
        hidden, heads = 0, len({r.head for r in group})
        for i, layer in enumerate(layers):
            color = colormaps["viridis"](0.85 * i / max(len(layers) - 1, 1))  # dark blue to green
            label = component if layer is None else f"layer {layer}"
            hidden += _line(ax, [r for r in group if r.layer == layer], color, label, band=heads > 1)
        notes = [f"mean of {heads} heads, band min to max"] if heads > 1 else []
        notes += [f"{hidden} non-finite values not shown"] if hidden else []
        (eval_axes or [ax])[0].set_title(_title(component, data_type, split, notes), fontsize=9)
        ax.set_xlabel("step")
        _step_ticks(ax, [r.step for r in group + panels])
        _style(ax, metric, len(layers))
        paths.append(_save_figure(fig, out_dir, _stem(metric, data_type, split, component)))
    return paths


def plot_runs(rows, out_dir) -> list[Path]:
    """One PNG per (metric, data type, component, split) comparing runs: one line per run, the mean over
    layers and heads at each step (a band from the smallest to the largest), eval panels as in plot_rows."""
    from matplotlib import colormaps

    groups, evals = defaultdict(list), []
    for row in rows:
        if row.data_type == "eval":
            evals.append(row)
        groups[row.metric, row.data_type, row.component, row.split].append(row)
    runs = list(dict.fromkeys(r.run for r in rows))
    colors = {run: colormaps["tab10"](i % 10) for i, run in enumerate(runs)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (metric, data_type, component, split), group in sorted(groups.items(), key=str):
        panels = [] if data_type == "eval" else evals
        fig, eval_axes, ax = _figure(_n_eval_series(panels))
        _eval_panels(eval_axes, panels, colors)
        hidden, spread = 0, len({(r.layer, r.head) for r in group}) > 1
        for run, color in colors.items():
            mine = [r for r in group if r.run == run]
            if mine:
                hidden += _line(ax, mine, color, run, band=spread)
        layers, heads = len({r.layer for r in group}), len({r.head for r in group})
        notes = [f"mean of {layers} layers" + (f" × {heads} heads" if heads > 1 else "")] if spread else []
        notes += [f"{hidden} non-finite values not shown"] if hidden else []
        (eval_axes or [ax])[0].set_title(_title(component, data_type, split, notes), fontsize=9)
        ax.set_xlabel("step")
        _step_ticks(ax, [r.step for r in group + panels])
        _style(ax, metric, len(runs))
        paths.append(_save_figure(fig, out_dir, _stem(metric, data_type, split, component)))
    return paths


def logged_scalars(run_dir, tags) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the tensorboard scalars `tags` a run logged, read in one pass (where a resumed
    run logged a step again, its last value); {} for a tag the run did not log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / TENSORBOARD
    if not folder.is_dir():
        return {tag: {} for tag in tags}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Tags()["scalars"]
    return {tag: {e.step: e.value for e in events.Scalars(tag)} if tag in logged else {} for tag in tags}


def train_loss(run_dir) -> dict[int, float]:
    """{step: loss} of the training loss a run logged (tensorboard `train/loss`; where a resumed run logged a
    step again, its last value); {} for a run without one (re-captured, converted)."""
    return logged_scalars(run_dir, ["train/loss"])["train/loss"]


def plot_loss(losses: dict[str, dict[int, float]], rows, out_dir) -> list[Path]:
    """`train_loss.png` in `out_dir`: the training loss against the step, one line per run of `losses`
    ({run: {step: loss}}; one run in its eval panels' colour, several as plot_runs colours them), ticks at
    the checkpoint steps of `rows`; nothing ([]) when no run logged a loss."""
    from matplotlib import colormaps

    losses = {run: loss for run, loss in losses.items() if loss}
    if not losses:
        return []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig, _, ax = _figure(0)
    for i, (run, loss) in enumerate(losses.items()):
        color = "tab:red" if len(losses) == 1 else colormaps["tab10"](i % 10)
        ax.plot(sorted(loss), [loss[k] for k in sorted(loss)], linewidth=1.2, color=color, label=run)
    ax.set_title("training loss (tensorboard train/loss)", fontsize=9)
    ax.set_xlabel("step")
    checkpoints = [r.step for r in rows if r.run in losses]
    _step_ticks(ax, checkpoints or [step for loss in losses.values() for step in loss])
    _style(ax, "loss", len(losses))
    return [_save_figure(fig, Path(out_dir), "train_loss")]


def _band(ax, rows, color, label: str) -> int:
    """A group's mean against step, its confidence interval a band (none where n = 1, the bounds NaN);
    returns the number of non-finite means, left out of the line."""
    rows = sorted(rows, key=lambda r: r.step)
    steps = [r.step for r in rows]
    mean = np.array([r.mean for r in rows], dtype=float)
    finite = np.isfinite(mean)
    ax.plot(
        steps,
        np.where(finite, mean, np.nan),
        marker="o",
        markersize=3,
        linewidth=1.5,
        color=color,
        label=label,
    )
    low, high = (np.array([getattr(r, bound) for r in rows], dtype=float) for bound in ("ci_low", "ci_high"))
    ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
    return int((~finite).sum())


def _panels(n: int):
    """A figure with `n` panels, three to a row."""
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols + 1.4, 2.2 * rows + 0.8), dpi=150)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def plot_groups(rows, out_dir, level: float = 0.95) -> list[Path]:
    """One PNG per (metric, data type, component, split[, head]) of a groups table (GroupRow, pico.analysis.
    groups): a panel per layer, in each one line per group, its mean against step, with its `level`
    confidence interval as a band. Named as plot_rows' PNGs, per-head series with `__head_<h>` added."""
    from matplotlib import colormaps

    figures = defaultdict(list)
    for row in rows:
        figures[row.metric, row.data_type, row.component, row.split, row.head].append(row)
    groups = list(dict.fromkeys(r.group for r in rows))
    colors = {group: colormaps["tab10"](i % 10) for i, group in enumerate(groups)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (metric, data_type, component, split, head), series in sorted(figures.items(), key=str):
        layers = sorted({r.layer for r in series}, key=lambda layer: -1 if layer is None else layer)
        ns = {g: sorted({r.n for r in series if r.group == g}) for g in groups}
        labels = {g: f"{g} (n={n[0]}" + (f"–{n[-1]})" if len(n) > 1 else ")") for g, n in ns.items() if n}
        fig, axes = _panels(len(layers))
        hidden = 0
        for ax, layer in zip(axes, layers):
            for group, label in labels.items():
                mine = [r for r in series if r.layer == layer and r.group == group]
                hidden += _band(ax, mine, colors[group], label) if mine else 0
            ax.set_title("" if layer is None else f"layer {layer}", fontsize=8)
            ax.set_xlabel("step")
            _step_ticks(ax, [r.step for r in series])
            _log_if_spanning(ax)  # the means and bands, as _style decides for plot_rows
            ax.grid(alpha=0.3)
            ax.spines[["top", "right"]].set_visible(False)
        axes[0].set_ylabel(metric, fontsize=8)
        handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}  # a group may miss a panel
        axes[min(len(axes), 3) - 1].legend(  # right of the first row
            [handles[label] for label in labels.values()],
            list(labels.values()),
            fontsize=7,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
        notes = [f"mean over each group's runs, band: {level:.0%} t-interval (none for n = 1)"]
        notes += [f"{hidden} non-finite means not shown"] if hidden else []
        where = component if head is None else f"{component} head {head}"
        fig.suptitle(_title(where, data_type, split, notes), fontsize=9)
        stem = _stem(metric, data_type, split, component) + ("" if head is None else f"__head_{head}")
        paths.append(_save_figure(fig, out_dir, stem))
    return paths


def save(rows, runs, spec: AnalysisSpec, plot: bool = False, groups=None) -> list[Path]:
    """Write each run's rows to `<run_dir>/analysis/<spec.name>/` (replacing an earlier analysis of that
    name); with `plot`, also its plots and training loss curve (plot_loss), and with several runs the
    comparison of both (plot_runs, plot_loss) into the first run's `plots/runs/`. With `groups` ({name:
    runs}, as group_rows takes them), also the first run's `groups.csv` (group_rows) and, with `plot`, its
    `plots/groups/` (plot_groups)."""
    written, losses = [], {}
    for run, name in zip(runs, run_names(runs)):
        out = analysis_dir(run, spec.name)
        (out / "groups.csv").unlink(missing_ok=True)
        for old in (out / "tensorboard", out / "plots"):
            shutil.rmtree(old, ignore_errors=True)
        mine = [r for r in rows if r.run == name]
        written.append(write_csv(mine, out / "metrics.csv"))
        written.append(write_tensorboard(mine, out / "tensorboard"))
        if plot:
            losses[name] = train_loss(run)
            written.extend(plot_rows(mine, out / "plots"))
            written.extend(plot_loss({name: losses[name]}, mine, out / "plots"))
    if plot and len(runs) > 1:  # the comparison goes with the first run, the reference of compare: runs
        compared = analysis_dir(runs[0], spec.name) / "plots" / "runs"
        written.extend(plot_runs(rows, compared))
        written.extend(plot_loss(losses, rows, compared))
    if groups:  # with the first run too
        table = group_rows(rows, groups)
        written.append(write_groups_csv(table, analysis_dir(runs[0], spec.name) / "groups.csv"))
        if plot:
            written.extend(plot_groups(table, analysis_dir(runs[0], spec.name) / "plots" / "groups"))
    return written
