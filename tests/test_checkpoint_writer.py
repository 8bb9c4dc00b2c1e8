"""pico.checkpoint.CheckpointWriter on real processes (gloo): its writes, a failure on one rank, kill -9
during a background write, and many writes at 4 ranks under torchrun, also killed (issue 22)."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import FileSystem

import pico.run_dir
from pico.checkpoint import (
    CheckpointError,
    CheckpointStep,
    CheckpointWriter,
    check_train_state,
    load_train_state,
)
from pico.distributed import rank
from pico.model import PicoDecoder
from pico.run_dir import STATE, checkpoints_dir, latest_checkpoint, list_steps, step_dir
from tests.checkpoint_writes import CONFIG, build, save, update, weights
from tests.distributed import run_distributed_test, start_ranks

ROOT = Path(__file__).resolve().parents[1]


def resumed(step_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(extra, weights) that one process loads from the state/ that several ranks wrote."""
    model, optimizer = build()
    update(model, optimizer, -1)  # AdamW has state, as the saved optimizer has
    extra = load_train_state(step_path / STATE, model, optimizer)
    return extra, weights(model)


def assert_resumes(run_dir: Path, step: int) -> None:
    """step_<step>'s state is complete and holds W_step, bitwise, as its model/ does."""
    path = step_dir(run_dir, step)
    check_train_state(path / STATE)  # every file its metadata lists, at full size
    expected = torch.load(run_dir / f"expected_{step}.pt")
    extra, loaded = resumed(path)
    assert extra == {"step": step}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    exported = load_file(path / "model" / "model.safetensors")
    assert torch.equal(
        exported["model.layers.0.mlp.down_proj.weight"], expected["layers.0.swiglu.w_2.weight"]
    )


def test_one_process_hides_dcp_single_process_warning_alone(tmp_path):
    """Without a process group DCP warns on every save and load that it assumes one process; pico means
    that, and ignores that one warning (saved in DCP's thread, loaded in this one), no other."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer = build()
        writer = CheckpointWriter(tmp_path)
        save(writer, model, optimizer, 0)
        writer.complete_write()
        load_train_state(step_dir(tmp_path, 0) / STATE, model, optimizer)
        warnings.warn("torch.distributed is disabled: another warning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert messages[-1] == "torch.distributed is disabled: another warning"
    assert not any("assuming the intent is to" in m for m in messages), messages


def _writes(run_dir: Path) -> None:
    model, optimizer = build(world_size=2)
    writer = CheckpointWriter(run_dir)
    written = {}
    for step in range(3):
        save(writer, model, optimizer, step, evals={"task": {"acc": step / 4}})
        written |= writer.written()
        update(model, optimizer, step)
    with pytest.raises(
        RuntimeError, match=r"^CheckpointWriter.save\(step_3\): the write of step_2 is in fli"
    ):
        writer.save(CheckpointStep(3, {"step": 3}), model, optimizer)
    writer.complete_write()
    written |= writer.written()
    assert sorted(written) == [0, 1, 2] and all(seconds > 0 for seconds in written.values())
    assert latest_checkpoint(run_dir) == step_dir(run_dir, 2)  # on every rank, once complete_write returns


def test_every_rank_writes_its_part_then_rank_0_publishes(tmp_path):
    run_distributed_test(_writes, world_size=2, args=(tmp_path,))
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [
        "latest",
        "step_0",
        "step_1",
        "step_2",
    ]
    for step in range(3):
        assert_resumes(tmp_path, step)
        evals = json.loads((step_dir(tmp_path, step) / "eval.json").read_text())
        assert evals == {"step": step, "task": {"acc": step / 4}}
        assert sorted(p.name for p in (step_dir(tmp_path, step) / "model").iterdir()) == [
            "config.json",
            "model.safetensors",
        ]


@contextmanager
def disk_full():
    """In this process, DCP's shard files fail to open with ENOSPC (a full disk on this rank's node)."""
    create_stream = FileSystem.create_stream

    @contextmanager
    def full(self, path, mode):
        if str(path).endswith(".distcp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with create_stream(self, path, mode) as stream:
            yield stream

    FileSystem.create_stream = full
    try:
        yield
    finally:
        FileSystem.create_stream = create_stream


def _fails_on_one_rank(run_dir: Path) -> None:
    model, optimizer = build(world_size=2)
    writer = CheckpointWriter(run_dir)
    for step in range(4):  # step 1 fails on rank 0 (its eval.json), step 2 on rank 1 (its DCP shard)
        writer.complete_write()
        evals = {"task": object()} if step == 1 and rank() == 0 else None  # not JSON
        with disk_full() if step == 2 and rank() == 1 else nullcontext():
            save(writer, model, optimizer, step, evals)
            start = time.monotonic()
            if step in (1, 2):
                with pytest.raises(CheckpointError) as error:
                    writer.complete_write()
                assert (
                    time.monotonic() - start < 10
                )  # every rank learns it at once; none waits on a dead peer
                (run_dir / f"error{step}_rank{rank()}.txt").write_text(str(error.value))
                assert latest_checkpoint(run_dir) == step_dir(run_dir, 0)
        update(model, optimizer, step)  # the writer goes on after a failed step
    writer.complete_write()
    assert latest_checkpoint(run_dir) == step_dir(run_dir, 3)


def test_a_failure_on_one_rank_is_the_same_checkpoint_error_on_every_rank(tmp_path):
    run_distributed_test(_fails_on_one_rank, world_size=2, args=(tmp_path,))
    for step, message in {
        1: "step_1: background write failed on rank 0: TypeError: Object of type object is not JSON "
        "serializable",
        2: "step_2: background write failed on rank 1: OSError: [Errno 28] No space left on device: "
        f"'{checkpoints_dir(tmp_path)}/.tmp_step_2/state/__1_0.distcp'",
    }.items():
        errors = [(tmp_path / f"error{step}_rank{r}.txt").read_text() for r in range(2)]
        assert errors == [message, message]
    assert list_steps(tmp_path, require=STATE) == [0, 3]
    assert not list(checkpoints_dir(tmp_path).glob(".tmp_*"))  # a failed step leaves nothing behind
    assert_resumes(tmp_path, 3)


def _killed_while_writing(run_dir: Path) -> None:
    publish = pico.run_dir.publish_step

    def killed_at_step_2(root, tmp, step):
        if step == 2:  # every file of step 2 written, before rank 0 renames it: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)
        publish(root, tmp, step)

    if rank() == 0:
        pico.run_dir.publish_step = killed_at_step_2
    model, optimizer = build(world_size=2)
    writer = CheckpointWriter(run_dir)
    for step in range(3):
        save(writer, model, optimizer, step)
        update(model, optimizer, step)
    writer.complete_write()  # rank 0 died in its background write: rank 1's collective fails here


def test_kill_during_a_background_write_leaves_latest_on_the_last_complete_step(tmp_path):
    codes, error = start_ranks(_killed_while_writing, world_size=2, args=(tmp_path,), timeout=120)
    assert codes == [-signal.SIGKILL, 1], (codes, error)  # rank 1 fails at once instead of hanging
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    assert not step_dir(tmp_path, 2).exists() and (checkpoints_dir(tmp_path) / ".tmp_step_2").is_dir()
    assert_resumes(tmp_path, 1)
    # Resume in one process: update 2 again from step_1's state gives the killed run's W_2, bitwise; then
    # step 2 is written over the leftover .tmp_step_2.
    model, optimizer = build()
    update(model, optimizer, -1)
    load_train_state(step_dir(tmp_path, 1) / STATE, model, optimizer)
    update(model, optimizer, 1)
    killed_run = torch.load(tmp_path / "expected_2.pt")
    assert all(torch.equal(weights(model)[k], killed_run[k]) for k in killed_run)
    writer = CheckpointWriter(tmp_path)
    save(writer, model, optimizer, 2)
    writer.complete_write()
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [
        "latest",
        "step_0",
        "step_1",
        "step_2",
    ]
    assert_resumes(tmp_path, 2)


def running(pid: int) -> bool:
    """Whether process `pid` exists (and is not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def torchrun(run_dir: Path, steps: int) -> subprocess.Popen:
    """tests/checkpoint_writes.py on 4 ranks (gloo) under ./torchrun.sh."""
    env = {**os.environ, "NPROC_PER_NODE": "4", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    script = [str(ROOT / "tests" / "checkpoint_writes.py"), str(run_dir), str(steps)]
    return subprocess.Popen(
        ["./torchrun.sh", *script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_many_writes_at_4_ranks_with_rank_0_slow_to_remake_the_step_dir(tmp_path):
    launcher = torchrun(tmp_path, steps=12)
    output, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, output[-4000:]
    assert list_steps(tmp_path, require=STATE) == list(range(12))
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 11)
    for step in (0, 11):
        assert_resumes(tmp_path, step)


def test_kill_9_of_the_launcher_during_writes_at_4_ranks(tmp_path):
    launcher = torchrun(tmp_path, steps=1000)
    pids = []
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(tmp_path) in (None, *(step_dir(tmp_path, n) for n in range(3))):
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.stdout.read()[-4000:]
            time.sleep(0.05)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(4)]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, pids)), "workers outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    latest = int(latest_checkpoint(tmp_path).name.removeprefix("step_"))
    assert latest >= 3
    assert_resumes(tmp_path, latest)


def test_a_state_that_does_not_fit_is_one_checkpoint_error_naming_it(tmp_path):
    # DCP raises CheckpointException, a BaseException that `except Exception` would miss (a traceback)
    model, optimizer = build()
    update(model, optimizer, 0)
    writer = CheckpointWriter(tmp_path)
    save(writer, model, optimizer, 1)
    writer.complete_write()
    state = step_dir(tmp_path, 1) / STATE
    wider = PicoDecoder(dataclasses.replace(CONFIG, activation_hidden_dim=48))  # a changed model config
    with pytest.raises(CheckpointError) as error:
        load_train_state(state, wider, torch.optim.AdamW(wider.parameters()))
    assert str(error.value) == (
        f"{state}: cannot be loaded: ValueError: Size mismatch between saved torch.Size([32, 16]) and "
        "current: torch.Size([48, 16]) for model.layers.0.swiglu.w_0.weight"
    )
    shard = next(state.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))  # garbage of the right size: check_train_state passes
    check_train_state(state)
    refused = (
        rf"^{state}: refused by torch.load\(weights_only=True\): Unsupported operand 0 \(a damaged, [^\n]*$"
    )
    with pytest.raises(CheckpointError, match=refused):
        resumed(step_dir(tmp_path, 1))
