"""Every checkpoint file is verified (issue 21.2; docs/checkpoints.md, "Manifest"): the manifest written while
writing, verified by resume, analysis, the Hub uploader and `python -m pico.checkpoint verify`; symlinks out
of the run, a `latest` naming another run's directory and a weight index naming files outside its model dir
are refused; steps written before manifests get the checks that need none."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import pico.hub.api
import pico.hub.cli
from pico.analysis.checkpoints import Checkpoint
from pico.analysis.evals import eval_rows
from pico.checkpoint import CheckpointError, CheckpointWriter, load_train_state
from pico.hub import Uploader, read_journal
from pico.manifest import HashingWriter, _HashingStream, hash_file, read_manifest
from pico.model.hf import ModelError, load_pretrained
from pico.run_dir import RunDirError, latest_checkpoint, step_dir
from tests.checkpoint_writes import build, save, update, weights
from tests.distributed import run_distributed_test
from tests.finished_run import args, finished_run
from tests.hub.standin import LocalHub
from tests.recipes.common import ROOT, recipe_module

REPO = "me/runs"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(data, a finished run with steps 0 and 3)."""
    return finished_run(tmp_path_factory.mktemp("finished"))


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, to damage."""
    shutil.copytree(finished[1], tmp_path / "run")
    return tmp_path / "run"


def flip(path: Path, at: int = 100) -> None:
    """Flip one bit of byte `at` of `path`."""
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def _two_ranks(run_dir: Path) -> None:
    model, optimizer = build(world_size=2)
    writer = CheckpointWriter(run_dir)
    for step in range(2):
        save(writer, model, optimizer, step, evals={"task": {"acc": 0.5}})
        update(model, optimizer, step)
    writer.complete_write()


def test_the_manifest_lists_every_file_with_the_size_and_hash_written(tmp_path):
    run_distributed_test(_two_ranks, world_size=2, args=(tmp_path,))
    for step in (0, 1):
        path = step_dir(tmp_path, step)
        manifest = read_manifest(path)
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(manifest) == on_disk  # every rank's shards, the JSON train state, model/, eval.json
        assert {
            "state/__0_0.distcp",
            "state/__1_0.distcp",
            "state/.metadata",
            "state/train_state.json",
        } <= on_disk
        for name, digest in manifest.items():  # against the bytes read back, hashed in one go
            data = (path / name).read_bytes()
            assert (digest.size, digest.hash) == (len(data), xxhash.xxh3_128_hexdigest(data)), name


def test_dcp_files_are_hashed_as_written_and_the_stream_cannot_seek(tmp_path):
    writer = HashingWriter(tmp_path / "state")
    dcp.save({"w": torch.arange(1000.0), "n": 3}, storage_writer=writer)
    digests = writer.digests()
    assert {p.name for p in digests} == {".metadata", "__0_0.distcp"}
    assert all(digests[p] == hash_file(p) for p in digests)
    with open(tmp_path / "x", "wb") as raw:
        stream = _HashingStream(raw)
        stream.write(b"abc")
        with pytest.raises(io.UnsupportedOperation):
            stream.seek(0)


def test_a_flipped_byte_is_one_line_naming_the_file_and_the_run_is_left_as_it_was(finished, run, capsys):
    shard = step_dir(run, 3) / "state" / "__0_0.distcp"
    flip(shard)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(SystemExit) as exit_:
        recipe_module("pretrain").main(args(finished[0], run, "training.max_steps=6"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"run error: {shard}: content differs from manifest.json (xxh3_128 ")
    assert line.endswith(f"; step_0 is complete (checkpointing.resume={step_dir(run, 0)})")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def verify(path) -> subprocess.CompletedProcess:
    """`python -m pico.checkpoint verify <path>`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pico.checkpoint", "verify", str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_verify_cli(run, tmp_path):
    ok = verify(run)
    assert ok.returncode == 0 and ok.stderr == ""
    count = len(read_manifest(step_dir(run, 3)))
    assert ok.stdout.splitlines()[-1] == f"{step_dir(run, 3)}: ok, {count} files verified (xxh3_128)"
    shard = step_dir(run, 3) / "state" / "__0_0.distcp"
    flip(shard, at=shard.stat().st_size - 1)
    (step_dir(run, 0) / "model" / "model.safetensors").unlink()
    bad = verify(run)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.splitlines()
    assert lines[0] == f"run error: {step_dir(run, 0) / 'model' / 'model.safetensors'}: missing"
    assert lines[1].startswith(f"run error: {shard}: content differs from manifest.json") and len(lines) == 2
    one = verify(step_dir(run, 3))
    assert one.returncode == 2 and one.stderr.splitlines() == lines[1:]
    neither = verify(tmp_path)
    assert neither.returncode == 2 and neither.stderr.strip().splitlines() == [
        f"run error: {tmp_path}: neither a run directory (no checkpoints/) nor a checkpoint step directory"
    ]


def test_analysis_verifies_what_it_reads(run):
    path = step_dir(run, 3) / "learning_dynamics" / "weights.safetensors"
    flip(path, at=path.stat().st_size - 1)  # a weight, not the header: safetensors alone reads it silently
    checkpoint = Checkpoint(run, 3, torch.device("cpu"), torch.float64)
    with pytest.raises(CheckpointError, match=rf"^{path}: content differs from manifest.json \(xxh3_128 "):
        checkpoint.load("weights", "layers.0.attention.v_proj")
    assert (
        Checkpoint(run, 0, torch.device("cpu"), torch.float64)
        .load("weights", "layers.0.attention.v_proj")
        .numel()
    )
    evals = step_dir(run, 0) / "eval.json"
    evals.write_text(evals.read_text().replace('"step": 0', '"step":  0'))
    with pytest.raises(CheckpointError, match=rf"^{evals}: \d+ bytes, manifest.json says \d+$"):
        eval_rows(run)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "standin")
    hub.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: hub)
    return hub


def test_the_uploader_uploads_only_complete_verified_steps(run, standin):
    missing = step_dir(run, 0) / "model" / "model.safetensors"
    missing.unlink()  # a step missing its weights is not complete
    lines = []
    left = Uploader(run, REPO, echo=lines.append).start().finish(timeout=60)
    assert left == [0] and read_journal(run, f"{REPO}@run").keys() == {3}
    assert f"hub: step_0 is not uploaded: {missing}: missing" in lines
    files = standin.list_files(REPO, "run/step_3")
    assert {"manifest.json", "model.safetensors", "state/train_state.json", "eval.json"} <= set(files)
    with pytest.raises(SystemExit) as exit_:
        pico.hub.cli.main(["upload", str(run), "--repo-id", REPO])
    assert exit_.value.code == 1
    assert [c["message"] for c in standin.calls("create_commit")] == ["step 3"]


def test_symlinks_out_of_the_run_are_never_followed(finished, run, tmp_path, standin, capsys):
    secret = tmp_path / "secret.json"
    evals = step_dir(run, 3) / "eval.json"
    shutil.move(evals, secret)
    evals.symlink_to(secret)  # the same bytes as the manifest says, but from outside the run
    lines = []
    assert Uploader(run, REPO, echo=lines.append).start().finish(timeout=60) == [3]
    assert f"hub: step_3 is not uploaded: {evals}: a symlink to {secret}, outside {run}" in lines
    assert [c["message"] for c in standin.calls("create_commit")] == ["step 0"]
    state = step_dir(run, 3) / "state" / "train_state.json"
    shutil.move(state, tmp_path / "train_state.json")
    state.symlink_to(tmp_path / "train_state.json")
    with pytest.raises(SystemExit) as exit_:
        recipe_module("pretrain").main(args(finished[0], run, "training.max_steps=6"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"run error: {state}: a symlink to {tmp_path / 'train_state.json'}, outside {run}")


def test_latest_may_only_name_a_step_of_its_own_run(finished, run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    latest = run / "checkpoints" / "latest"
    for text, why in (
        (f"{step_dir(other, 3)}\n", f"names '{step_dir(other, 3)}', which is not a step_<N> of this run"),
        (
            "../../other/checkpoints/step_3\n",
            "names '../../other/checkpoints/step_3', which is not a step_<N>",
        ),
    ):
        latest.write_text(text)
        with pytest.raises(RunDirError, match=rf"^{latest}: {why}"):
            latest_checkpoint(run)
    latest.write_text("step_3\n")
    shutil.rmtree(step_dir(run, 3))
    step_dir(run, 3).symlink_to(step_dir(other, 3))
    with pytest.raises(SystemExit) as exit_:
        recipe_module("pretrain").main(args(finished[0], run, "training.max_steps=6"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(
        f"run error: {latest}: names step_3, a symlink to {step_dir(other, 3)}, not a step of this run"
    )
    latest.unlink()
    latest.mkdir()
    with pytest.raises(RunDirError, match=rf"^{latest}: not a file$"):
        latest_checkpoint(run)


def test_a_weight_index_naming_files_outside_its_directory_is_refused(run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(step_dir(run, 3) / "model", model)
    weights = model / "model.safetensors"
    for shard in ("../outside.safetensors", str(tmp_path / "abs.safetensors"), "sub\\..\\..\\x.safetensors"):
        shutil.copy(weights, tmp_path / "outside.safetensors")
        index = {"metadata": {}, "weight_map": {"lm_head.weight": shard}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        weights.rename(model / "kept")
        with pytest.raises(ModelError, match=rf"^{model}/model.safetensors.index.json: names "):
            load_pretrained(model)
        (model / "kept").rename(weights)
    (model / "model.safetensors.index.json").write_text("[1]")
    weights.unlink()
    with pytest.raises(
        ModelError, match=r"model.safetensors.index.json: not a safetensors index \(TypeError"
    ):
        load_pretrained(model)


def test_steps_written_before_manifests_get_the_checks_that_need_none(finished, run, standin):
    for step in (0, 3):
        (step_dir(run, step) / "manifest.json").unlink()
    ok = verify(run)
    assert ok.returncode == 0
    assert ok.stdout.splitlines()[-1] == (
        f"{step_dir(run, 3)}: ok, no manifest.json (written before manifests): metadata and sizes checked, "
        "contents not verified"
    )
    recipe_module("pretrain").main(args(finished[0], run, "training.max_steps=4"))  # resumes
    assert read_manifest(step_dir(run, 4)) is not None
    weights = step_dir(run, 0) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    bad = verify(run)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"run error: {weights}: {weights.stat().st_size} bytes, its header says {weights.stat().st_size + 4}"
    ]
    assert Uploader(run, REPO, echo=print).start().finish(timeout=60) == [0]
    assert read_journal(run, f"{REPO}@run").keys() == {3, 4}


def test_a_state_written_before_train_state_json_resumes_exactly(tmp_path):
    """A state as pico wrote it before train_state.json (the rest of the train state in DCP, read with
    torch.load(weights_only=True)) resumes bitwise: the same next update as without the round trip."""
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for step in range(2):
        update(model, optimizer, step)
        scheduler.step()
    rng = torch.get_rng_state()
    extra = {"step": 2, "scheduler": scheduler.state_dict(), "rng": {"torch": rng}}
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer), "extra": extra}
    dcp.save(state, checkpoint_id=tmp_path / "state")  # the old layout, all of it in DCP
    update(model, optimizer, 2)
    expected = weights(model)

    resumed, resumed_optimizer = build()
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda s: 1.0 / (s + 1))
    train = load_train_state(tmp_path / "state", resumed, resumed_optimizer)
    resumed_scheduler.load_state_dict(train["scheduler"])
    assert train["step"] == 2 and train["rng"] == {"torch": rng.numpy().tobytes().hex()}
    update(resumed, resumed_optimizer, 2)
    assert all(torch.equal(weights(resumed)[k], expected[k]) for k in expected)
