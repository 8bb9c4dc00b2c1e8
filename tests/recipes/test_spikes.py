"""Loss spikes: the detector against a float64 recomputation, and a 2-process run of recipes/pretrain.py made
to spike (one batch of random tokens after learnable ones) that keeps the spike's evidence and otherwise
trains bitwise as without detection."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pico.analysis import open_run
from pico.data import batch_at
from pico.run_dir import dynamics_file, list_steps, spikes_dir, step_dir
from pico.spikes import SpikeDetector
from tests.recipes.common import launch
from tests.recipes.test_pretrain import losses, weights
from tests.tiny import SEQ, VOCAB, tiny_run

STEPS, B, SPIKE = 20, 8, 15  # update 16 (the batch of step 15) is random tokens


def test_detector_flags_a_loss_far_above_the_window():
    detector = SpikeDetector(window=4, threshold=3.0)
    history = [2.0, 2.1, 1.9, 2.05]
    assert [detector.observe(x) for x in [*history, math.nan]] == [None] * 5  # filling; nan is not counted
    spike = detector.observe(2.6)
    mean, std = np.mean(history, dtype=np.float64), np.std(history, dtype=np.float64)  # over the last 4
    assert spike is not None and spike.loss == 2.6
    assert (spike.mean, spike.std) == pytest.approx((mean, std), rel=1e-12)
    assert spike.z == pytest.approx((2.6 - mean) / std, rel=1e-12) and spike.z > 3
    assert detector.observe(2.6) is None  # the spike joined the window: the same loss again is none
    assert list(detector.losses) == [1.9, 2.05, 2.6, 2.6]


def write_counting(path, rows: int, random_rows: range, seed: int = 0):
    """Rows that count up from a random start (learnable), except `random_rows`: uniform random tokens."""
    g = np.random.default_rng(seed)
    ids = (g.integers(0, VOCAB, (rows, 1)) + np.arange(SEQ + 1)) % VOCAB  # (rows, T+1)
    ids[random_rows.start : random_rows.stop] = g.integers(0, VOCAB, (len(random_rows), SEQ + 1))
    path.mkdir(parents=True)
    table = pa.table({"input_ids": pa.array(ids.tolist(), type=pa.list_(pa.int32()))})
    pq.write_table(table, path / "part-000.parquet", row_group_size=16)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("spikes")
    return write_counting(root / "train", STEPS * B + B, range(SPIKE * B, SPIKE * B + B))


def spiking_runs(data, root, *extra, threshold=4, nproc=1, recipe="recipes/pretrain.py"):
    """{on: (run dir, stdout), off: ...}: the run with detection and without; checkpoints every 5 steps,
    so step_15 holds update 16 as captured on the update itself."""
    out = {}
    detection = f"training.spike_detection={{enabled: true, window: 8, threshold: {threshold}}}"
    for name, detect in (("on", [detection]), ("off", [])):
        args = tiny_run(
            data,
            root / name,
            "training.lr=1e-2",
            "training.warmup_steps=2",
            *extra,
            *detect,
            steps=STEPS,
            batch_size=B,
            save_every=5,
        )
        out[name] = (root / name, launch(args, nproc=nproc, recipe=recipe).stdout)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    return spiking_runs(data, tmp_path_factory.mktemp("ddp"), "training.strategy=ddp", nproc=2)


def assert_spike_equals_its_update(run):
    """The spike's train split and weights equal, bit for bit, those step_15 captured on the update."""
    for name in ("train", "weights"):
        kept = load_file(dynamics_file(step_dir(spikes_dir(run), SPIKE), name))
        trained = load_file(dynamics_file(step_dir(run, SPIKE), name))
        assert kept.keys() == trained.keys()
        for key, tensor in trained.items():  # the same batch, weights and gradients: the same bits on CPU
            assert torch.equal(kept[key], tensor), key


def test_a_spike_leaves_its_batch_and_learning_dynamics(runs):
    (run, stdout), (plain, _) = runs["on"], runs["off"]
    assert stdout.count("loss spike") == 1 and f"step {SPIKE + 1}: loss spike " in stdout
    _, acc = losses(run)
    assert [(e.step, e.value > 4) for e in acc.Scalars("train/spike")] == [(SPIKE + 1, True)]
    assert "train/spike" not in losses(plain)[1].Tags()["scalars"]
    spikes = open_run(spikes_dir(run))  # a run directory of dynamics-only checkpoints
    assert spikes.steps == [SPIKE] and not (step_dir(spikes_dir(run), SPIKE) / "state").exists()
    record = json.loads((step_dir(spikes_dir(run), SPIKE) / "spike.json").read_text())
    assert record["step"] == SPIKE and record["z"] > 4
    assert record["rows"] == [["part-000.parquet", r] for r in range(SPIKE * B, SPIKE * B + B)]
    assert torch.equal(spikes.checkpoint(SPIKE).input_ids("train"), batch_at(run, SPIKE).int())
    assert_spike_equals_its_update(run)


def test_detection_leaves_training_unchanged(runs):
    (run, _), (plain, _) = runs["on"], runs["off"]
    assert list_steps(run) == list_steps(plain) == [0, 5, 10, 15, 20]
    for name, w in weights(plain, STEPS).items():
        assert torch.equal(weights(run, STEPS)[name], w), name


def test_a_relora_spike_repeats_the_updates_dropout(data, tmp_path):
    """ReLoRA's LoRA dropout draws from the RNG: the spike's capture starts from the update's own RNG state
    (its masks), and leaves the RNG as it was."""
    relora = [
        "training.schedule=cosine",
        "relora.r=4",
        "relora.reset_every=4",
        "relora.restart_warmup_steps=1",
    ]
    runs = spiking_runs(data, tmp_path, *relora, threshold=3, recipe="recipes/relora.py")
    (run, stdout), (plain, _) = runs["on"], runs["off"]
    assert stdout.count("loss spike") == 1 and f"step {SPIKE + 1}: loss spike " in stdout
    assert_spike_equals_its_update(run)
    for name, w in weights(plain, STEPS).items():
        assert torch.equal(weights(run, STEPS)[name], w), name
