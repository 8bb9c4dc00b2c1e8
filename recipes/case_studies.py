"""The comparison of the case-study protocol (recipes/case_studies.sh, docs/case_studies.md): the
learning-rate grid, each arm at its selected rate, and the Pico paper's two claims tested on those runs.

    python recipes/case_studies.py select ROOT    # ROOT/comparison/grid.csv, selected.csv
    python recipes/case_studies.py claims ROOT    # ROOT/comparison/claim_a.csv, claim_b.csv, tables.md

A run is ROOT/runs/<arm>_lr<lr>_s<seed>. `select` reads every run's held-out loss and perplexity at its last
checkpoint (eval.json, the `paloma` task on evaluation.data) and selects, per arm, the lr of the lowest mean
held-out loss over seeds. `claims` reads the selected runs' analysis (ROOT/runs/*/analysis/case_studies/
metrics.csv, written by recipes/analyze.py). Every interval is the 95% Student-t interval over seeds
(pico.analysis.t_interval). Bad input exits with code 2 and one line `analysis error: ...`.
"""

import argparse
import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pico.analysis import AnalysisError, eval_rows, logged_scalars, read_csv, t_interval, train_loss
from pico.errors import exit_on
from pico.spikes import SpikeDetector

RUN = re.compile(r"(?P<arm>[A-Za-z0-9-]+)_lr(?P<lr>[^_/]+)_s(?P<seed>\d+)")
REFERENCE = "base"  # the arm every other arm is compared with (claim a)
COMPONENTS = ("attention.v_proj", "attention.o_proj")
GRID = ["arm", "lr", "step", "n", "loss", "loss_ci_low", "loss_ci_high"]
GRID += ["perplexity", "perplexity_ci_low", "perplexity_ci_high", "selected"]
CLAIM_A = ["arm", "versus", "component", "n", "log10_ratio", "ci_low", "ci_high", "ratio"]
CLAIM_B = ["arm", "data_type", "component", "n", "spearman", "ci_low", "ci_high", "spikes"]
CLAIM_B += ["spike_checkpoints", "troughs_at_spikes", "troughs", "checkpoints"]
EPISODES = ["arm", "statistic", "n", "mean", "ci_low", "ci_high"]
EPISODE_TAGS = ("queries_kept", "support_kept", "shots_per_class", "classes_no_support", "classes_one_shot")


def find_runs(root: Path) -> dict[tuple[str, str], dict[int, Path]]:
    """{(arm, lr): {seed: run directory}} of ROOT/runs/, arms with `base` first, then by name and lr."""
    runs = defaultdict(dict)
    for path in sorted((root / "runs").glob("*_lr*_s*")):
        if (m := RUN.fullmatch(path.name)) and path.is_dir():
            runs[m["arm"], m["lr"]][int(m["seed"])] = path
    if not runs:
        raise AnalysisError(f"{root / 'runs'}: no run directories named <arm>_lr<lr>_s<seed>")
    return dict(sorted(runs.items(), key=lambda kv: (kv[0][0] != REFERENCE, kv[0][0], float(kv[0][1]))))


def held_out(run: Path, metric: str) -> dict[int, float]:
    """{step: the held-out `metric`} of a run: the `paloma` task (evaluation.data) of every eval.json."""
    values = {
        r.step: r.value for r in eval_rows(run) if (r.task, r.subset, r.metric) == ("paloma", None, metric)
    }
    if not values:
        raise AnalysisError(f"{run}: no eval.json with a paloma {metric} (evaluation.data)")
    return values


def final_evals(run: Path) -> tuple[int, float, float]:
    """(the last step with an eval.json, its held-out loss, its perplexity)."""
    loss, perplexity = held_out(run, "loss"), held_out(run, "perplexity")
    step = max(loss)
    return step, loss[step], perplexity[step]


def grid(root: Path) -> list[dict]:
    """One row per (arm, lr): mean and 95% t-interval over seeds of the final held-out loss and perplexity,
    and whether the lr is the arm's selected one (lowest mean loss; a non-finite mean is never selected)."""
    rows = []
    for (arm, lr), seeds in find_runs(root).items():
        finals = [final_evals(run) for run in seeds.values()]
        steps = {step for step, _, _ in finals}
        if len(steps) > 1:
            raise AnalysisError(
                f"{arm} lr {lr}: its seeds end at different steps {sorted(steps)}; finish them"
            )
        loss, perplexity = t_interval([f[1] for f in finals]), t_interval([f[2] for f in finals])
        rows.append(dict(zip(GRID, [arm, lr, steps.pop(), len(finals), *loss, *perplexity, False])))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        best = min(mine, key=lambda r: (not math.isfinite(r["loss"]), r["loss"]))
        best["selected"] = math.isfinite(best["loss"])
    return rows


def selected_runs(root: Path) -> dict[str, dict[int, Path]]:
    """{arm: {seed: run}} at each arm's selected lr, as comparison/selected.csv holds it."""
    path = root / "comparison" / "selected.csv"
    if not path.is_file():
        raise AnalysisError(f"{path}: not found; run `python recipes/case_studies.py select {root}` first")
    runs = find_runs(root)
    with open(path, newline="") as f:
        return {row["arm"]: runs[row["arm"], row["lr"]] for row in csv.DictReader(f)}


def selected_lr(root: Path, arm: str) -> str:
    """The lr comparison/selected.csv holds for `arm`."""
    path = root / "comparison" / "selected.csv"
    with open(path, newline="") as f:
        lrs = [row["lr"] for row in csv.DictReader(f) if row["arm"] == arm]
    if not lrs:
        raise AnalysisError(f"{path}: no selected lr for arm {arm!r} (all its runs non-finite, or not run)")
    return lrs[0]


def series(run: Path, analysis: str, data_type: str, component: str, metric: str) -> dict[int, float]:
    """{step: the metric's mean over layers} of a run's eval-split `data_type` of `component`."""
    path = run / "analysis" / analysis / "metrics.csv"
    if not path.is_file():
        raise AnalysisError(f"{path}: not found; analyze the selected runs first (recipes/case_studies.sh)")
    values = defaultdict(list)
    for r in read_csv(path):
        if (r.data_type, r.component, r.metric) == (data_type, component, metric) and r.split in (
            None,
            "eval",
        ):
            values[r.step].append(r.value)
    if not values:
        raise AnalysisError(f"{path}: no {metric} of {data_type} of {component}")
    return {step: float(np.mean(v)) for step, v in sorted(values.items())}


def claim_a(runs: dict[str, dict[int, Path]], analysis: str) -> list[dict]:
    """ReLoRA's higher condition numbers of v_proj/o_proj gradient updates: per arm and component, the
    seed-paired difference arm - base of the mean over checkpoints after step 0 (and over layers) of log10
    of the condition number of the eval-split gradient."""
    if REFERENCE not in runs:
        raise AnalysisError(f"claim a: no {REFERENCE} arm to compare with (arms: {', '.join(runs)})")
    out = []
    for arm in (a for a in runs if a != REFERENCE):
        for component in COMPONENTS:
            diffs = []
            for seed in sorted(runs[arm].keys() & runs[REFERENCE].keys()):
                mine, ref = (
                    series(runs[a][seed], analysis, "gradients", component, "condition_number")
                    for a in (arm, REFERENCE)
                )
                steps = sorted(s for s in mine.keys() & ref.keys() if s > 0)
                if not steps:
                    raise AnalysisError(f"claim a: {arm} and {REFERENCE} seed {seed} share no step after 0")
                diffs.append(np.mean([math.log10(mine[s]) - math.log10(ref[s]) for s in steps]))
            mean, low, high = t_interval(diffs)
            out.append(dict(zip(CLAIM_A, [arm, REFERENCE, component, len(diffs), mean, low, high, 10**mean])))
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties at their mean rank); NaN when either
    is constant."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share the mean of their ranks
            r[v == value] = r[v == value].mean()
        return r

    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def spike_scores(loss: dict[int, float], window: int) -> dict[int, float]:
    """{logged step: z} of the training loss as pico.spikes.SpikeDetector sees it: how many standard
    deviations the loss stands above the mean of the `window` losses before it (0 when below, or before a
    full window)."""
    detector, scores = SpikeDetector(window, threshold=1e-12), {}
    for step in sorted(loss):
        spike = detector.observe(loss[step])
        scores[step] = spike.z if spike else 0.0
    return scores


def checkpoint_spikes(per: dict[int, float], scores: dict[int, float]) -> tuple[list, list]:
    """At every checkpoint s_i but step 0, the first and the last: the largest spike score of the losses
    computed on W_{s_{i-1}+1} .. W_{s_i} (train/loss at step k is that of W_{k-1}), and the PER's dip below
    its neighbours, P_i - (P_{i-1} + P_{i+1}) / 2 (negative: a trough)."""
    steps = sorted(per)
    inner = range(2, len(steps) - 1)
    score = [
        max((v for k, v in scores.items() if steps[i - 1] + 1 < k <= steps[i] + 1), default=0.0)
        for i in inner
    ]
    dips = [per[steps[i]] - (per[steps[i - 1]] + per[steps[i + 1]]) / 2 for i in inner]
    return score, dips


def claim_b(runs: dict[str, dict[int, Path]], analysis: str, window: int, threshold: float) -> list[dict]:
    """MAML's PER troughs aligned with loss spikes: per arm, data type and component, each seed's Spearman
    correlation between a checkpoint interval's largest training-loss spike score and the PER dip at its end
    (checkpoint_spikes), mean and 95% t-interval over seeds; troughs at spikes make it negative. Also pooled
    over seeds: spikes (steps with z > threshold), checkpoints holding one, how many of those are PER troughs
    (a dip below both neighbours), and troughs among all checkpoints compared."""
    out = []
    for arm, seeds in runs.items():
        scores = {seed: spike_scores(train_loss(run), window) for seed, run in seeds.items()}
        for data_type in ("weights", "gradients"):
            for component in COMPONENTS:
                rhos, counts = [], np.zeros(5, dtype=int)
                for seed, run in seeds.items():
                    per = series(run, analysis, data_type, component, "per")
                    score, dips = checkpoint_spikes(per, scores[seed])
                    rhos.append(spearman(score, dips))
                    at_spike = [s > threshold for s in score]
                    troughs = [_is_trough(per, i) for i in range(2, len(per) - 1)]
                    counts += [
                        sum(z > threshold for z in scores[seed].values()),
                        sum(at_spike),
                        sum(t and s for t, s in zip(troughs, at_spike)),
                        sum(troughs),
                        len(troughs),
                    ]
                mean, low, high = t_interval(rhos)
                out.append(
                    dict(zip(CLAIM_B, [arm, data_type, component, len(rhos), mean, low, high, *counts]))
                )
    return out


def _is_trough(per: dict[int, float], i: int) -> bool:
    """Whether the PER at the i-th checkpoint is below both its neighbours'."""
    values = [per[s] for s in sorted(per)]
    return values[i] < values[i - 1] and values[i] < values[i + 1]


def episodes(runs: dict[str, dict[int, Path]], clip: float = 1.0) -> list[dict]:
    """Per MAML arm (one that logged maml/*), each seed's mean over its meta steps of every EPISODE_TAGS
    statistic, the fraction of its meta micro-batches that kept no query, and (every arm) the fraction of
    steps whose gradient norm before clipping exceeded `clip`; mean and t-interval over seeds."""
    out = []
    for arm, seeds in runs.items():
        values = defaultdict(list)
        for run in seeds.values():
            tags = ["maml/meta_micro_batches", "maml/meta_micro_batches_no_query", "train/grad_norm"]
            logged = logged_scalars(run, tags + [f"maml/{tag}" for tag in EPISODE_TAGS])
            scalars = {tag: list(values_by_step.values()) for tag, values_by_step in logged.items()}
            if meta := sum(scalars["maml/meta_micro_batches"]):
                for tag in EPISODE_TAGS:
                    values[tag].append(float(np.mean(scalars[f"maml/{tag}"])))
                values["no_query_fraction"].append(sum(scalars["maml/meta_micro_batches_no_query"]) / meta)
            norms = scalars["train/grad_norm"]
            values[f"grad_norm_above_{clip:g}"].append(float(np.mean([g > clip for g in norms])))
        out += [dict(zip(EPISODES, [arm, k, len(v), *t_interval(v)])) for k, v in values.items()]
    return out


def write(rows: list[dict], columns: list[str], path: Path) -> Path:
    """A CSV of `rows` with header `columns`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def interval(row: dict, key: str, low: str, high: str, fmt: str) -> str:
    """`mean [low, high]` of a row, each formatted by `fmt`."""
    return f"{row[key]:{fmt}} [{row[low]:{fmt}}, {row[high]:{fmt}}]"


def markdown(title: str, header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table under a `##` title."""
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def tables(grid_rows: list[dict], a: list[dict], b: list[dict], e: list[dict]) -> str:
    """The grid (its selected rates marked), the two claims and the episode statistics as Markdown tables."""
    grid_table = [
        [r["arm"], r["lr"], r["n"], interval(r, "loss", "loss_ci_low", "loss_ci_high", ".3f")]
        + [interval(r, "perplexity", "perplexity_ci_low", "perplexity_ci_high", ".1f"), "yes" * r["selected"]]
        for r in grid_rows
    ]
    lines = markdown(
        "Learning-rate grid: held-out loss and perplexity at the last step, mean [95% CI] over seeds",
        ["arm", "lr", "n", "loss", "perplexity", "selected"],
        grid_table,
    )
    lines += markdown(
        "Claim (a): condition number of the eval-split gradients, arm / base, seed-paired",
        ["arm", "component", "n", "mean log10 ratio [95% CI]", "geometric ratio"],
        [
            [r["arm"], r["component"], r["n"], interval(r, "log10_ratio", "ci_low", "ci_high", ".2f")]
            + [f"{r['ratio']:.3g}"]
            for r in a
        ],
    )
    lines += markdown(
        "Claim (b): Spearman correlation of a checkpoint interval's largest loss-spike score and the PER dip",
        ["arm", "PER of", "component", "n", "mean [95% CI]", "spikes", "troughs at spike checkpoints"]
        + ["troughs / checkpoints"],
        [
            [
                r["arm"],
                r["data_type"],
                r["component"],
                r["n"],
                interval(r, "spearman", "ci_low", "ci_high", ".2f"),
            ]
            + [r["spikes"], f"{r['troughs_at_spikes']} / {r['spike_checkpoints']}"]
            + [f"{r['troughs']} / {r['checkpoints']}"]
            for r in b
        ],
    )
    lines += markdown(
        "Episode statistics (MAML arms), steps with a gradient norm above the clip: mean [95% CI] over seeds",
        ["arm", "statistic", "n", "mean [95% CI]"],
        [[r["arm"], r["statistic"], r["n"], interval(r, "mean", "ci_low", "ci_high", ".3f")] for r in e],
    )
    return "\n".join(lines)


@exit_on()  # bad input: one line `analysis error: <message>`, exit 2
def main(argv=None):
    """`select`: the grid and the selected rates; `lr ARM`: print the arm's selected lr; `claims`: the two
    claims and the Markdown tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["select", "lr", "claims"])
    parser.add_argument("root", type=Path, help="the protocol's output directory (ROOT of case_studies.sh)")
    parser.add_argument("arm", nargs="?", help="lr: the arm whose selected lr is printed")
    parser.add_argument("--analysis", default="case_studies", help="the analysis name (analyze.py's spec)")
    parser.add_argument("--spike-window", type=int, default=10, help="claim b: SpikeDetector's window")
    parser.add_argument("--spike-threshold", type=float, default=3.0, help="claim b: a spike's z")
    args = parser.parse_args(argv)
    out = args.root / "comparison"
    if args.stage == "select":
        rows = grid(args.root)
        print(write(rows, GRID, out / "grid.csv"))
        print(write([r for r in rows if r["selected"]], GRID, out / "selected.csv"))
        return
    if args.stage == "lr":
        print(selected_lr(args.root, args.arm))
        return
    runs = selected_runs(args.root)
    a = claim_a(runs, args.analysis)
    b = claim_b(runs, args.analysis, args.spike_window, args.spike_threshold)
    print(write(a, CLAIM_A, out / "claim_a.csv"))
    print(write(b, CLAIM_B, out / "claim_b.csv"))
    e = episodes(runs)
    print(write(e, EPISODES, out / "episodes.csv"))
    (out / "tables.md").write_text(tables(grid(args.root), a, b, e))
    print(out / "tables.md")


if __name__ == "__main__":
    main()
