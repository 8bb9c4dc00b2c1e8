"""The upload → resume-download → analysis round trip against the real Hub; opt-in: set
PICO_HUB_TEST_REPO=<namespace/repo you can write> and HF_TOKEN (the rest of tests/hub uses the stand-in)."""

import os
import uuid

import pytest

from pico.analysis.sources import fetch_run
from pico.hub import Uploader, resume_source
from tests.hub.test_upload import make_steps

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
