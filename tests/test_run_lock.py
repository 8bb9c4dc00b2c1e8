"""One run directory, one run: the lock dies with its holder; a new run starts over only when told to."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pico.config import load_config
from pico.run_dir import RunDirError
from pico.run_lock import lock_run_dir, open_run_dir, resume_point, start_run

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time, torch; from pico.run_lock import lock_run_dir; "
    "lock_run_dir(sys.argv[1], torch.device('cpu')); print('held', flush=True); time.sleep(300)"
)
CPU = torch.device("cpu")


def test_kill_9_of_the_holder_leaves_no_stale_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by a live run \(pid {holder.pid} on host "):
            lock_run_dir(tmp_path, CPU)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run_dir(tmp_path, CPU)  # the kernel dropped the dead holder's lock
    assert (tmp_path / "run.lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    lock_run_dir(tmp_path, CPU)  # held by this process already: a no-op


def fake_run(run_dir):
    """A run directory with an earlier run's step, logs, analysis and config."""
    for sub in ("checkpoints/step_0/state", "tensorboard", "analysis/default"):
        (run_dir / sub).mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_0\n")
    (run_dir / "config.yaml").write_text("old: run\n")


def test_overwrite_clears_the_earlier_run_after_every_check(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    keys = [f"checkpointing.run_dir={run_dir}", "checkpointing.resume=never"]
    with pytest.raises(RunDirError, match="holds checkpoints of an earlier run"):
        open_run_dir(run_dir, load_config(None, keys), CPU, recipe="pretrain.py")
    assert (run_dir / "config.yaml").read_text() == "old: run\n"  # a refused run changes nothing
    cfg = load_config(None, [*keys, "checkpointing.overwrite=true"])
    assert open_run_dir(run_dir, cfg, CPU, recipe="pretrain.py") is None
    assert (run_dir / "config.yaml").read_text() == "old: run\n"  # checked only: start_run writes
    start_run(run_dir, cfg, step=0, resumed_from=None, recipe="pretrain.py")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "run.json", "run.lock"]
    assert load_config(run_dir / "config.yaml") == cfg
    record = json.loads((run_dir / "run.json").read_text())
    assert record == {
        "recipe": "pretrain.py",
        "sections": ["model", "data", "training", "checkpointing", "learning_dynamics", "evaluation"]
        + ["logging"],
        "starts": [{"step": 0, "from": None, "changes": {}}],
    }


def test_resume_point(tmp_path):
    assert resume_point(tmp_path / "new", "auto") is None and resume_point(tmp_path / "new", "never") is None
    fake_run(tmp_path / "run")
    assert resume_point(tmp_path / "run", "auto") == tmp_path / "run" / "checkpoints" / "step_0"
    assert resume_point(tmp_path / "run", str(tmp_path / "run" / "checkpoints" / "step_0")).name == "step_0"
