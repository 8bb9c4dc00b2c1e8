"""A step's model from a run on the Hub (pico.hub.fetch_model), on pico-train's commits replayed onto the
stand-in exactly as its trainer makes them (tests/pico_train_format.py): the model commit of that step, no
remote code, the reference forward's logits; then save_pretrained and recipes/evaluate.py --model hf://."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pico.hub import HubError, fetch_model
from pico.model import PicoDecoder, PicoDecoderConfig
from tests.hub.standin import LocalHub
from tests.pico_train_format import REMOTE_CODE_MARKER, reference_model, replay_on_hub, write_pico_train_run
from tests.recipes.common import ROOT

REPO = "pico-lm/pico-decoder-test"
MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two devices, max_steps 5, save_every 2: models at steps 0, 2, 4, 5; step 5's val commit comes before
    its model commit."""
    return write_pico_train_run(tmp_path_factory.mktemp("run"), world_size=2, ld_batch_size=4, max_steps=5)


def logits_gap(model, run, step) -> float:
    """Largest |logit difference| between `model` and the reference forward with W_step."""
    reference = reference_model(run.config["model"], run.states[step])
    ids = torch.randint(
        0, run.config["model"]["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return (model(ids) - reference(ids)).abs().max().item()


def test_a_steps_model_comes_from_its_model_commit_without_remote_code(run, hub, tmp_path):
    replay_on_hub(hub, run, REPO)
    titles = {c.id: c.title for c in hub.list_commits(REPO, run.run_name)}
    for step, expected in ((2, 2), (5, 5), (None, 5)):  # None: the newest step
        folder = fetch_model(REPO, run.run_name, step=step)
        download = hub.calls("downloaded")[-1]
        assert titles[download["revision"]] == f"Saving HF Model -- Step {expected}"
        assert download["files"] == MODEL_FILES  # never pico_decoder.py
        model = PicoDecoder.from_pretrained(folder)
        assert logits_gap(model, run, expected) <= 1e-5
        assert logits_gap(model, run, expected - 1 if expected == 5 else 0) > 1e-3
    assert not list(hub.root.rglob(REMOTE_CODE_MARKER)) and "pico_decoder" not in sys.modules
    from transformers import LlamaForCausalLM

    model.save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert logits_gap(lambda ids: llama(ids).logits, run, 5) <= 1e-4
    with pytest.raises(HubError) as e:
        fetch_model(REPO, run.run_name, step=3)
    assert str(e.value) == f"{REPO}@{run.run_name}: no model commit of step 3 (steps: 0, 2, 4, 5)"


def test_a_pico_runs_step_is_fetched_the_same_way(hub, tmp_path):
    model = PicoDecoder(PicoDecoderConfig.preset("tiny", n_layers=1, vocab_size=64, max_seq_len=16))
    model.save_pretrained(tmp_path / "model")
    files = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    for step in (10, 20):
        hub.add_commit(REPO, "run-1", f"step {step}", files | {"learning_dynamics/weights.safetensors": b"w"})
    folder = fetch_model(REPO, "run-1", step=10)
    assert hub.calls("downloaded")[-1]["files"] == sorted(files)
    loaded = PicoDecoder.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_evaluate_recipe_scores_a_step_on_the_hub(run, tmp_path):
    hub = LocalHub(tmp_path / "standin")
    hub.set_faults()
    replay_on_hub(hub, run, REPO)
    rows = torch.randint(
        1, run.config["model"]["vocab_size"], (6, 17), generator=torch.Generator().manual_seed(1)
    )
    pq.write_table(
        pa.Table.from_pylist([{"input_ids": r.tolist()} for r in rows]), tmp_path / "paloma.parquet"
    )
    output = tmp_path / "results.json"
    args = [
        "--model",
        f"hf://{REPO}@{run.run_name}",
        "--step",
        "2",
        "--task",
        f"paloma={tmp_path / 'paloma.parquet'}",
    ]
    launch = [sys.executable, str(ROOT / "tests" / "hub" / "launch.py"), str(hub.root), "recipes/evaluate.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*launch, *args, "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_model(run.config["model"], {k: v.double() for k, v in run.states[2].items()})
    with torch.no_grad():  # every row scored as row[1:] given its prefix, float64
        logp = reference(rows[:, :-1]).log_softmax(-1).gather(-1, rows[:, 1:, None])
    assert json.loads(output.read_text())["paloma"]["loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert not list(hub.root.rglob(REMOTE_CODE_MARKER))
