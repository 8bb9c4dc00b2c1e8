"""Analysis of pico runs on the Hub, via the stand-in (pico-train runs: tests/analysis/test_pico_train.py)."""

import io

import pytest
import xxhash

from pico.analysis import read_csv
from pico.manifest import FileDigest, write_manifest
from pico.run_dir import list_steps, step_dir
from recipes.analyze import main as analyze_main
from tests.analysis.fake_run import make_run

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
        assert not any(f.startswith(("state/", "model")) for f in d["files"])
    assert (tmp_path / "runs/hub/pico-lm--pico-decoder-test/run-1/analysis/default/metrics.csv").is_file()


def test_hub_compound_component_also_downloads_config(pico_run, hub, tmp_path, monkeypatch):
    upload_pico(hub, pico_run)
    monkeypatch.chdir(tmp_path)
    rows = analyze("--hub", REPO, "--revision", "run-1", *OV, "steps=[10]", "target_step=10")
    same(rows, local_rows(pico_run, *OV, "steps=[10]", "target_step=10"))
    (download,) = hub.calls("downloaded")  # step 10 only
    assert "config.json" in download["files"] and "model.safetensors" not in download["files"]


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


def test_hub_files_are_verified_against_the_step_manifest(pico_run, hub, tmp_path, monkeypatch, capsys):
    """The uploader commits each step's manifest.json; a file on the Hub whose bytes differ from it is refused
    by name (here one flipped byte in step 10's train split), and the run reads when the bytes are right."""
    monkeypatch.chdir(tmp_path)
    for branch, flip in (("sound", None), ("flipped", 10)):
        for step in list_steps(pico_run):
            path = step_dir(pico_run, step) / "learning_dynamics"
            files = {f"learning_dynamics/{p.name}": p.read_bytes() for p in path.iterdir()}
            digests = {
                name: FileDigest(len(data), xxhash.xxh3_128(data).hexdigest()) for name, data in files.items()
            }
            write_manifest(tmp_path / branch / str(step), digests)
            files["manifest.json"] = (tmp_path / branch / str(step) / "manifest.json").read_bytes()
            if step == flip:
                data = bytearray(files["learning_dynamics/train.safetensors"])
                data[-1] ^= 1
                files["learning_dynamics/train.safetensors"] = bytes(data)
            hub.add_commit(REPO, branch, f"step {step}", files)
    same(analyze("--hub", REPO, "--revision", "sound"), local_rows(pico_run))
    assert all("manifest.json" in d["files"] for d in hub.calls("downloaded"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        analyze_main(["--hub", REPO, "--revision", "flipped"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, one line
    assert e.value.code == 2
    assert (
        err.startswith("run error: ")
        and "step_10/learning_dynamics/train.safetensors: content differs" in err
    )
