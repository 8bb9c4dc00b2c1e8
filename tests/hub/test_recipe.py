"""recipes/pretrain.py with checkpointing.hub against the local stand-in (tests/hub/launch.py), tiny runs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pico.hub.api
import pico.hub.cli
from pico.analysis.sources import fetch_run
from pico.data import batch_at
from pico.hub import read_journal
from pico.run_dir import DATA_FINGERPRINT, step_dir
from tests.hub.standin import LocalHub
from tests.recipes.common import ROOT
from tests.tiny import tiny_run, write_shards

REPO = "me/pico-runs"
LAUNCH = ROOT / "tests" / "hub" / "launch.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("data") / "train", 96, seed=1)


@pytest.fixture
def standin(tmp_path):
    hub = LocalHub(tmp_path / "standin")
    hub.set_faults()
    return hub


def train(standin, data, run_dir, steps, *extra, check=True):
    """The recipe in a subprocess, its Hub calls going to `standin`."""
    args = tiny_run(data, run_dir, "training.warmup_steps=1", *extra, steps=steps, batch_size=4, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(LAUNCH), str(standin.root), "recipes/pretrain.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def step_titles(hub, branch):
    return [c.title for c in hub.list_commits(REPO, branch) if c.title.startswith("step ")][::-1]


def test_upload_then_resume_from_the_hub_equals_local_resume(standin, data, tmp_path, monkeypatch):
    a = tmp_path / "run-a"
    out = train(standin, data, a, 4, f"checkpointing.hub.repo_id={REPO}").stdout  # a nested override
    assert "hub: every step is on me/pico-runs@run-a" in out
    assert step_titles(standin, "run-a") == ["step 0", "step 2", "step 4"]
    tags = standin.repo(REPO)["tags"]
    assert set(tags) == {"run-a/step_0", "run-a/step_2", "run-a/step_4"}
    files = standin.list_files(REPO, "run-a/step_2")
    assert {"config.json", "model.safetensors", "config.yaml", DATA_FINGERPRINT, "state/.metadata"} <= set(
        files
    )
    assert "learning_dynamics/weights.safetensors" in files
    assert read_journal(a, f"{REPO}@run-a").keys() == {0, 2, 4}

    # `resume: hub` on a fresh disk (same branch), and a local resume from the same step: bitwise equal.
    hub_cfg = f"checkpointing.hub={{repo_id: {REPO}, branch: run-a}}"
    b = tmp_path / "fresh" / "run-b"
    out = train(standin, data, b, 6, hub_cfg, "checkpointing.resume=hub").stdout
    assert "at step 4" in out
    c = tmp_path / "run-c"
    train(standin, data, c, 6, f"checkpointing.resume={step_dir(a, 4)}")
    weights_b = load_file(step_dir(b, 6) / "model" / "model.safetensors")
    weights_c = load_file(step_dir(c, 6) / "model" / "model.safetensors")
    assert weights_b.keys() == weights_c.keys()
    assert all(weights_b[k].equal(weights_c[k]) for k in weights_b)
    assert step_titles(standin, "run-a") == ["step 0", "step 2", "step 4", "step 6"]
    # the state, config.yaml, run.json and the data's fingerprint to check against, manifest.json to verify
    (download,) = standin.calls("downloaded")
    assert {f for f in download["files"] if not f.startswith("state/")} == {
        "config.yaml",
        "manifest.json",
        "run.json",
        DATA_FINGERPRINT,
    }
    starts = json.loads((b / "run.json").read_text())["starts"]  # run-a's start, then run-b's from the Hub
    assert [(s["step"], s["from"] is None) for s in starts] == [(0, True), (4, False)]
    assert starts[1]["changes"] == {"training.max_steps": [4, 6], "checkpointing.hub.branch": [None, "run-a"]}
    assert (b / DATA_FINGERPRINT).read_text() == (a / DATA_FINGERPRINT).read_text()  # b's record is a's

    # The run fetched for analysis replays its batches: config.yaml and the fingerprint at its root.
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    fetched = fetch_run(REPO, "run-a", needs_config=False, root=tmp_path / "hub")
    assert {DATA_FINGERPRINT, "config.yaml"} <= {p.name for p in fetched.iterdir()}
    for step in (0, 2, 4, 6):
        stored = load_file(step_dir(fetched, step) / "learning_dynamics" / "train.safetensors")["input_ids"]
        assert torch.equal(batch_at(fetched, step), stored), step


def test_network_down_for_the_whole_run(standin, data, tmp_path, monkeypatch):
    standin.set_faults(offline=True)
    run = tmp_path / "offline"
    proc = train(standin, data, run, 4, f"checkpointing.hub={{repo_id: {REPO}}}")
    assert "hub: warning:" in proc.stdout and "unreachable" in proc.stdout
    assert f"hub: steps [0, 2, 4] are not on {REPO}@offline yet" in proc.stdout
    assert f"python -m pico.hub upload {run} --repo-id {REPO} --branch offline" in proc.stdout
    assert read_journal(run, f"{REPO}@offline") == {}
    standin.set_faults()  # the network is back: the retry command uploads everything
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    with pytest.raises(SystemExit) as e:
        pico.hub.cli.main(["upload", str(run)])  # repo id from the run's config.yaml
    assert e.value.code == 0
    assert step_titles(standin, "offline") == ["step 0", "step 2", "step 4"]


def test_kill_during_an_upload_then_resume(standin, data, tmp_path):
    standin.set_faults(kill_after_commit=2)  # SIGKILL once step 2's commit landed, before tag and journal
    run, hub_cfg = tmp_path / "killed", f"checkpointing.hub={{repo_id: {REPO}}}"
    proc = train(standin, data, run, 6, hub_cfg, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert 2 not in read_journal(run, f"{REPO}@killed")
    standin.set_faults()
    train(standin, data, run, 6, hub_cfg)
    assert step_titles(standin, "killed") == ["step 0", "step 2", "step 4", "step 6"]
    assert set(standin.repo(REPO)["tags"]) == {f"killed/step_{s}" for s in (0, 2, 4, 6)}
    assert read_journal(run, f"{REPO}@killed").keys() == {0, 2, 4, 6}


def test_no_permission_fails_before_step_0(standin, data, tmp_path):
    standin.set_faults(forbidden=["someone/else"])
    run = tmp_path / "denied"
    proc = train(standin, data, run, 4, "checkpointing.hub={repo_id: someone/else}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hub error: someone/else: not allowed")
    assert not (run / "checkpoints").exists()


def test_bad_hub_config_is_a_config_error(standin, data, tmp_path):
    proc = train(
        standin, data, tmp_path / "r", 4, "checkpointing.hub={repo_id: me/x, token: abc}", check=False
    )
    assert proc.returncode == 2 and "checkpointing.hub.token: unknown key" in proc.stderr
