"""recipes/case_studies.sh end to end with tiny steps (base and ReLoRA on a 2-lr grid at 2 seeds, the
lr-allocation control, then the comparison), its numbers recomputed in float64 from the runs' own files with
scipy; and a rerun that skips the finished runs and resumes an interrupted one. MAML's arm and control are the
same loop with recipes/maml.py (tests/recipes/test_maml.py runs it); left out here to keep the test short."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.analysis import train_loss

LRS, SEEDS, STEPS, WINDOW = ("3e-3", "1e-2"), (0, 1), 5, 2
ARMS, CONTROLS = ("base", "relora"), {"blocklr": "relora"}
ENV = {
    "LRS": " ".join(LRS),
    "SEEDS": "0 1",
    "STEPS": str(STEPS),
    "SAVE_EVERY": "1",
    "BATCH": "4",
    "MICRO": "2",
}
ENV |= {"EVAL_BATCHES": "1", "NPROC_PER_NODE": "1", "SPIKE_WINDOW": str(WINDOW), "ARMS": " ".join(ARMS)}
ENV |= {"CONTROLS": " ".join(CONTROLS)}


def interval(values):
    """Mean and 95% Student-t interval, by scipy (of zero width when the values are equal)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) > 1 and np.ptp(values) == 0:
        return values.mean(), values.mean(), values.mean()
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return values.mean(), low, high


def rows(path):
    """The rows of a CSV as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_loss(run):
    """The held-out (paloma) loss and perplexity of the run's last checkpoint, from its eval.json."""
    result = json.loads((run / "checkpoints" / f"step_{STEPS}" / "eval.json").read_text())["paloma"]
    return result["loss"], result["perplexity"]


def layer_mean(run, data_type, component, metric):
    """{step: mean over layers} of a run's metrics.csv (eval split for gradients)."""
    values = {}
    for r in rows(run / "analysis" / "case_studies" / "metrics.csv"):
        if (r["data_type"], r["component"], r["metric"]) == (data_type, component, metric):
            values.setdefault(int(r["step"]), []).append(float(r["value"]))
    return {step: np.mean(v, dtype=np.float64) for step, v in sorted(values.items())}


def spike_z(loss, window):
    """Each logged loss's z against the `window` losses before it (population std), 0 below the mean."""
    steps, z = sorted(loss), {}
    for i, step in enumerate(steps):
        before = np.array([loss[s] for s in steps[max(0, i - window) : i]], dtype=np.float64)
        full = len(before) == window and before.std() > 0
        z[step] = max(0.0, (loss[step] - before.mean()) / before.std()) if full else 0.0
    return z


def scalar_events(run, tag):
    """A run's tensorboard events of `tag`."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)


def close(got, expected):
    """Equal to 1e-9, or both NaN."""
    return (math.isnan(float(got)) and math.isnan(expected)) or float(got) == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.timeout(900)  # 11 launches of a recipe and 2 analyses: about 280 s on 2 cores
def test_protocol_end_to_end_and_its_numbers_recomputed(tmp_path, run_demo_script):
    root = tmp_path / "cs"
    out = run_demo_script("case_studies.sh", {"ROOT": str(root), **ENV}).stdout
    runs, comparison = root / "runs", root / "comparison"

    # The grid: every arm x lr x seed, mean and t-interval of the final held-out loss from each eval.json.
    grid = rows(comparison / "grid.csv")
    selected = {r["arm"]: r["lr"] for r in grid if r["selected"] == "True"}
    for arm in ARMS:
        means = {}
        for lr in LRS:
            (row,) = [r for r in grid if (r["arm"], r["lr"]) == (arm, lr)]
            finals = [final_loss(runs / f"{arm}_lr{lr}_s{s}") for s in SEEDS]
            loss, perplexity = interval([f[0] for f in finals]), interval([f[1] for f in finals])
            assert all(close(row[k], v) for k, v in zip(("loss", "loss_ci_low", "loss_ci_high"), loss)), row
            assert close(row["perplexity_ci_high"], perplexity[2]) and int(row["n"]) == 2
            means[lr] = loss[0]
        assert selected[arm] == min(means, key=means.get), "the lr of the lowest mean held-out loss"
    for control, parent in CONTROLS.items():  # at its arm's selected lr, and only there
        assert sorted(p.name for p in runs.glob(f"{control}_lr*")) == [
            f"{control}_lr{selected[parent]}_s{s}" for s in SEEDS
        ]
        assert selected[control] == selected[parent]
    chosen = {arm: [runs / f"{arm}_lr{lr}_s{s}" for s in SEEDS] for arm, lr in selected.items()}

    # Claim (a): seed-paired mean log10 ratio of the eval-gradient condition number to base's.
    for r in rows(comparison / "claim_a.csv"):
        diffs = []
        for mine, ref in zip(chosen[r["arm"]], chosen["base"]):
            a, b = (layer_mean(run, "gradients", r["component"], "condition_number") for run in (mine, ref))
            diffs.append(np.mean([np.log10(a[s]) - np.log10(b[s]) for s in a if s > 0]))
        assert all(close(r[k], v) for k, v in zip(("log10_ratio", "ci_low", "ci_high"), interval(diffs))), r
    assert len(rows(comparison / "claim_a.csv")) == 2 * (len(selected) - 1)

    # Claim (b): per seed, Spearman (scipy) of an interval's largest loss-spike z and the PER dip at its end.
    for r in rows(comparison / "claim_b.csv"):
        rhos = []
        for run in chosen[r["arm"]]:
            per, z = layer_mean(run, r["data_type"], r["component"], "per"), spike_z(train_loss(run), WINDOW)
            steps = sorted(per)
            inner = range(2, len(steps) - 1)
            score = [max(z[k] for k in z if steps[i - 1] + 1 < k <= steps[i] + 1) for i in inner]
            dips = [per[steps[i]] - (per[steps[i - 1]] + per[steps[i + 1]]) / 2 for i in inner]
            constant = len(set(score)) < 2 or len(set(dips)) < 2
            rhos.append(math.nan if constant else stats.spearmanr(score, dips).statistic)
        assert close(r["spearman"], np.mean(rhos)), r
        assert int(r["checkpoints"]) == 2 * (STEPS + 1 - 3)

    # groups.csv in the comparison: each arm's mean and interval over its seeds' metrics.csv, one series.
    groups = [
        r for r in rows(comparison / "groups.csv") if r["metric"] == "per" and r["data_type"] == "weights"
    ]
    for g in (g for g in groups if g["component"] == "attention.v_proj" and g["layer"] == "1"):
        values = [
            float(r["value"])
            for run in chosen[g["group"]]
            for r in rows(run / "analysis" / "case_studies" / "metrics.csv")
            if (r["step"], r["data_type"], r["component"], r["layer"], r["metric"])
            == (g["step"], "weights", "attention.v_proj", "1", "per")
        ]
        assert all(close(g[k], v) for k, v in zip(("mean", "ci_low", "ci_high"), interval(values))), g
    # episodes.csv: no MAML arm here, so only the fraction of steps whose gradient norm exceeded the clip.
    for r in rows(comparison / "episodes.csv"):
        assert r["statistic"] == "grad_norm_above_1"
        fractions = [
            np.mean([e.value > 1 for e in scalar_events(run, "train/grad_norm")]) for run in chosen[r["arm"]]
        ]
        assert all(close(r[k], v) for k, v in zip(("mean", "ci_low", "ci_high"), interval(fractions))), r
    assert list((comparison / "plots").glob("*.png")) and (comparison / "tables.md").is_file()
    assert "== training:" in out

    # Rerun: finished runs are skipped, an interrupted one resumes from its latest checkpoint.
    cut = runs / f"base_lr{LRS[0]}_s0"
    shutil.rmtree(cut / "checkpoints" / f"step_{STEPS}")
    (cut / "checkpoints" / "latest").write_text(f"step_{STEPS - 1}\n")
    again = run_demo_script("case_studies.sh", {"ROOT": str(root), **ENV}).stdout
    assert again.count(": done (") == len(ARMS) * len(LRS) * len(SEEDS) + len(CONTROLS) * len(SEEDS) - 1
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    starts = json.loads((cut / "run.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, STEPS - 1]


def test_claim_b_statistics_equal_scipy_on_a_series_with_spikes():
    """Spike scores (pico.spikes.SpikeDetector's z) and the Spearman correlation of interval scores and PER
    dips, against an independent numpy z-score and scipy's spearmanr, on a noisy loss with three spikes."""
    from recipes.case_studies import checkpoint_spikes, spearman, spike_scores

    rng = np.random.default_rng(0)
    loss = {k: 6 - 0.01 * k + 0.02 * rng.standard_normal() for k in range(1, 81)}
    for k in (23, 47, 61):
        loss[k] += 0.5
    z = spike_scores(loss, 10)
    expected = spike_z(loss, 10)
    assert z.keys() == expected.keys() and all(z[k] == pytest.approx(expected[k], abs=1e-9) for k in z)
    assert {k for k, v in z.items() if v > 3} == {23, 47, 61}
    per = {s: 0.9 - 0.001 * s + 0.01 * rng.standard_normal() for s in range(0, 81, 8)}
    score, dips = checkpoint_spikes(per, z)
    steps = sorted(per)
    assert len(score) == len(steps) - 3
    assert score == [
        max(z[k] for k in z if steps[i - 1] + 1 < k <= steps[i] + 1) for i in range(2, len(steps) - 1)
    ]
    assert spearman(score, dips) == pytest.approx(stats.spearmanr(score, dips).statistic, abs=1e-12)
    ties = [1.0, 2.0, 2.0, 3.0, 0.5]
    assert spearman(ties, [5, 3, 4, 1, 2]) == pytest.approx(stats.spearmanr(ties, [5, 3, 4, 1, 2]).statistic)
    assert math.isnan(spearman([0.0, 0.0, 0.0], [1, 2, 3]))  # a constant score: no correlation defined
