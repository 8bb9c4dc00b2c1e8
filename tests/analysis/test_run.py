"""The read API (open_run, evals, Rows → DataFrame), the shared SVDs, eval rows and cross-run plots."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.analysis import (
    COLUMNS,
    AnalysisError,
    EvalRow,
    Row,
    SpecError,
    analyze,
    open_run,
    parse_spec,
    read_csv,
    save,
)
from pico.components import ov_circuit
from pico.metrics import condition_number, norm, per
from tests.analysis.fake_run import make_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "evalrun", steps=(0, 10, 20), evals=True)


def ld(run, step, split):
    return load_file(run / "checkpoints" / f"step_{step}" / "learning_dynamics" / f"{split}.safetensors")


def test_open_run_reads_tensors_and_components(run):
    r = open_run(run)
    assert r.steps == [0, 10, 20] and r.name == "evalrun"
    assert r.modules("weights") == [k.removeprefix("weights.") for k in sorted(ld(run, 0, "weights"))]
    assert len(r.modules("weights")) == 6
    grad = r.tensor("gradients", "layers.1.attention.v_proj", step=10, split="eval")
    assert grad.dtype == torch.float64
    assert torch.equal(grad, ld(run, 10, "eval")["gradients.layers.1.attention.v_proj"].double())
    weights = ld(run, 20, "weights")
    w = r.tensor("weights", "layers.0.swiglu.w_2", step=20, split="train")  # weights ignore split
    assert torch.equal(w, weights["weights.layers.0.swiglu.w_2"].double())
    ov = r.component("ov_circuit", layer=1, data_type="weights", step=20)
    expected = ov_circuit(
        weights["weights.layers.1.attention.v_proj"].double(),
        weights["weights.layers.1.attention.o_proj"].double(),
        4,
        2,
    )
    assert ov.shape == (4, 16, 16) and torch.equal(ov, expected)
    assert open_run(run, dtype="float32").tensor("weights", "layers.0.swiglu.w_2", 0).dtype == torch.float32


def test_open_run_errors_name_the_culprit(run, tmp_path):
    r = open_run(run)
    with pytest.raises(
        AnalysisError, match=r"evalrun: no step 7 with learning_dynamics \(steps: \[0, 10, 20\]\)"
    ):
        r.tensor("weights", "layers.0.swiglu.w_2", step=7)
    with pytest.raises(AnalysisError, match=r"^gradients need split= one of \['train', 'eval'\], got None"):
        r.tensor("gradients", "layers.0.swiglu.w_2", step=0)
    with pytest.raises(AnalysisError, match="^data_type: unknown 'grads'"):
        r.tensor("grads", "layers.0.swiglu.w_2", step=0, split="eval")
    with pytest.raises(
        AnalysisError, match=r"step_0/learning_dynamics/eval.safetensors: no tensor 'gradients.layers.9"
    ):
        r.tensor("gradients", "layers.9.swiglu.w_2", step=0, split="eval")
    with pytest.raises(AnalysisError, match="^unknown component 'qk_circuit'"):
        r.component("qk_circuit", layer=0, data_type="weights", step=0)
    with pytest.raises(ValueError, match="not a run directory"):
        open_run(tmp_path)
    with pytest.raises(SpecError, match="^device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        open_run(run, device="gpu")

    broken = make_run(tmp_path / "broken", steps=(0,))
    path = broken / "checkpoints" / "step_0" / "learning_dynamics" / "eval.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated mid-write
    b = open_run(broken)
    with pytest.raises(ValueError, match=f"^{path}: not a readable safetensors file"):
        b.tensor("gradients", "layers.0.swiglu.w_2", step=0, split="eval")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"^{path}: not a readable safetensors file"):
        open_run(broken).tensor("activations", "layers.0.swiglu.w_2", step=0, split="eval")


def test_evals_tidy_table_reads_both_shapes(run):
    rows = open_run(run).evals()
    assert all(isinstance(r, EvalRow) for r in rows)
    at = {(r.step, r.task, r.subset, r.metric): r.value for r in rows}
    # step 0 is the old {"perplexity": {...}} shape, filed under paloma; counts and failed tasks are left out
    assert {k for k in at if k[0] == 0} == {(0, "paloma", None, "loss"), (0, "paloma", None, "perplexity")}
    assert {k for k in at if k[0] == 10} == {
        (10, "paloma", None, "loss"),
        (10, "paloma", None, "perplexity"),
        (10, "blimp", None, "acc"),
        (10, "blimp", "anaphor_gender_agreement", "acc"),
        (10, "blimp", "morphology", "acc"),
    }
    assert at[20, "paloma", None, "perplexity"] == pytest.approx(math.exp(4.8))
    assert at[20, "blimp", "morphology", "acc"] == pytest.approx(0.8)
    frame = rows.to_frame()
    assert list(frame.columns) == ["run", "step", "task", "subset", "metric", "value"]
    assert len(frame) == len(rows) == 2 + 5 + 5


def test_bad_eval_json_names_the_file(tmp_path):
    bad = make_run(tmp_path / "bad", steps=(0, 10), evals=True)
    path = bad / "checkpoints" / "step_10" / "eval.json"
    path.write_text('{"step": 10, "paloma": {"loss": 4.')
    with pytest.raises(AnalysisError, match=f"^{path}: not a readable eval.json"):
        open_run(bad).evals()
    path.write_text(json.dumps({"step": 10, "blimp": {"acc": 0.5, "subsets": [1, 2]}}))
    with pytest.raises(AnalysisError, match=f"^{path}: blimp.subsets is not an object of subsets"):
        open_run(bad).evals()


def test_analysis_rows_become_a_dataframe(run):
    rows = analyze([run], {"metrics": ["per"], "data_types": ["weights"]}, progress=False)
    for frame in (rows.to_frame(), pd.DataFrame(rows)):
        assert list(frame.columns) == list(COLUMNS) == list(Row._fields)
        assert len(frame) == 3 * 6
        assert frame["value"].tolist() == [r.value for r in rows]


def test_spectral_metrics_share_one_svd_and_keep_their_values(run, monkeypatch):
    svdvals, calls = torch.linalg.svdvals, []
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a: calls.append(a.shape) or svdvals(a))
    spec = {
        "metrics": [
            "per",
            "condition_number",
            {"name": "norm", "kind": "nuc"},
            {"name": "norm", "kind": "spectral"},
        ]
        + [{"name": "norm", "kind": "fro"}],
        "data_types": ["weights", "gradients"],
        "components": ["attention.v_proj", "swiglu.w_2", "ov_circuit"],
        "splits": ["eval"],
    }
    rows = analyze([run], spec, progress=False)
    # per step: weights and eval gradients of 2 modules × 2 layers, and 4 heads of 2 layers' OV circuit, twice
    assert len(calls) == 3 * (2 * 2 * 2 + 2 * 2 * 4)
    metrics = {
        "per": per,
        "condition_number": condition_number,
        "norm_nuc": lambda x, dtype: norm(x, "nuc", dtype),
        "norm_spectral": lambda x, dtype: norm(x, "spectral", dtype),
        "norm_fro": lambda x, dtype: norm(x, "fro", dtype),
    }
    r = open_run(run)
    for row in rows:  # every value equals, bitwise, the metric computed alone on the tensor
        if row.component == "ov_circuit":
            x = r.component("ov_circuit", row.layer, row.data_type, row.step, row.split)[row.head]
        else:
            module = f"layers.{row.layer}.{row.component}"
            x = r.tensor(row.data_type, module, row.step, row.split)
        expected = metrics[row.metric](x, dtype=torch.float64)
        assert row.value == expected or (math.isnan(row.value) and math.isnan(expected)), row


def test_eval_rows_join_the_table_and_outputs(run, tmp_path):
    other = make_run(tmp_path / "other", steps=(0, 10, 20), seed=1, evals=True)
    spec = parse_spec(
        {
            "name": "with_evals",
            "metrics": ["condition_number"],
            "data_types": ["gradients"],
            "splits": ["eval"],
            "components": ["attention.v_proj"],
            "evals": ["blimp/acc", "paloma/perplexity", "blimp/morphology/acc"],
        }
    )
    rows = analyze([run, other], spec, progress=False)
    evals = [r for r in rows if r.data_type == "eval"]
    assert {(r.run, r.step, r.split, r.component, r.layer, r.head, r.metric) for r in evals} == {
        (name, step, None, component, None, None, metric)
        for name in ("evalrun", "other")
        for step, component, metric in [
            (0, "paloma", "perplexity"),
            (10, "paloma", "perplexity"),
            (20, "paloma", "perplexity"),
            (10, "blimp", "acc"),
            (20, "blimp", "acc"),
            (10, "blimp/morphology", "acc"),
            (20, "blimp/morphology", "acc"),
        ]
    }
    written = save(rows, [run, other], spec, plot=True)
    out = run / "analysis" / "with_evals"
    assert [r for r in read_csv(out / "metrics.csv") if r.data_type == "eval"] == [
        r for r in evals if r.run == "evalrun"
    ]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("eval/blimp/acc")] == [10, 20]
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == [
        "condition_number__gradients__eval__attention.v_proj.png",
        "eval__blimp__acc.png",
        "eval__blimp_morphology__acc.png",
        "eval__paloma__perplexity.png",
    ]
    compared = sorted(p.name for p in (out / "plots" / "runs").glob("*.png"))
    assert compared == plots  # one comparison plot per metric, one line per run
    assert not (other / "analysis" / "with_evals" / "plots" / "runs").exists()
    assert sum(p.suffix == ".png" for p in written) == 4 + 4 + 4

    with pytest.raises(
        ValueError, match=r"evals\[0\] 'blimp/acc_norm' matches nothing .* blimp/acc, paloma/loss"
    ):
        analyze([run], {"metrics": ["per"], "evals": ["blimp/acc_norm"]}, progress=False)
    with pytest.raises(ValueError, match=r"^evals\[0\]: expected task, task/metric or task/subset/metric"):
        parse_spec({"metrics": ["per"], "evals": ["blimp//acc"]})


def test_cli_plots_task_metrics_next_to_dynamics(run, tmp_path):
    other = make_run(tmp_path / "other", steps=(0, 10, 20), seed=1, evals=True)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "analyze.py"),
            "--run",
            str(run),
            "--run",
            str(other),
            "--plot",
            "name=blimp_vs_cond",
            "metrics=[condition_number]",
            "data_types=[gradients]",
            "splits=[eval]",
            "components=[attention.v_proj]",
            "evals=[blimp/acc]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    plots = run / "analysis" / "blimp_vs_cond" / "plots"
    names = ["condition_number__gradients__eval__attention.v_proj.png", "eval__blimp__acc.png"]
    assert sorted(p.name for p in plots.glob("*.png")) == names
    assert sorted(p.name for p in (plots / "runs").glob("*.png")) == names
    assert f"{plots / 'runs'}/ (2 plots)" in result.stdout


def test_losses_are_read_without_a_module_and_missing_ones_are_named(run):
    r = open_run(run)  # written without per-token losses, as a train split or an older checkpoint is
    with pytest.raises(
        AnalysisError, match=r"step_10/learning_dynamics/eval.safetensors: no per-token 'losses'"
    ):
        r.tensor("losses", step=10, split="eval")
    with pytest.raises(AnalysisError, match=r"losses need split= one of \['train', 'eval'\], got None"):
        r.tensor("losses", step=10)
    with pytest.raises(AnalysisError, match=r"tensor\('gradients'\): needs a module, e\.g\. \['layers\.0"):
        r.tensor("gradients", step=10, split="eval")
    with pytest.raises(AnalysisError, match=r"tensor\('losses'\): needs step= \(one of \[0, 10, 20\]\)"):
        r.tensor("losses", split="eval")
