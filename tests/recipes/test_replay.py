"""batch_at and when_seen against a real 2-process run of recipes/pretrain.py (shuffled, into a second epoch),
read on one process: the stored input_ids of every checkpoint and the two ranks' streams of every step."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pico.config import load_config
from pico.data import DataError, Replay, TokenStream, batch_at, build_index, read_batch, when_seen
from pico.data.fingerprint import record_fingerprint, train_fingerprint
from pico.run_dir import dynamics_file, list_steps, step_dir
from tests.recipes.common import launch
from tests.tiny import MODEL, SEQ, write_shards

STEPS, B = 10, 8  # 44 rows: batch 5 holds the last 4 of epoch 0 and the first 4 of epoch 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    train, run_dir = write_shards(root / "train", 44, seed=1), root / "run"
    launch(
        [
            *MODEL,
            f"data.path={train}",
            f"data.seq_len={SEQ}",
            f"data.batch_size={B}",
            "data.micro_batch_size=2",
            "data.shuffle_seed=7",
            "data.wrap=true",
            f"training.max_steps={STEPS}",
            "training.strategy=ddp",
            f"checkpointing.run_dir={run_dir}",
            "checkpointing.save_every=5",
        ],
        nproc=2,
    )
    return run_dir


def test_batch_at_is_what_every_checkpoint_stored(run):
    assert list_steps(run) == [0, 5, 10]  # epoch 0, the batch across epochs 0 and 1, epoch 1
    for step in list_steps(run):
        path = dynamics_file(step_dir(run, step), "train")
        with safe_open(path, "pt") as f:
            assert f.metadata()["world_size"] == "2"
            stored = f.get_tensor("input_ids")  # (B, T+1)
        assert torch.equal(batch_at(run, step), stored), step


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
