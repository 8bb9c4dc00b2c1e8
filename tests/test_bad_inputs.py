"""Every bad input is one line and exit code 2 (docs/configuration.md, "Exit codes"), never a traceback.

A table: input → the line the user sees. The recipes run in-process where the exit path is theirs
(`main` ends in SystemExit(2)); subprocesses only where the exit path itself is under test (a data
error met mid-run, two ranks under ./torchrun.sh, a second process holding the run directory).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pico.model import PicoDecoder
from pico.run_dir import RunDirError, analysis_dir
from tests.recipes.common import ROOT, launch, recipe_module
from tests.tiny import SEQ, VOCAB, shards, tiny_run

STEPS = 3  # checkpoints at 0, 2 and 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards(tmp_path_factory.mktemp("data"), 64, 8)


def args(data, run_dir, *extra):
    train, evals = data
    return tiny_run(train, run_dir, *extra, steps=STEPS, batch_size=4, save_every=2, evals=evals)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished run (steps 0, 2, 3); cases damage copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    launch(args(data, run_dir))
    return run_dir


def pretrain(capsys, argv):
    """Run recipes/pretrain.py's main in-process; (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        recipe_module("pretrain").main(argv)
    return exit_.value.code, capsys.readouterr().err


def one_line(err, prefix):
    """The single line of `err`, checked to start with `prefix`."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


CONFIG_CASES = {  # override → the line after "config error: "
    "NaN lr": (["training.lr=.nan"], "training.lr: expected a finite number, got nan"),
    "NaN lr as text": (["training.lr=nan"], "training.lr: expected a finite number, got nan"),
    "inf eps": (["training.eps=.inf"], "training.eps: expected a finite number, got inf"),
    "-inf norm_eps": (["model.norm_eps=-.inf"], "model.norm_eps: expected a finite number, got -inf"),
    "NaN beta": (["training.betas=[.nan, 0.9]"], "training.betas[0]: expected a finite number, got nan"),
    "inf grad_clip": (["training.grad_clip=.inf"], "training.grad_clip: expected a finite number, got inf"),
    "unknown key": (["training.lrr=1"], "training.lrr: unknown key (known: activation_checkpointing,"),
    "unknown section": (["nonsense.x=1"], "nonsense: unknown key"),
    "wrong type": (["data.seq_len=abc"], "data.seq_len: expected int, got 'abc'"),
    "bad choice": (["training.precision=fp16"], "training.precision: 'fp16' is not one of"),
    "max_batches 0": (["evaluation.max_batches=0"], "evaluation.max_batches: must be positive or null"),
    "unknown metric": (["learning_dynamics.metrics=[nope]"], "learning_dynamics.metrics: unknown metric"),
    "comparative metric": (["learning_dynamics.metrics=[cka]"], "learning_dynamics.metrics: 'cka' compares"),
    "layers match nothing": (
        ["learning_dynamics.layers=[nope]"],
        "learning_dynamics.layers: no module of PicoDecoder ends with 'nope'",
    ),
    "overwrite without never": (
        ["checkpointing.overwrite=true"],
        "checkpointing.overwrite: true needs checkpointing.resume=never, got 'auto'",
    ),
    "not an override": (["training.lr"], "training.lr: overrides look like section.key=value"),
    "negative eps": (["training.eps=-1e-8"], "training.eps: must be >= 0, got -1e-08"),
    "negative shuffle_seed": (["data.shuffle_seed=-3"], "data.shuffle_seed: must be >= 0, got -3"),
    "empty layer name": (
        ['learning_dynamics.layers=[""]'],
        "learning_dynamics.layers[0]: '' names no module",
    ),
    "layer without a weight": (
        ["learning_dynamics.layers=[layers.0]"],
        "learning_dynamics.layers: module layers.0 (Block) has no weight to capture",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_errors(data, tmp_path, capsys, case):
    extra, message = CONFIG_CASES[case]
    code, err = pretrain(capsys, args(data, tmp_path / "run", *extra))
    assert code == 2 and one_line(err, "config error: ").startswith(f"config error: {message}")
    assert not (tmp_path / "run").exists()  # refused before step 0: nothing written


def test_config_file_errors(data, tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- training\n- data\n")
    code, err = pretrain(capsys, ["--config", str(listed), "training.lr=1e-3"])
    assert code == 2
    assert one_line(err, "config error: ") == (
        f"config error: {listed}: expected a mapping of keys at the top level, got list"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    code, err = pretrain(capsys, ["--config", str(broken)])
    assert code == 2 and one_line(err, f"config error: {broken}: cannot read config: ")
    code, err = pretrain(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and one_line(err, f"config error: {tmp_path / 'missing.yaml'}: cannot read config: ")


def test_run_dir_that_is_a_file(data, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a directory")
    for run_dir in (file, file / "run"):
        code, err = pretrain(capsys, args(data, run_dir))
        assert code == 2
        assert one_line(err, "config error: ") == (
            f"config error: checkpointing.run_dir: {file} is a file, not a directory"
        )


def bad_rows(tmp_path):
    """A shard whose row 5 has a token id >= vocab_size."""
    rows = np.ones((16, SEQ + 1), dtype=np.int64)
    rows[5, 3] = VOCAB + 1
    path = tmp_path / "bad" / "part-000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(rows.tolist(), type=pa.list_(pa.int32()))}), path)
    return path


def test_data_errors(data, tmp_path, capsys):
    train, evals = data
    cases = [  # (overrides, the line)
        (
            ["learning_dynamics.eval_batch_size=100"],
            f"data error: {evals}: asked for 100 rows, the data has 8",
        ),
        (
            [f"data.path={tmp_path}/none-*.parquet"],
            f"data error: {tmp_path}/none-*.parquet: no parquet files",
        ),
        ([f"learning_dynamics.eval_data={tmp_path}/gone"], f"data error: {tmp_path}/gone: no parquet files"),
        (
            [f"evaluation.data={tmp_path}/gone"],
            f"evaluation error: paloma: {tmp_path}/gone: no parquet files",
        ),
        (["data.micro_batch_size=3"], "config error: data.batch_size: 4 is not a multiple of data.micro_"),
    ]
    for extra, line in cases:
        code, err = pretrain(capsys, args(data, tmp_path / "run", *extra))
        assert code == 2 and one_line(err, line.split(":")[0]).startswith(line), (extra, err)
    assert not (tmp_path / "run").exists()


def test_demo_config_without_its_corpus_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PICO_CACHE", raising=False)
    demo = [
        "--config",
        str(ROOT / "recipes" / "configs" / "demo.yaml"),
        f"checkpointing.run_dir={tmp_path}/r",
    ]
    code, err = pretrain(capsys, demo)
    assert code == 2 and one_line(err, "data error: ") == (
        "data error: ~/.cache/pico/demo/train: no parquet files match this path; "
        "build the demo corpus there with `python -m pico.data.demo`"
    )


def test_corrupt_tokenizer_next_to_the_data_is_found_before_step_0(data, tmp_path, capsys):
    train = shutil.copytree(data[0], tmp_path / "train")
    (train / "tokenizer.json").write_text('{"not": "a tokenizer')
    code, err = pretrain(capsys, args(data, tmp_path / "run", f"data.path={train}"))
    assert code == 2 and one_line(err, "data error: ").startswith(
        f"data error: {train / 'tokenizer.json'}: not a tokenizers file ("
    )
    assert not (tmp_path / "run").exists()


def test_bad_row_met_mid_run_exits_2(data, tmp_path):
    path = bad_rows(tmp_path)
    proc = launch(args(data, tmp_path / "run", f"data.path={path.parent}"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"data error: {path} row 5: token id {VOCAB + 1} at position 3, expected in [0, vocab_size={VOCAB})"
    ]


def shard(run_dir, step):
    return next((run_dir / "checkpoints" / f"step_{step}" / "state").glob("*.distcp"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def manifest(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step}" / "manifest.json"


# name → (damage the copied run, extra overrides, the line after "run error: " with {run} for the copy)
RUN_DIR_CASES = {
    "latest names a missing step": (
        lambda run: (run / "checkpoints" / "latest").write_text("step_9\n"),
        [],
        "{run}/checkpoints/latest: names step_9, which has no state/ directory; step_3 is complete "
        "(checkpointing.resume={run}/checkpoints/step_3)",
    ),
    "latest is a directory": (
        lambda run: ((run / "checkpoints" / "latest").unlink(), (run / "checkpoints" / "latest").mkdir()),
        [],
        "{run}/checkpoints/latest: not a file (it names the newest complete step_<N>); step_3 is complete "
        "(checkpointing.resume={run}/checkpoints/step_3)",
    ),
    "empty latest": (
        lambda run: (run / "checkpoints" / "latest").write_text(""),
        [],
        "{run}/checkpoints/latest: empty; step_3 is complete (checkpointing.resume={run}/checkpoints/step_3)",
    ),
    "resume names nothing": (
        lambda run: None,
        ["checkpointing.resume={run}/checkpoints/step_7"],
        "checkpointing.resume: {run}/checkpoints/step_7 is not a checkpoint directory (no state/ inside); "
        "step_3 is complete (checkpointing.resume={run}/checkpoints/step_3)",
    ),
    "deleted shard": (
        lambda run: shard(run, 3).unlink(),
        [],
        "{run}/checkpoints/step_3/state/__0_0.distcp: missing; step_2 is complete "
        "(checkpointing.resume={run}/checkpoints/step_2)",
    ),
    "truncated shard": (
        lambda run: truncate(shard(run, 3)),
        [],
        "{run}/checkpoints/step_3/state/__0_0.distcp: truncated (",
    ),
    "deleted .metadata": (
        lambda run: (run / "checkpoints" / "step_3" / "state" / ".metadata").unlink(),
        [],
        "{run}/checkpoints/step_3/state/.metadata: missing; step_2 is complete",
    ),
    "truncated .metadata": (
        lambda run: truncate(run / "checkpoints" / "step_3" / "state" / ".metadata"),
        [],
        "{run}/checkpoints/step_3/state/.metadata: truncated (",  # its size in the manifest
    ),
    "truncated .metadata, no manifest": (
        lambda run: [
            truncate(run / "checkpoints" / "step_3" / "state" / ".metadata"),
            manifest(run, 3).unlink(),
        ],
        [],
        "{run}/checkpoints/step_3/state/.metadata: unreadable (",
    ),
    "every step damaged": (
        lambda run: [shard(run, s).unlink() for s in (0, 2, 3)],
        [],
        "{run}/checkpoints/step_3/state/__0_0.distcp: missing; no earlier complete step in {run}/checkpoints",
    ),
    "changed heads": (
        lambda run: None,
        ["model.attention_n_heads=8", "model.attention_n_kv_heads=4"],
        "{run}/checkpoints/step_3/model/config.json: the checkpoint's model differs from this run's model.*: "
        "attention_n_heads 4 ≠ 8, attention_n_kv_heads 2 ≠ 4 (checkpoint ≠ requested); train a new model "
        "in another checkpointing.run_dir",
    ),
    "changed width, no model/": (
        lambda run: shutil.rmtree(run / "checkpoints" / "step_3" / "model"),
        ["model.activation_hidden_dim=96"],
        "{run}/config.yaml: the checkpoint's model differs from this run's model.*: "
        "activation_hidden_dim 64 ≠ 96",
    ),
    "resume never onto checkpoints": (
        lambda run: None,
        ["checkpointing.resume=never"],
        "{run}/checkpoints: holds checkpoints of an earlier run (latest, step_0, step_2, ...) and "
        "checkpointing.resume=never; resume it with checkpointing.resume=auto, or delete them with "
        "checkpointing.overwrite=true",
    ),
}


@pytest.mark.parametrize("case", RUN_DIR_CASES)
def test_run_dir_and_checkpoint_errors(finished, data, tmp_path, capsys, case):
    damage, extra, message = RUN_DIR_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = pretrain(capsys, args(data, run, *(e.format(run=run) for e in extra)))
    assert code == 2 and one_line(err, "run error: ").startswith(f"run error: {message.format(run=run)}")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == {p: b for p, b in before.items() if p.name != "run.lock"}  # config.yaml too


def maml_run(run):
    """Make the copied run look like one of recipes/maml.py: its run.json and config section."""
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(
        json.dumps({**record, "recipe": "maml.py", "sections": [*record["sections"], "maml"]})
    )
    with open(run / "config.yaml", "a") as f:
        f.write("maml: {hybrid_ratio: 0.5}\n")


# name → (damage the copied run, overrides, the whole line, {run} for the copy): resumes refused before step 0
RESUME_CASES = {
    "max_steps below the resumed step": (
        lambda run: None,
        ["training.max_steps=2"],
        "config error: training.max_steps: 2 is below step 3, which the run resumes from "
        "({run}/checkpoints/step_3); raise it, or resume from an earlier step with checkpointing.resume",
    ),
    "batch_size changed": (
        lambda run: None,
        ["data.batch_size=8"],
        "config error: data.batch_size: 4 in {run}/config.yaml, 8 now; it may not change on resume "
        '(docs/checkpoints.md, "Changing settings on resume"); start a new run in another '
        "checkpointing.run_dir",
    ),
    "seed changed": (
        lambda run: None,
        ["training.seed=7"],
        "config error: training.seed: 42 in {run}/config.yaml, 7 now; it may not change on resume",
    ),
    "another recipe's run": (
        maml_run,
        [],
        "run error: {run}/run.json: a run of maml.py (config sections maml), which pretrain.py cannot "
        "resume; resume it with maml.py, or start a new run in another checkpointing.run_dir",
    ),
    "another recipe's run, no run.json": (
        lambda run: (maml_run(run), (run / "run.json").unlink()),
        [],
        "config error: maml: a config section of {run}/config.yaml only (a run of another recipe?); "
        "resume it with the recipe that trained it",
    ),
    "unreadable run.json": (
        lambda run: (run / "run.json").write_text("{"),
        [],
        "run error: {run}/run.json: not a pico run record (JSONDecodeError: ",
    ),
    "unreadable hub journal": (
        lambda run: (run / "checkpoints" / "hub.json").write_text('{"me/r@run": {"zero": "abc"}}'),
        ["checkpointing.hub.repo_id=me/r"],
        "hub error: {run}/checkpoints/hub.json: not a pico hub journal (ValueError: invalid literal for "
        "int() with base 10: 'zero'); delete it and the uploader finds the steps on the Hub again",
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_refused_resumes(finished, data, tmp_path, capsys, case):
    damage, extra, message = RESUME_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    code, err = pretrain(capsys, args(data, run, *extra))
    assert code == 2 and one_line(err, message.split(":")[0]).startswith(message.format(run=run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_a_refused_resume_in_one_process_is_one_line(finished, data, tmp_path):
    """No torch warning before the cause (DCP warns that it loads in one process)."""
    run = shutil.copytree(finished, tmp_path / "run")
    proc = launch(args(data, run, "training.max_steps=2"), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        RESUME_CASES["max_steps below the resumed step"][2].format(run=run)
    ]


def test_analysis_name_is_one_folder_inside_analysis(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for name, shown in (("..", "'..'"), (".", "'.'"), ("../x", "'../x'")):
        with pytest.raises(SystemExit) as exit_:
            recipe_module("analyze").main(["--run", str(run), f"name={name}"])
        assert exit_.value.code == 2 and one_line(capsys.readouterr().err, "spec error: ") == (
            f"spec error: name: expected a folder name (letters, digits, _ . -), got {shown}"
        )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # tensorboard/ too
    with pytest.raises(RunDirError, match=r"^analysis name '\.\.': expected a folder name"):
        analysis_dir(run, "..")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_learning_dynamics_file_names_it(finished, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = run / "checkpoints" / "step_2" / "learning_dynamics" / "train.safetensors"
    truncate(path) if damage == "truncated" else path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    for verified in (True, False):  # the manifest finds it first; without one, reading it fails
        if not verified:
            manifest(run, 2).unlink()
        with pytest.raises(SystemExit) as exit_:
            recipe_module("analyze").main(["--run", str(run)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err  # after the progress bar, one line:
        why = "truncated (" if verified else "not a readable safetensors file ("
        assert err.strip().splitlines()[-1].startswith(f"run error: {path}: {why}")


def test_analyze_answers_a_run_typed_without_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe_module("analyze").main([str(tmp_path)])
    assert exit_.value.code == 2 and one_line(capsys.readouterr().err, "spec error: ") == (
        f"spec error: {tmp_path}: a directory where overrides (key=value) go; to analyze it: --run {tmp_path}"
    )


def test_truncated_exported_model_names_the_file(finished, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(finished / "checkpoints" / "step_3" / "model", model)
    truncate(model / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^{model}/model.safetensors: not a readable safetensors file \("):
        PicoDecoder.from_pretrained(model)


HOLD = "import sys, time, torch; from pico.run_lock import lock_run_dir; "
HOLD += "lock_run_dir(sys.argv[1], torch.device('cpu')); print('held', flush=True); time.sleep(300)"


def test_second_run_on_a_live_run_dir_refuses_under_torchrun(data, tmp_path):
    """A run directory held by a live process: both ranks refuse, and the cause is stderr's first line."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = launch(args(data, run), nproc=2, check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    first = proc.stderr.strip().splitlines()[0]
    assert proc.returncode != 0 and not (run / "checkpoints").exists()
    assert first == (  # the cause, before torchrun's report of the failed workers
        f"run error: {run}: in use by a live run (pid {holder.pid} on host {socket.gethostname()} holds "
        f"{run}/run.lock); wait for it to end, or set another checkpointing.run_dir"
    ), proc.stderr[-3000:]
