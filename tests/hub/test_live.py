"""The upload → resume-download → analysis round trip against the real Hub; opt-in: set
PICO_HUB_TEST_REPO=<namespace/repo you can write> and HF_TOKEN (the rest of tests/hub uses the stand-in)."""

import os
import uuid

import pytest
import torch

from pico.analysis.sources import fetch_run
from pico.hub import Hub, Uploader, fetch_model, resume_source
from pico.model import PicoDecoder
from tests.hub.test_upload import make_steps
from tests.pico_train_format import write_pico_train_run

REPO = os.environ.get("PICO_HUB_TEST_REPO")
pytestmark = pytest.mark.skipif(
    not (REPO and os.environ.get("HF_TOKEN")), reason="set PICO_HUB_TEST_REPO and HF_TOKEN to run"
)


def test_round_trip_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it for the other tests
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    run = make_steps(tmp_path / f"live-{uuid.uuid4().hex[:8]}")
    up = Uploader(run, REPO).start()
    assert up.finish(timeout=600) == []
    folder = resume_source(f"hf://{REPO}@{up.branch}/step_2", None, run)
    assert (tmp_path / folder / "state" / ".metadata").read_text() == "meta 2"
    assert Uploader(run, REPO).start().finish(timeout=600) == []  # nothing uploaded twice
    local = fetch_run(REPO, up.branch, needs_config=False, root=tmp_path / "hub")
    assert (
        local / "checkpoints" / "step_2" / "learning_dynamics" / "train.safetensors"
    ).read_text() == "train 2"


def test_pico_train_run_on_the_hub(tmp_path, monkeypatch):
    """pico-train's commits made on the real Hub: each split read from its commit (the real tree listing's
    last commits), and a step's model from its model commit."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    run = write_pico_train_run(
        tmp_path, run_name=f"pico-train-{uuid.uuid4().hex[:8]}", world_size=2, ld_batch_size=4
    )
    hub = Hub()
    hub.create_branch(REPO, run.run_name)
    for i, commit in enumerate(run.commits):  # upload_folder's adds; the Hub drops unchanged files itself
        add = {}
        for path, data in commit.files.items():
            local = tmp_path / "upload" / str(i) / path
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            add[path] = local
        hub.create_commit(REPO, run.run_name, commit.title, add, [])
    local = fetch_run(REPO, run.run_name, needs_config=False, root=tmp_path / "hub")
    assert sorted(p.name for p in (local / "checkpoints" / "step_4" / "learning_dynamics").iterdir()) == [
        "eval.safetensors",
        "weights.safetensors",
    ]
    assert (local / "checkpoints" / "step_2" / "learning_dynamics" / "train.safetensors").is_file()
    model = PicoDecoder.from_pretrained(fetch_model(REPO, run.run_name, step=2))
    weights = run.states[2]["layers.0.attention.v_proj.weight"]
    assert torch.equal(model.layers[0].attention.v_proj.weight, weights)
