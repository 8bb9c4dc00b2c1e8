"""Groups of runs: groups.csv's means and 95% t-intervals against a recomputation from the runs' own
metrics.csv (float64, scipy), grouping by glob, the spec key and the --group flag, bad input, the plots."""

import csv
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as plt_image
from matplotlib.colors import to_rgb
from scipy import stats

from pico.analysis import (
    GROUP_COLUMNS,
    AnalysisError,
    Row,
    Rows,
    SpecError,
    analyze,
    group_rows,
    group_runs,
    load_spec,
    open_run,
    parse_spec,
    read_groups_csv,
    save,
    t_interval,
    with_groups,
)
from tests.analysis.fake_run import make_run

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"metrics": ["per"], "data_types": ["weights"], "components": ["attention.v_proj"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three base seeds (one stopped at step 10) and two relora seeds, each with eval.json files."""
    root = tmp_path_factory.mktemp("groups")
    for i, steps in enumerate([(0, 10, 20), (0, 10, 20), (0, 10)]):
        make_run(root / f"base-{i}", steps=steps, seed=i, evals=True)
    for i in range(2):
        make_run(root / f"relora-{i}", steps=(0, 10, 20), seed=10 + i, evals=True)
    return root


def scipy_interval(values):
    """(mean, low, high, n) in float64 as a textbook writes it: mean ± t.ppf(0.975, n-1) · s / sqrt(n)."""
    x = np.array(values, dtype=np.float64)
    n, mean = len(x), math.fsum(x) / len(x)
    if n == 1:
        return mean, math.nan, math.nan, 1
    s = math.sqrt(math.fsum((x - mean) ** 2) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half, n


def recompute(metrics_csvs, groups):
    """{(group, step, split, data_type, component, layer, head, metric): scipy_interval} from the runs'
    metrics.csv files, read with the csv module (cells as the strings they are)."""
    owner = {run: group for group, names in groups.items() for run in names}
    values = defaultdict(list)
    for path in metrics_csvs:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                key = (owner[r["run"]], *(r[c] for c in ("step", "split", "data_type", "component")))
                values[(*key, r["layer"], r["head"], r["metric"])].append(float(r["value"]))
    return {key: scipy_interval(v) for key, v in values.items()}


def read_groups_as_strings(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == GROUP_COLUMNS
        return {tuple(r[c] for c in GROUP_COLUMNS[:8]): r for r in reader}


def assert_matches(groups_csv, metrics_csvs, groups):
    got, want = read_groups_as_strings(groups_csv), recompute(metrics_csvs, groups)
    assert got.keys() == want.keys()
    for key, (mean, low, high, n) in want.items():
        row = got[key]
        assert int(row["n"]) == n
        for column, value in [("mean", mean), ("ci_low", low), ("ci_high", high)]:
            if math.isnan(value):
                assert row[column] == "nan", (key, column)
            else:
                assert float(row[column]) == pytest.approx(value, rel=1e-12, abs=1e-15), (key, column)
    return got


def test_t_interval_equals_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10, 40):
        x = rng.normal(3.0, 0.5, n)
        mean, low, high = t_interval(x)
        ref = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert mean == pytest.approx(x.mean(), rel=1e-15)
        assert (low, high) == pytest.approx(ref, rel=1e-13)
        assert t_interval(x, level=0.9)[1:] == pytest.approx(
            stats.t.interval(0.9, n - 1, loc=x.mean(), scale=stats.sem(x)), rel=1e-13
        )
    assert t_interval([2.5])[0] == 2.5 and all(map(math.isnan, t_interval([2.5])[1:]))
    assert t_interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    mean, low, high = t_interval([1.0, math.inf])
    assert mean == math.inf and math.isnan(low) and math.isnan(high)
    with pytest.raises(AnalysisError, match="confidence level"):
        t_interval([1.0, 2.0], level=95)


def test_group_runs_by_glob(runs, tmp_path):
    (runs / "base-notes.txt").write_text("a file, not a run")
    found = group_runs({"base": str(runs / "base-*"), "relora": str(runs / "relora-[01]")})
    assert found["base"] == [runs / f"base-{i}" for i in range(3)]
    assert found["relora"] == [runs / f"relora-{i}" for i in range(2)]
    assert group_runs([("all", str(runs / "*-1"))]) == {"all": [runs / "base-1", runs / "relora-1"]}
    with pytest.raises(AnalysisError, match=r"^group x: '.*nothing-\*' matches no directory$"):
        group_runs({"x": str(runs / "nothing-*")})
    with pytest.raises(AnalysisError, match=r"relora-1: in two groups, relora and ones"):
        group_runs({"relora": str(runs / "relora-*"), "ones": str(runs / "*-1")})


def test_group_rows_equal_a_recomputation(runs):
    """analyze → save(groups=...) → groups.csv equals the intervals recomputed from each run's metrics.csv;
    base-2 has no step 20 (n = 2 there), a series one run lacks has n counting the others."""
    groups = group_runs({"base": str(runs / "base-*"), "relora": str(runs / "relora-*")})
    paths = [run for members in groups.values() for run in members]
    spec = parse_spec({**SPEC, "name": "g", "evals": ["blimp/acc", "paloma/perplexity"]})
    rows = analyze(paths, spec, progress=False)
    written = save(rows, paths, spec, groups=groups)
    groups_csv = runs / "base-0" / "analysis" / "g" / "groups.csv"
    assert groups_csv in written
    names = {g: [p.name for p in members] for g, members in groups.items()}
    got = assert_matches(groups_csv, [p / "analysis" / "g" / "metrics.csv" for p in paths], names)
    assert got["base", "20", "", "weights", "attention.v_proj", "0", "", "per"]["n"] == "2"
    assert got["base", "10", "", "weights", "attention.v_proj", "0", "", "per"]["n"] == "3"
    assert got["relora", "20", "", "eval", "blimp", "", "", "acc"]["n"] == "2"
    table = read_groups_csv(groups_csv)
    assert table == group_rows(rows, groups) and [r.group for r in table][0] == "base"
    # a series missing in one run: n counts the runs that have it; with one run left, no interval
    some = Rows(r for r in rows if not (r.run == "base-0" and r.layer == 1))
    only = Rows(r for r in some if not (r.run == "base-1" and r.layer == 1))
    for table, n in [(group_rows(some, groups), 2), (group_rows(only, groups), 1)]:
        row = next(r for r in table if r.group == "base" and r.step == 0 and r.layer == 1)
        assert row.n == n and math.isnan(row.ci_low) == (n == 1)
    save(rows, paths, spec)  # without groups: an earlier groups.csv is gone
    assert not groups_csv.exists()


def test_group_rows_of_notebook_rows(runs):
    """Run.evals() rows group as the analysis' eval rows; runs by name or path; runs in no group left out."""
    evals = Rows(row for i in range(3) for row in open_run(runs / f"base-{i}").evals())
    table = group_rows(evals, {"base": [runs / "base-0", "base-1", runs / "base-2"]})
    row = next(r for r in table if (r.step, r.component, r.metric) == (10, "blimp", "acc"))
    assert (row.group, row.data_type, row.split, row.n) == ("base", "eval", None, 3)
    assert row.mean == pytest.approx(0.6) and (row.ci_low, row.ci_high) == pytest.approx((0.6, 0.6))
    assert {r.n for r in group_rows(evals, {"two": ["base-0", "base-1"]})} == {2}
    frame = table.to_frame()
    assert list(frame.columns) == list(GROUP_COLUMNS) and len(frame) == len(table)


def test_group_rows_bad_input():
    row = Row("a", 0, None, "weights", "attention.v_proj", 0, None, "per", 1.0)
    with pytest.raises(AnalysisError, match="^run a: in two groups, x and y"):
        group_rows([row], {"x": ["a"], "y": ["a"]})
    with pytest.raises(AnalysisError, match=r"^group y: none of its runs \(b\) has rows$"):
        group_rows([row], {"x": ["a"], "y": ["b"]})
    with pytest.raises(AnalysisError, match="^run a: two values of"):
        group_rows([row, row._replace(value=2.0)], {"x": ["a"]})


def test_spec_key_and_flag():
    spec = parse_spec({"metrics": ["per"], "groups": {"base": "runs/base-*", "relora": "runs/relora-*"}})
    assert spec.groups == (("base", "runs/base-*"), ("relora", "runs/relora-*"))
    merged = with_groups(spec, ["relora=other/relora-*", "maml=runs/maml-?"])
    assert merged.groups == (("base", "runs/base-*"), ("relora", "other/relora-*"), ("maml", "runs/maml-?"))
    assert load_spec(None, ["groups={a: 'r/a-*'}"]).groups == (("a", "r/a-*"),)
    for bad, message in [
        ({"groups": ["runs/*"]}, "groups: expected a mapping of NAME: GLOB"),
        ({"groups": {"a b": "x"}}, "groups: group name 'a b': expected letters"),
        ({"groups": {"a": ""}}, "groups: group a: expected a glob"),
    ]:
        with pytest.raises(SpecError, match=f"^{message}"):
            parse_spec({"metrics": ["per"], **bad})
    for options, message in [
        (["base"], "--group 'base': expected NAME=GLOB"),
        (["=runs/*"], "--group '=runs/\\*': group name '': expected"),
        (["a=x", "a=y"], "--group 'a=y': group a given twice"),
    ]:
        with pytest.raises(SpecError, match=f"^{message}"):
            with_groups(spec, options)


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "analyze.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def test_cli_group_flag_and_spec_key_with_plots(runs):
    """--group and the spec's groups (globs relative to the working directory): groups.csv in the first
    run's folder equals the recomputation, and plots/groups/ holds one PNG per figure, bands drawn."""
    config = runs / "groups.yaml"
    config.write_text(
        "name: cli\nmetrics: [per]\ndata_types: [weights]\ncomponents: [attention.v_proj]\n"
        "evals: [blimp/acc]\ngroups: {base: base-*}\n"
    )
    result = cli("--config", config, "--plot", "--group", "relora=relora-*", cwd=runs)
    assert result.returncode == 0, result.stderr
    out = runs / "base-0" / "analysis" / "cli"
    assert "base-0/analysis/cli/groups.csv" in result.stdout
    runs_named = {"base": ["base-0", "base-1", "base-2"], "relora": ["relora-0", "relora-1"]}
    metrics = [runs / run / "analysis" / "cli" / "metrics.csv" for run in sum(runs_named.values(), [])]
    assert_matches(out / "groups.csv", metrics, runs_named)
    pngs = sorted(p.name for p in (out / "plots" / "groups").glob("*.png"))
    assert pngs == ["eval__blimp__acc.png", "per__weights__attention.v_proj.png"]
    image = plt_image.imread(out / "plots" / "groups" / pngs[1])[..., :3] * 255  # (H, W, RGB)
    for color in ("tab:blue", "tab:orange"):  # each group's band: its colour at alpha 0.2 over white
        band = 0.8 * 255 + 0.2 * np.array(to_rgb(color)) * 255
        assert (np.abs(image - band).max(axis=-1) < 2).sum() > 1000, color
    assert not (runs / "relora-0" / "analysis" / "cli" / "groups.csv").exists()


@pytest.mark.parametrize(
    "args, line",
    [
        (["--group", "base=nothing-*"], "analysis error: group base: 'nothing-*' matches no directory"),
        (
            ["--group", "base=base-*", "--group", "ones=*-1"],
            "analysis error: base-1: in two groups, base and ones; a run belongs to one group",
        ),
        (["--group", "base"], "spec error: --group 'base': expected NAME=GLOB, e.g. base='runs/base-*'"),
        (
            ["groups=[base-*]"],
            "spec error: groups: expected a mapping of NAME: GLOB, e.g. {base: runs/base-*}",
        ),
    ],
)
def test_cli_bad_groups_exit_2(runs, args, line):
    result = cli(*args, "metrics=[per]", cwd=runs)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr
