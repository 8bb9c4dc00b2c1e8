"""batch_at and when_seen against real runs of recipes/pretrain.py (2 processes, shuffled, into a second
epoch), read on one process: the stored input_ids of every checkpoint and the two ranks' streams of every
step, also after a resume on 1 process; the data fingerprint a run records, and the resume it refuses or
records (data.allow_changed); the eval split's per-token losses against the HF export's."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pico.analysis import open_run
from pico.config import load_config
from pico.data import DataError, Replay, TokenStream, batch_at, build_index, read_batch, when_seen
from pico.data.fingerprint import eval_fingerprint, record_fingerprint, train_fingerprint
from pico.run_dir import data_fingerprint_file, dynamics_file, list_steps, step_dir
from tests.recipes.common import launch
from tests.tiny import MODEL, SEQ, shards, tiny_run, write_shards

STEPS, B = 10, 8  # 44 rows: batch 5 holds the last 4 of epoch 0 and the first 4 of epoch 1


def replay_run(root, steps=STEPS, nproc=2, eval_rows=4):
    """The shuffled, wrapping 2-process run (or on `nproc` processes, up to `steps`) in `root`/run."""
    train, evals = root / "train", root / "eval"
    if not train.exists():
        write_shards(train, 44, seed=1), write_shards(evals, 8, seed=2, files=1)
    launch(
        [
            *MODEL,
            f"data.path={train}",
            f"data.seq_len={SEQ}",
            f"data.batch_size={B}",
            "data.micro_batch_size=2",
            "data.shuffle_seed=7",
            "data.wrap=true",
            f"training.max_steps={steps}",
            "training.strategy=ddp",
            f"checkpointing.run_dir={root / 'run'}",
            "checkpointing.save_every=5",
            f"learning_dynamics.eval_data={evals}",
            f"learning_dynamics.eval_batch_size={eval_rows}",
        ],
        nproc=nproc,
    )
    return root / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return replay_run(tmp_path_factory.mktemp("replay"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The same run, its first 5 updates on 2 processes and the rest resumed on 1."""
    root = tmp_path_factory.mktemp("resumed")
    replay_run(root, steps=5)
    return replay_run(root, nproc=1)


def stored_ids(run, step):
    """(input_ids, world size) of step_<step>'s train split."""
    with safe_open(dynamics_file(step_dir(run, step), "train"), "pt") as f:
        return f.get_tensor("input_ids"), f.metadata()["world_size"]  # (B, T+1)


def test_batch_at_is_what_every_checkpoint_stored(run):
    assert list_steps(run) == [0, 5, 10]  # epoch 0, the batch across epochs 0 and 1, epoch 1
    for step in list_steps(run):
        stored, world_size = stored_ids(run, step)
        assert world_size == "2"
        assert torch.equal(batch_at(run, step), stored), step


def test_batch_at_after_a_resume_on_another_world_size(run, resumed):
    assert [stored_ids(resumed, step)[1] for step in (0, 5, 10)] == ["2", "2", "1"]
    with Replay(resumed) as replay:
        for step in range(STEPS + 1):
            assert torch.equal(replay.batch(step), batch_at(run, step)), step  # the uninterrupted run's
    for step in (0, 5, 10):
        assert torch.equal(batch_at(resumed, step), stored_ids(resumed, step)[0]), step
    versions = json.loads(data_fingerprint_file(resumed).read_text())["versions"]
    assert [(v["step"], v["changes"]) for v in versions] == [(0, None)]  # the same data: nothing recorded


def test_eval_losses_are_the_hf_exports_cross_entropy(run):
    """Per-token losses of the eval split (gathered from 2 ranks) against transformers' own forward of the
    exported W_N on the stored eval batch: float64 cross-entropy of its logits."""
    recorded = open_run(run, dtype="float64")
    for step in recorded.steps:
        ids = recorded.checkpoint(step).input_ids("eval").long()  # (4, T+1)
        hf = AutoModelForCausalLM.from_pretrained(step_dir(run, step) / "model").double()
        with torch.no_grad():
            logits = hf(ids[:, :-1]).logits  # (4, T, V)
        want = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, SEQ)
        got = recorded.tensor("losses", step=step, split="eval")
        assert got.shape == (4, SEQ)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.equal(recorded.tensor("losses", step=0, split="eval"), got)  # training moved them


def test_a_new_run_records_its_data(run):
    (version,) = json.loads(data_fingerprint_file(run).read_text())["versions"]
    train = train_fingerprint(build_index(str(run.parent / "train")))
    evals = eval_fingerprint(str(run.parent / "eval"), read_batch(run.parent / "eval", 4, SEQ))
    assert version == {"step": 0, **train, "eval": evals, "changes": None}


def test_resume_on_changed_data_is_refused_or_recorded(tmp_path):
    train, _ = shards(tmp_path, 96, 4)
    args = tiny_run(train, tmp_path / "run", steps=3)
    launch(args)
    write_shards(tmp_path / "more", 16, seed=3, files=1).joinpath("part-000.parquet").rename(
        train / "part-002.parquet"
    )  # sorts after the others: file order goes on where it was, then reaches it
    refused = launch(tiny_run(train, tmp_path / "run", steps=6), check=False)
    assert refused.returncode == 2 and list_steps(tmp_path / "run") == [0, 3]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"data error: {data_fingerprint_file(tmp_path / 'run')}: the data differ from what the run trained "
        "on at step 3: shard part-002.parquet added (data.allow_changed=true continues knowingly)"
    )
    out = launch(tiny_run(train, tmp_path / "run", "data.allow_changed=true", steps=6)).stdout
    assert "data.allow_changed: from step 3 on the data differ: shard part-002.parquet added" in out
    versions = json.loads(data_fingerprint_file(tmp_path / "run").read_text())["versions"]
    assert [(v["step"], v["changes"], len(v["shards"])) for v in versions] == [
        (0, None, 2),
        (3, "shard part-002.parquet added", 3),
    ]
    for step in (3, 6):  # the batch of update 4 was read before the change: the same rows
        assert torch.equal(batch_at(tmp_path / "run", step), stored_ids(tmp_path / "run", step)[0])
    with pytest.raises(DataError, match="at step 2: shard part-002.parquet added"):
        batch_at(tmp_path / "run", 2)  # before the change, the run trained on other data
    assert torch.equal(batch_at(tmp_path / "run", 0, allow_changed=True), stored_ids(tmp_path / "run", 0)[0])


def test_batch_at_is_what_the_two_ranks_streams_read(run):
    data = load_config(run / "config.yaml").data
    ranks = [TokenStream.from_config(data, rank, 2, 64, "cpu") for rank in range(2)]
    with Replay(run) as replay:
        for step in range(STEPS):  # the updates' batches: the ranks' micro-batches, rank by rank
            assert torch.equal(replay.batch(step), torch.cat(ranks[0].next_batch() + ranks[1].next_batch()))
    for stream in ranks:
        stream.close()


def test_when_seen_finds_every_row_where_batch_at_has_it(run):
    shards = sorted((run.parent / "train").glob("*.parquet"))
    slots = []
    for shard in shards:
        rows = read_batch(shard, 22, SEQ)  # (22, T+1): the shard in file order
        for row in range(22):
            seen = when_seen(run, shard.name, row)
            assert seen and all(torch.equal(batch_at(run, s)[j], rows[row]) for s, j in seen)
            slots += seen
    assert sorted(slots) == [(s, j) for s in range(STEPS) for j in range(B)]  # 80 samples over 44 rows


def test_a_fingerprinted_run_refuses_changed_data(run, tmp_path):
    train = run.parent / "train"
    record_fingerprint(run, train_fingerprint(build_index(str(train))))
    assert torch.equal(batch_at(run, 5), load_file(dynamics_file(step_dir(run, 5), "train"))["input_ids"])
    changed = write_shards(tmp_path / "train", 44, seed=2)  # same names, sizes and rows; other tokens
    with pytest.raises(DataError, match=r"at step 5: shard part-000.parquet (footer changed|resized)"):
        batch_at(run, 5, data_path=str(changed))
