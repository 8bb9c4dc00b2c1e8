"""Analysis of Hub runs (pico's and pico-train's format) and of local pico-train runs, via the stand-in."""

import io
from pathlib import Path

import pytest
import torch

from pico.analysis import read_csv
from pico.analysis.pico_train import load_pt
from pico.run_dir import list_steps, step_dir
from recipes.analyze import main as analyze_main
from tests.analysis.fake_run import make_run
from tests.hub.pico_train_run import make_pico_train_run, pico_train_files

REPO = "pico-lm/pico-decoder-test"
OV = ["components=[ov_circuit]", "metrics=[per]", "data_types=[weights]"]


@pytest.fixture(scope="module")
def pico_run(tmp_path_factory):
    """A small pico run (no training): real shapes for a 2-layer model, 3 steps."""
    return make_run(tmp_path_factory.mktemp("local") / "run-1", steps=(0, 10, 20))


def analyze(*args) -> list:
    """Run recipes/analyze.py; the rows of the metrics.csv it wrote."""
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        analyze_main(list(args))
    csv = next(line.strip() for line in out.getvalue().splitlines() if line.strip().endswith("metrics.csv"))
    return read_csv(csv)


def local_rows(pico_run, *overrides):
    return analyze("--run", str(pico_run), *overrides)


def upload_pico(hub, pico_run, branch="run-1"):
    """Commit each step as pico's uploader lays it out (model files at the root, plus weights and state)."""
    for step in list_steps(pico_run):
        path = step_dir(pico_run, step)
        files = {
            f"learning_dynamics/{p.name}": p.read_bytes() for p in (path / "learning_dynamics").iterdir()
        }
        files["config.json"] = (path / "model" / "config.json").read_bytes()
        files |= {"model.safetensors": b"w", "state/.metadata": b"s", "eval.json": b"{}"}
        hub.create_tag(REPO, f"{branch}/step_{step}", hub.add_commit(REPO, branch, f"step {step}", files))


def upload_pico_train(hub, pico_run, branch="pico-decoder-test-1", tmp=None):
    """Commit each step as pico-train does: a train commit, then a val one, overwriting the same paths."""
    from tests.hub.pico_train_run import model_section, write_local

    for step in list_steps(pico_run):
        folder = tmp / f"step_{step}"
        write_local(pico_train_files(pico_run, step), folder)
        for prefix in ("train", "val"):
            files = {
                f"learning_dynamics/{p.relative_to(folder).as_posix()}": p.read_bytes()
                for p in folder.rglob("*")
                if p.is_file() and p.relative_to(folder).parts[0].startswith(prefix)
            }
            files["model.safetensors"] = b"weights"
            files["config.json"] = repr(model_section(pico_run)).replace("'", '"').encode()
            hub.add_commit(REPO, branch, f"Saving Learning Dynamics Data ({prefix}) -- Step {step}", files)


def same(rows, reference):
    """Equal metrics up to float rounding, whatever the run names."""
    key = lambda r: r[1:-1]  # noqa: E731
    assert sorted(map(key, rows), key=str) == sorted(map(key, reference), key=str)
    ref = {key(r): r.value for r in reference}
    for r in rows:
        assert r.value == pytest.approx(ref[key(r)], rel=1e-5, abs=1e-8, nan_ok=True), key(r)


def test_hub_pico_run_downloads_only_learning_dynamics(pico_run, hub, tmp_path, monkeypatch):
    upload_pico(hub, pico_run)
    monkeypatch.chdir(tmp_path)
    rows = analyze("--hub", REPO, "--revision", "run-1")
    same(rows, local_rows(pico_run))
    downloads = hub.calls("downloaded")
    assert len(downloads) == 3
    for d in downloads:
        assert d["files"] == [f"learning_dynamics/{s}.safetensors" for s in ("eval", "train", "weights")]
    assert (tmp_path / "runs/hub/pico-lm--pico-decoder-test/run-1/analysis/default/metrics.csv").is_file()


def test_hub_compound_component_also_downloads_config(pico_run, hub, tmp_path, monkeypatch):
    upload_pico(hub, pico_run)
    monkeypatch.chdir(tmp_path)
    rows = analyze("--hub", REPO, "--revision", "run-1", *OV, "steps=[10]", "target_step=10")
    same(rows, local_rows(pico_run, *OV, "steps=[10]", "target_step=10"))
    (download,) = hub.calls("downloaded")  # step 10 only
    assert "config.json" in download["files"] and "model.safetensors" not in download["files"]


def test_local_pico_train_run_gives_the_same_metrics(pico_run, tmp_path):
    train_run = make_pico_train_run(pico_run, tmp_path / "run-1")
    same(analyze("--run", str(train_run)), local_rows(pico_run))
    same(analyze("--run", str(train_run), *OV), local_rows(pico_run, *OV))
    assert (train_run / "analysis" / "default" / "metrics.csv").is_file()


def test_hub_pico_train_run_gives_the_same_metrics(pico_run, hub, tmp_path, monkeypatch):
    upload_pico_train(hub, pico_run, tmp=tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    same(analyze("--hub", REPO, "--revision", "pico-decoder-test-1", *OV), local_rows(pico_run, *OV))
    for d in hub.calls("downloaded"):
        assert all(f.startswith("learning_dynamics/") or f == "config.json" for f in d["files"]), d


def error_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        analyze_main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_bad_hub_input_is_one_line(pico_run, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hub.add_commit(REPO, "notes", "Add notes", {"notes.md": b"hello"})
    assert "pico-lm/pico-decoder-test@notes: not a pico run" in error_of(
        capsys, "--hub", REPO, "--revision", "notes"
    )
    hub.add_commit(REPO, "bare", "step 0", {"model.safetensors": b"w"})
    err = error_of(capsys, "--hub", REPO, "--revision", "bare")
    assert "pico-lm/pico-decoder-test@bare: no learning_dynamics/" in err
    hub.set_faults(forbidden=["private/repo"])
    assert "private/repo: not allowed" in error_of(capsys, "--hub", "private/repo")
    assert "pico-lm/pico-decoder-test@nope: no such revision" in error_of(
        capsys, "--hub", REPO, "--revision", "nope"
    )


class Evil:
    """Not a tensor: weights_only loading must refuse to build it."""


def test_pt_with_non_tensors_is_refused(tmp_path, capsys):
    path = tmp_path / "train_weights.pt"
    torch.save({"layers.0.attention.v_proj": Evil()}, path)
    with pytest.raises(
        ValueError, match=r"train_weights.pt: holds objects torch.load\(weights_only=True\) refuses"
    ):
        load_pt(path)
    torch.save({"layers.0.attention.v_proj": [1, 2]}, path)
    with pytest.raises(ValueError, match=r"train_weights.pt: entry 'layers.0.attention.v_proj' is a list"):
        load_pt(path)
    run = tmp_path / "run"
    (run / "checkpoints/step_0/learning_dynamics").mkdir(parents=True)
    torch.save({"x": Evil()}, run / "checkpoints/step_0/learning_dynamics/train_weights.pt")
    assert "train_weights.pt: holds objects" in error_of(capsys, "--run", str(run))


def test_module_prefix_is_stripped(tmp_path):
    path = tmp_path / "val_activations.pt"
    torch.save({"module._forward_module.layers.0.swiglu.w_2": torch.ones(2, 3)}, path)
    assert list(load_pt(path)) == ["layers.0.swiglu.w_2"]
    torch.save({"a.layers.0.swiglu.w_2": torch.ones(2, 3), "b.layers.1.swiglu.w_2": torch.ones(2, 3)}, path)
    with pytest.raises(ValueError, match="without a common prefix"):
        load_pt(path)
    assert Path(path).is_file()
