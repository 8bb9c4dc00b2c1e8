"""TokenStream: world-size-free order, the rank/micro-batch split, resume, I/O locality, wrap,
fsspec paths."""

import gc
import subprocess
import sys
import threading

import fsspec
import pytest
import torch
import torch.distributed as dist
from tokenizers import Tokenizer, models

from pico.data import (
    DataError,
    TokenStream,
    find_tokenizer,
    iter_eval_batches,
    read_batch,
    resolve_url,
    split_rows,
)
from tests.data.conftest import ROW_LEN, make_shards, row_ids
from tests.distributed import run_distributed_test

SEQ = ROW_LEN - 1


def global_batches(path, batch_size, micro_batch_size, world_size, n_batches, **kw) -> list[list[int]]:
    """Row numbers of the first global batches, reassembled from simulated ranks
    (rank-major, then micro-batch)."""
    streams = [
        TokenStream(path, SEQ, batch_size, micro_batch_size, r, world_size, **kw) for r in range(world_size)
    ]
    out = []
    for _ in range(n_batches):
        batch = []
        for s in streams:
            for _ in range(s.accumulation_steps):
                batch += row_ids(next(s)[:, :-1])
        out.append(batch)
    for s in streams:
        s.close()
    return out


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_global_batches_do_not_depend_on_world_size(shards, shuffle_seed):
    ref = global_batches(shards, 16, 4, 1, 7, shuffle_seed=shuffle_seed)
    for world_size, micro in ((2, 2), (4, 1), (4, 4)):
        assert global_batches(shards, 16, micro, world_size, 7, shuffle_seed=shuffle_seed) == ref
    flat = sum(ref, [])
    if shuffle_seed is None:
        assert flat == list(range(112))  # file order, row order
    else:
        assert flat != list(range(112)) and len(set(flat)) == 112  # a permutation, no repeats


def test_micro_batch_split_contract(shards):
    B, mb, W = 16, 2, 2
    streams = [TokenStream(shards, SEQ, B, mb, r, W, prefetch=0) for r in range(W)]
    assert streams[0].accumulation_steps == B // (mb * W) == 4 and streams[0].num_samples == 120
    for s in range(3):
        for r, stream in enumerate(streams):
            for k in range(stream.accumulation_steps):
                inputs, labels = split_rows(next(stream))
                first = s * B + r * B // W + k * mb
                assert row_ids(inputs) == list(range(first, first + mb))
                assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (
                    mb,
                    SEQ,
                )
                torch.testing.assert_close(labels[:, :-1], inputs[:, 1:])
                assert (labels[:, -1] == inputs[:, 0] + SEQ).all()


def test_indivisible_batch_is_a_value_error(shards):
    with pytest.raises(ValueError, match=r"data\.batch_size=12 .* data\.micro_batch_size=4 .* world size 2"):
        TokenStream(shards, SEQ, 12, 4, 0, 2)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_mid_epoch_equals_uninterrupted(shards, prefetch):
    ref = TokenStream(shards, SEQ, 16, 2, 1, 2, shuffle_seed=5, wrap=True, prefetch=prefetch)
    expected = [row_ids(next(ref)[:, :-1]) for _ in range(40)]
    first = TokenStream(shards, SEQ, 16, 2, 1, 2, shuffle_seed=5, wrap=True, prefetch=prefetch)
    got = [row_ids(next(first)[:, :-1]) for _ in range(13)]  # mid global batch, with read-ahead in flight
    state = first.state_dict()
    first.close()
    assert state["samples"] == 3 * 16 + 1 * 2 * 2 and state["epoch"] == 0
    second = TokenStream(shards, SEQ, 16, 2, 1, 2, shuffle_seed=5, wrap=True, prefetch=prefetch)
    second.load_state_dict(state)
    got += [row_ids(next(second)[:, :-1]) for _ in range(27)]  # crosses into epoch 1
    assert got == expected
    assert second.state_dict()["epoch"] == 1
    ref.close(), second.close()


def test_resume_onto_another_world_size(shards):
    ref = global_batches(shards, 16, 4, 1, 9, shuffle_seed=1, wrap=True)
    two = [TokenStream(shards, SEQ, 16, 2, r, 2, shuffle_seed=1, wrap=True) for r in range(2)]
    for s in two:
        for _ in range(4 * s.accumulation_steps):  # 4 global batches
            next(s)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["samples"] == 64
    four = [TokenStream(shards, SEQ, 16, 1, r, 4, shuffle_seed=1, wrap=True) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    for b in range(4, 9):
        batch = []
        for s in four:
            for _ in range(s.accumulation_steps):
                batch += row_ids(next(s)[:, :-1])
        assert batch == ref[b]
    for s in two + four:
        s.close()


def test_mid_batch_state_needs_same_split(shards):
    stream = TokenStream(shards, SEQ, 16, 2, 0, 2, prefetch=0)
    next(stream)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="inside a global batch"):
        TokenStream(shards, SEQ, 16, 4, 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match="saved on 120 samples, the data now has 64"):
        TokenStream(make_shards(shards.parent / "small", (64,)), SEQ, 16, 2).load_state_dict(state)


def test_allow_changed_keeps_the_sample_position(shards):
    stream = TokenStream(shards, SEQ, 16, 8, prefetch=0)
    for _ in range(3 * stream.accumulation_steps):
        next(stream)
    state = stream.state_dict()  # 48 samples of 120
    make_shards(shards.parent / "more", (40, 24, 56, 16))  # part-3 added after the others
    with pytest.raises(DataError, match=r"saved on 120 samples, the data now has 136 \(data.allow_changed"):
        TokenStream(shards.parent / "more", SEQ, 16, 8).load_state_dict(state)
    grown = TokenStream(shards.parent / "more", SEQ, 16, 8, prefetch=0, allow_changed=True)
    grown.load_state_dict(state)
    assert row_ids(next(grown)[:, :-1]) == list(range(48, 56))  # batch 3 of the new order: file order goes on
    assert row_ids(grown.global_batch(7)) == list(range(112, 128))  # rows 120.. are part-3's
    stream.close(), grown.close()


def test_batch_rows_name_where_each_sequence_comes_from(shards):
    stream = TokenStream(shards, SEQ, 16, 8, shuffle_seed=4, wrap=True, prefetch=0)
    starts = [0, 40, 64]  # global row of each file's first row (40, 24 and 56 rows)
    for s in (0, 6, 9):  # 9 is in the second epoch
        rows = [starts[file] + row for file, row in stream.batch_rows(s)]
        assert rows == row_ids(stream.global_batch(s))
    stream.close()


def test_load_reads_no_consumed_data(shards):
    stream = TokenStream(shards, SEQ, 16, 8, 0, 1, prefetch=0)
    stream.load_state_dict({**stream.state_dict(), "samples": 96})
    assert row_ids(next(stream)[:, :-1]) == list(range(96, 104))
    assert stream.row_groups_read == 1  # only row group 12, nothing before it


def test_rank_reads_only_its_row_groups(shards):
    # B/W = 8 rows = one row group: rank r's rows are exactly the row groups r, r + 2, r + 4, ...
    streams = [TokenStream(shards, SEQ, 16, 4, r, 2, prefetch=0) for r in range(2)]
    for s in streams:
        for _ in range(7 * s.accumulation_steps):
            next(s)
        assert s.row_groups_read == 7
    assert sum(s.row_groups_read for s in streams) == 14  # disjoint: 14 of 15 row groups read once in all


def test_end_of_data_error_and_wrap(shards):
    stream = TokenStream(shards, SEQ, 32, 8, 0, 1)
    for _ in range(3 * stream.accumulation_steps):
        next(stream)
    with pytest.raises(DataError, match=r"it has 120 samples, global batch 3 asks for samples \[96, 128\)"):
        next(stream)
    stream.close()
    wrapped = TokenStream(shards, SEQ, 40, 40, 0, 1, wrap=True)
    assert [row_ids(next(wrapped)[:, :-1]) for _ in range(4)][3] == list(range(40))  # epoch 1 repeats epoch 0
    shuffled = TokenStream(shards, SEQ, 120, 120, 0, 1, shuffle_seed=0, wrap=True)
    epoch0, epoch1 = row_ids(next(shuffled)[:, :-1]), row_ids(next(shuffled)[:, :-1])
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) == list(
        range(120)
    )  # reshuffled with seed + 1
    wrapped.close(), shuffled.close()


def test_fsspec_url_reads_like_local(shards):
    fs = fsspec.filesystem("memory")
    for f in sorted(shards.glob("*.parquet")):
        fs.pipe(f"/pico-test/data/{f.name}", f.read_bytes())
    try:
        assert global_batches("memory://pico-test", 16, 4, 2, 5) == global_batches(shards, 16, 4, 2, 5)
        assert global_batches("memory://pico-test/data/part-[02].parquet", 8, 8, 1, 2) == [
            list(range(8)),
            list(range(8, 16)),
        ]
    finally:
        fs.rm("/pico-test", recursive=True)
    assert resolve_url("pico-lm/pretokenized-dolma") == "hf://datasets/pico-lm/pretokenized-dolma"
    assert resolve_url(str(shards)) == str(shards)


def test_close_stops_the_prefetch_thread(shards):
    with TokenStream(shards, SEQ, 16, 4, prefetch=2) as stream:
        next(stream)
        thread = stream._thread
        assert thread.daemon and thread.is_alive()
    assert not thread.is_alive()
    dropped = TokenStream(shards, SEQ, 16, 4, prefetch=2)
    next(dropped)
    thread = dropped._thread
    del dropped
    gc.collect()
    thread.join(5)
    assert not thread.is_alive() and not any(t.name == "pico-data-prefetch" for t in threading.enumerate())


def test_interpreter_exits_with_a_running_stream(shards):
    code = (
        f"from pico.data import TokenStream; s = TokenStream({str(shards)!r}, {SEQ}, 16, 4, prefetch=2); "
        "next(s); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_read_batch_and_eval_batches(shards):
    batch = read_batch(shards, 11, SEQ)
    assert batch.shape == (11, ROW_LEN) and batch.dtype == torch.int64 and row_ids(batch) == list(range(11))
    with pytest.raises(DataError, match="asked for 500 rows, the data has 120"):
        read_batch(shards, 500, SEQ)
    per_rank = [[row_ids(x) for x, _ in iter_eval_batches(shards, SEQ, 7, r, 3)] for r in range(3)]
    assert [len(p) for p in per_rank] == [5, 5, 5]  # ⌊120 / 21⌋ global batches
    rows = sum(sum(per_rank, []), [])
    assert sorted(rows) == list(range(105))
    assert per_rank[1][0] == list(range(7, 14))
    assert len(list(iter_eval_batches(shards, SEQ, 7, 0, 3, max_batches=2))) == 2


def test_find_tokenizer(shards):
    assert find_tokenizer(shards) is None
    (shards / "tokenizer.json").write_text("{}")  # JSON, but no tokenizer: found before step 0
    with pytest.raises(DataError, match=rf"^{shards / 'tokenizer.json'}: not a tokenizers file \("):
        find_tokenizer(shards)
    Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(shards / "tokenizer.json")
    )
    assert find_tokenizer(shards) == shards / "tokenizer.json"
    assert find_tokenizer(str(shards / "part-*.parquet")) == shards / "tokenizer.json"


def _two_ranks_match_one(path, expected):
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = TokenStream(path, SEQ, 16, 2, rank, world, shuffle_seed=7)
    for b in range(len(expected)):
        mine = torch.cat([next(stream)[:, :-1] for _ in range(stream.accumulation_steps)])  # (B / W, seq_len)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        assert row_ids(torch.cat(gathered)) == expected[b], f"global batch {b}"
    stream.close()


def test_gloo_ranks_read_the_same_global_batches(shards):
    expected = global_batches(shards, 16, 16, 1, 6, shuffle_seed=7)
    run_distributed_test(_two_ranks_match_one, world_size=2, args=(str(shards), expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_come_from_pinned_memory(shards):
    with TokenStream(shards, SEQ, 16, 4, device="cuda", prefetch=0) as stream:
        staged = stream._read(0)
        assert staged.is_pinned() and staged.shape == (4, SEQ + 1)
        inputs, labels = split_rows(next(stream))
        assert inputs.is_cuda and labels.is_cuda and row_ids(inputs.cpu()) == [0, 1, 2, 3]
    with TokenStream(shards, SEQ, 16, 4, device="cuda", prefetch=2) as stream:
        assert [row_ids(next(stream)[:, :-1].cpu()) for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_has_batch_and_next_batch_hand_over_token_rows(shards):
    with TokenStream(shards, SEQ, 16, 4, prefetch=0) as stream:  # 120 samples: global batches 0..6
        assert stream.has_batch(6) and not stream.has_batch(7)
        batch = stream.next_batch()
        assert len(batch) == stream.accumulation_steps == 4
        assert all(rows.shape == (4, SEQ + 1) for rows in batch)
        inputs, labels = split_rows(batch[0])
        assert torch.equal(inputs[:, 1:], labels[:, :-1]) and row_ids(inputs) == [0, 1, 2, 3]
    with TokenStream(shards, SEQ, 16, 4, wrap=True, prefetch=0) as stream:
        assert stream.has_batch(1000)
