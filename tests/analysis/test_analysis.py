"""Analysis over generated run directories: the rows, metrics.csv, tensorboard scalars, plots and the CLI."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.analysis import (
    COLUMNS,
    DEFAULT_SPEC,
    AnalysisError,
    Checkpoint,
    SpecError,
    analyze,
    load_spec,
    parse_spec,
    read_csv,
    save,
    scalar_tag,
)
from pico.components import ov_circuit
from pico.errors import exit_on
from pico.metrics import cka, condition_number, norm, per, pwcca
from pico.run_dir import list_steps
from tests.analysis.fake_run import make_run

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
WEIGHT_METRICS = ("per", "condition_number", "norm_fro", "norm_nuc", "norm_spectral", "norm_inf")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def keys(rows):
    return [(r.step, r.split, r.data_type, r.component, r.layer, r.head, r.metric) for r in rows]


def ld(run, step, split):
    return load_file(run / "checkpoints" / f"step_{step}" / "learning_dynamics" / f"{split}.safetensors")


def test_default_analysis_rows(run):
    rows = analyze([run], progress=False)
    steps, layers = (0, 10, 20), (0, 1)
    expected = set(itertools.product(steps, [None], ["weights"], MODULES, layers, [None], WEIGHT_METRICS))
    expected |= set(
        itertools.product(steps, ["train", "eval"], ["gradients"], MODULES, layers, [None], WEIGHT_METRICS)
    )
    expected |= set(
        itertools.product(steps, ["eval"], ["activations"], MODULES, layers, [None], ["cka@step_20"])
    )
    assert len(rows) == len(expected) and set(keys(rows)) == expected
    assert {r.run for r in rows} == {"tiny"}
    value = {k: r.value for k, r in zip(keys(rows), rows)}

    w = ld(run, 10, "weights")["weights.layers.1.attention.v_proj"].double()
    assert value[10, None, "weights", "attention.v_proj", 1, None, "per"] == per(w)
    assert value[10, None, "weights", "attention.v_proj", 1, None, "norm_inf"] == norm(w, "inf")
    g = ld(run, 0, "train")["gradients.layers.0.swiglu.w_2"].double()
    assert value[0, "train", "gradients", "swiglu.w_2", 0, None, "condition_number"] == condition_number(g)
    a0, a20 = (ld(run, s, "eval")["activations.layers.0.attention.o_proj"].double() for s in (0, 20))
    assert value[0, "eval", "activations", "attention.o_proj", 0, None, "cka@step_20"] == cka(a0, a20)
    assert value[20, "eval", "activations", "attention.o_proj", 0, None, "cka@step_20"] == pytest.approx(1.0)


def test_steps_without_learning_dynamics_are_skipped(run):
    assert (run / "checkpoints" / "step_5").is_dir()
    assert list_steps(run) == [0, 10, 20]


def test_outputs_csv_and_tensorboard(run):
    spec = parse_spec(
        {
            "name": "outputs",
            "metrics": ["per"],
            "data_types": ["weights"],
            "components": [{"name": "attention.v_proj", "layers": [1]}],
            "steps": [0, 20],
        }
    )
    rows = analyze([run], spec, progress=False)
    assert keys(rows) == [
        (0, None, "weights", "attention.v_proj", 1, None, "per"),
        (20, None, "weights", "attention.v_proj", 1, None, "per"),
    ]
    save(rows, [run], spec)
    out = run / "analysis" / "outputs"
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert (
        (out / "metrics.csv")
        .read_text()
        .splitlines()[1]
        .startswith("tiny,0,,weights,attention.v_proj,1,,per,0.")
    )
    assert read_csv(out / "metrics.csv") == rows

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["per/weights/attention.v_proj/layer_1"]
    scalars = events.Scalars("per/weights/attention.v_proj/layer_1")
    assert [s.step for s in scalars] == [0, 20]
    assert [s.value for s in scalars] == pytest.approx([r.value for r in rows], rel=1e-6)

    save(rows[:1], [run], spec)  # a re-run replaces the earlier outputs
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("per/weights/attention.v_proj/layer_1")] == [0]


def test_nan_is_written_not_raised(tmp_path):
    run = make_run(tmp_path / "nanrun", nan=(10, "gradients.layers.0.attention.o_proj"))
    spec = parse_spec(
        {
            "name": "nan",
            "metrics": ["per", "condition_number", "hoyer"],
            "data_types": ["gradients"],
            "splits": ["train"],
            "components": ["attention.o_proj"],
        }
    )
    rows = analyze([run], spec, progress=False)
    bad = [r for r in rows if r.step == 10 and r.layer == 0]
    assert len(bad) == 3 and all(math.isnan(r.value) for r in bad)
    assert all(math.isfinite(r.value) for r in rows if r not in bad)
    written = save(rows, [run], spec, plot=True)
    assert ",nan" in (run / "analysis" / "nan" / "metrics.csv").read_text()
    assert all(
        math.isnan(r.value)
        for r in read_csv(run / "analysis" / "nan" / "metrics.csv")
        if (r.step, r.layer) == (10, 0)
    )
    events = EventAccumulator(str(run / "analysis" / "nan" / "tensorboard"))
    events.Reload()
    assert math.isnan(events.Scalars(scalar_tag(bad[0]))[1].value)
    assert sum(p.suffix == ".png" for p in written) == 3


def test_ov_circuit_per_head_rows(run):
    spec = parse_spec(
        {
            "name": "ov",
            "components": ["ov_circuit"],
            "splits": ["eval"],
            "steps": [10, 20],
            "metrics": [
                {"name": "norm", "kind": "spectral", "data_types": ["weights"]},
                {"name": "cka", "target_step": 10},
            ],
        }
    )
    rows = analyze([run], spec, progress=False)
    expected = set(
        itertools.product([10, 20], [None], ["weights"], ["ov_circuit"], [0, 1], range(4), ["norm_spectral"])
    )
    expected |= set(
        itertools.product(
            [10, 20], ["eval"], ["activations"], ["ov_circuit"], [0, 1], range(4), ["cka@step_10"]
        )
    )
    assert set(keys(rows)) == expected and len(rows) == len(expected)
    w = ld(run, 20, "weights")
    ov = ov_circuit(
        w["weights.layers.1.attention.v_proj"].double(), w["weights.layers.1.attention.o_proj"].double(), 4, 2
    )
    value = {k: r.value for k, r in zip(keys(rows), rows)}
    assert value[20, None, "weights", "ov_circuit", 1, 3, "norm_spectral"] == pytest.approx(
        norm(ov[3], "spectral")
    )
    assert value[10, "eval", "activations", "ov_circuit", 0, 2, "cka@step_10"] == pytest.approx(1.0)


def test_compare_runs(tmp_path, run):
    small = make_run(tmp_path / "small", d_model=32, seed=1)
    spec = parse_spec(
        {
            "name": "runs",
            "metrics": [{"name": "pwcca", "compare": "runs"}, "gini"],
            "data_types": ["activations"],
            "splits": ["eval"],
            "components": ["attention.v_proj"],
        }
    )
    rows = analyze([run, small], spec, progress=False)
    compared = [r for r in rows if r.metric.startswith("pwcca")]
    assert {(r.run, r.step, r.layer, r.metric) for r in compared} == set(
        itertools.product(["tiny", "small"], [0, 10, 20], [0, 1], ["pwcca@tiny"])
    )
    assert {r.run for r in rows if r.metric == "gini"} == {"tiny", "small"}
    x = ld(small, 10, "eval")["activations.layers.0.attention.v_proj"].double()
    y = ld(run, 10, "eval")["activations.layers.0.attention.v_proj"].double()
    value = {(r.run, r.step, r.layer): r.value for r in compared}
    assert value["small", 10, 0] == pwcca(x, y)
    assert value["tiny", 10, 0] == pwcca(y, y) == pytest.approx(1.0)  # the reference, against itself
    save(rows, [run, small], spec)  # so the reference's metrics.csv holds rows, not just the header
    reference = read_csv(run / "analysis" / "runs" / "metrics.csv")
    assert {r.run for r in reference if r.metric == "pwcca@tiny"} == {"tiny"}
    with pytest.raises(SpecError, match="needs at least two --run"):
        analyze([run], spec, progress=False)


def test_checkpoint_reads_lazily_and_once(tmp_path):
    run = make_run(tmp_path / "lazy", steps=(0, 1))
    for step in (0, 1):
        (run / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train.safetensors").unlink()
    rows = analyze(
        [run], {"metrics": ["per"], "data_types": ["weights"]}, progress=False
    )  # never opens train
    assert len(rows) == 2 * 3 * 2
    ckpt = Checkpoint(run, 0, torch.device("cpu"), torch.float64)
    first = ckpt.load("weights", "layers.0.swiglu.w_2")
    assert first.dtype == torch.float64 and ckpt.load("weights", "layers.0.swiglu.w_2") is first
    with pytest.raises(ValueError, match="train.safetensors: missing"):
        ckpt.load("gradients", "layers.0.swiglu.w_2", "train")


def test_spec_errors(run):
    with pytest.raises(SpecError, match="^metricz: unknown key"):
        parse_spec({"metricz": ["per"]})
    with pytest.raises(SpecError, match=r"^metrics\[1\]\.kernal: unknown key"):
        parse_spec({"metrics": ["per", {"name": "cka", "kernal": "rbf"}]})
    with pytest.raises(SpecError, match=r"^metrics\[0\]\.name: unknown metric 'perr'"):
        parse_spec({"metrics": ["perr"]})
    with pytest.raises(SpecError, match=r"^metrics\[0\]\.data_types: cka does not suit weights"):
        parse_spec({"metrics": [{"name": "cka", "data_types": ["weights"]}]})
    with pytest.raises(SpecError, match="share the label 'norm_fro'"):
        parse_spec({"metrics": [{"name": "norm", "kind": "fro"}, {"name": "norm", "kind": "fro"}]})
    with pytest.raises(SpecError, match=r"^splits: unknown 'test'"):
        parse_spec({"metrics": ["per"], "splits": ["test"]})
    with pytest.raises(SpecError, match="^steps: expected a non-negative integer"):
        parse_spec({"metrics": ["per"], "steps": "some"})
    with pytest.raises(SpecError, match=r"^components\[0\]\.layer: unknown key"):
        parse_spec({"metrics": ["per"], "components": [{"name": "swiglu.w_2", "layer": 1}]})
    with pytest.raises(SpecError, match="train split holds a different batch"):
        analyze([run], {"metrics": [{"name": "cka", "splits": ["train"]}]}, progress=False)
    with pytest.raises(AnalysisError, match="no step 7 with learning_dynamics"):
        analyze([run], {"metrics": ["per"], "steps": [7]}, progress=False)
    with pytest.raises(AnalysisError, match="has no layer 5"):
        analyze(
            [run], {"metrics": ["per"], "components": [{"name": "swiglu.w_2", "layers": [5]}]}, progress=False
        )
    with pytest.raises(ValueError, match="not a run directory"):
        analyze([run / "checkpoints"], progress=False)


def test_bad_spec_and_missing_step_are_one_line_of_their_kind(run, capsys):
    """Both are PicoErrors: pico.errors.exit_on prints `<kind>: <message>` and exits 2."""
    for call, line in [
        (lambda: load_spec(None, ["steps=some"]), "spec error: steps: expected a non-negative integer"),
        (lambda: analyze([run], {"metrics": ["per"], "steps": [7]}), "analysis error: "),
    ]:
        with pytest.raises(SystemExit) as e, exit_on():
            call()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_default_yaml_is_the_default_spec():
    assert load_spec(ROOT / "recipes" / "configs" / "analyze.yaml") == load_spec() == parse_spec(DEFAULT_SPEC)
    spec = load_spec(ROOT / "recipes" / "configs" / "analyze_ov.yaml", ["steps=[0, 10]"])
    assert spec.name == "analyze_ov" and spec.steps == (0, 10)


def cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "analyze.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def test_cli_default_with_plots(tmp_path):
    run = make_run(tmp_path / "clirun", steps=(0, 3))
    result = cli("--run", run, "--plot")
    assert result.returncode == 0, result.stderr
    out = run / "analysis" / "default"
    rows = read_csv(out / "metrics.csv")
    assert {r.metric for r in rows} == set(WEIGHT_METRICS) | {"cka@step_3"}
    pngs = sorted((out / "plots").glob("*.png"))
    groups = {(r.metric, r.data_type, r.component, r.split) for r in rows}
    assert len(pngs) == len(groups) == 6 * 3 * 3 + 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "plots" / "per__weights__swiglu.w_2.png").is_file()


def test_cli_bad_key_exits_2(run):
    result = cli("--run", run, "metricz=[per]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spec error: metricz: unknown key (allowed: name, steps, splits, data_types, components, metrics, "
        "compare, "
        "target_step, device, dtype, evals, groups)"
    ]
