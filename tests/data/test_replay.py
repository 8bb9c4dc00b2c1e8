"""Replaying a run's data: batch_at equals the stream's batches and reads only their row groups, when_seen
inverts it, the data fingerprint refuses changed data in one line, and the batches CLI."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pico.config import load_config, save_config
from pico.data import DataError, Replay, TokenStream, batch_at, build_index, read_batch, when_seen
from pico.data import batches as cli
from pico.data.fingerprint import (
    check_data,
    data_changes,
    eval_fingerprint,
    record_fingerprint,
    train_fingerprint,
)
from pico.run_dir import data_fingerprint_file
from tests.data.conftest import ROW_LEN, row_ids, write_rows

SEQ, B = ROW_LEN - 1, 16  # the shards hold 120 rows: batch 7 straddles epochs 0 and 1


def make_run(run_dir, path, steps=25, **data) -> str:
    """A run directory holding only the config.yaml a run of `steps` updates on `path` writes."""
    extra = [f"data.{k}={'null' if v is None else v}" for k, v in data.items()]
    cfg = load_config(
        None,
        [f"data.path={path}", f"data.seq_len={SEQ}", f"data.batch_size={B}", "data.micro_batch_size=2",
         f"training.max_steps={steps}", "model.vocab_size=4096", "model.max_seq_len=16", *extra],
    )  # fmt: skip
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def fingerprinted(run_dir, path):
    """Record the data of `path` as the run's (what the recipe does when a run starts)."""
    record_fingerprint(run_dir, train_fingerprint(build_index(str(path))))


@pytest.mark.parametrize(("shuffle_seed", "wrap"), [(None, False), (None, True), (5, True)])
def test_batch_at_equals_the_streams_batches(shards, tmp_path, shuffle_seed, wrap):
    steps = 25 if wrap else 120 // B  # 400 samples: 3.3 epochs
    run = make_run(tmp_path / "run", shards, steps, shuffle_seed=shuffle_seed, wrap=wrap)
    stream = TokenStream(shards, SEQ, B, 2, 1, 2, shuffle_seed=shuffle_seed, wrap=wrap, prefetch=0)
    other = TokenStream(shards, SEQ, B, 2, 0, 2, shuffle_seed=shuffle_seed, wrap=wrap, prefetch=0)
    with Replay(run) as replay:
        for step in reversed(range(steps)):  # any order: nothing depends on what was read before
            assert torch.equal(replay.batch(step), batch_at(run, step))
        for step in range(steps):  # the two ranks' micro-batches of each step, rank by rank
            ref = torch.cat(other.next_batch() + stream.next_batch())
            assert torch.equal(replay.batch(step), ref), step
    if wrap:  # batch 7 ends epoch 0 with 8 rows and starts epoch 1 with 8
        rows = [row_ids(batch_at(run, s)) for s in range(8)]
        assert sorted(sum(rows[:7], []) + rows[7][:8]) == list(range(120))
        assert shuffle_seed is not None or rows[7] == [*range(112, 120), *range(8)]
    stream.close(), other.close()


def test_batch_at_reads_only_the_batchs_row_groups(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 25, shuffle_seed=5, wrap=True)
    for step in (0, 9, 24):
        with Replay(run) as replay:
            rows = row_ids(replay.batch(step))
            assert replay.stream.row_groups_read == len({r // 8 for r in rows}) <= 3  # row groups of 8 rows


def test_when_seen_inverts_batch_at(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 25, shuffle_seed=5, wrap=True)
    batches = [row_ids(batch_at(run, s)) for s in range(25)]
    slots = []
    with Replay(run) as replay:
        for shard, rows, first in (("part-0.parquet", 40, 0), (1, 24, 40), ("part-2.parquet", 56, 64)):
            for row in range(rows):
                seen = replay.when_seen(shard, row)
                assert all(batches[s][j] == first + row for s, j in seen)
                assert len(seen) in (3, 4)  # 400 samples of 120 rows: 3.3 epochs
                slots += seen
    assert sorted(slots) == [(s, j) for s in range(25) for j in range(B)]  # every trained slot, once
    assert when_seen(run, str(shards / "part-1.parquet"), 5) == when_seen(run, 1, 5)


def test_when_seen_without_wrap_is_the_first_epoch_only(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 7)  # 112 of the 120 rows are trained on
    assert when_seen(run, 0, 3) == [(0, 3)]
    assert when_seen(run, 2, 47) == [(6, 15)]  # global row 111
    assert when_seen(run, 2, 48) == []  # global row 112: not reached


def test_bad_replays_are_one_line_data_errors(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 10)
    cases = [
        (lambda: batch_at(run, 7), r"end of data: it has 120 samples, global batch 7 asks for samples"),
        (lambda: batch_at(run, -1), r"step -1: steps count updates from 0"),
        (lambda: when_seen(run, "part-9.parquet", 0), r"no shard 'part-9.parquet' \(shards 0..2: part-0"),
        (lambda: when_seen(run, 1, 24), r"part-1.parquet: no row 24 \(the shard has 24\)"),
        (lambda: batch_at(tmp_path, 0), r"not a run directory \(no config.yaml\)"),
        (lambda: batch_at(run, 0, data_path=str(tmp_path / "none")), r"no parquet files match this path"),
    ]
    for call, message in cases:
        with pytest.raises(DataError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_moved_data_with_the_same_content_replays(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 10, shuffle_seed=1)
    fingerprinted(run, shards)
    moved = shutil.copytree(shards, tmp_path / "elsewhere" / "copy")
    assert torch.equal(batch_at(run, 4, data_path=str(moved)), batch_at(run, 4))


def change(shards, how):
    """Change the shards in one way the fingerprint must notice."""
    if how == "added":
        write_rows(shards / "part-3.parquet", [[1] * ROW_LEN] * 8)
    elif how == "removed":
        (shards / "part-1.parquet").unlink()
    elif how == "resized":
        write_rows(shards / "part-1.parquet", [[2] * ROW_LEN] * 32)
    else:  # the same rows written with other row groups: same row count, another footer
        ids = pq.read_table(shards / "part-2.parquet").column(0).to_pylist()
        write_rows(shards / "part-2.parquet", ids, row_group_size=7)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("added", r"shard part-3.parquet added"),
        ("removed", r"shard part-1.parquet removed"),
        ("resized", r"shard part-1.parquet resized \(24 -> 32 rows, \d+ -> \d+ bytes\)"),
        ("rewritten", r"shard part-2.parquet (footer changed|resized \(56 -> 56 rows)"),
    ],
)
def test_changed_data_is_refused(shards, tmp_path, how, message):
    run = make_run(tmp_path / "run", shards, 10)
    fingerprinted(run, shards)
    before = batch_at(run, 2)
    change(shards, how)
    with pytest.raises(DataError, match=rf"differ from what .*run trained on at step 2: {message}") as e:
        batch_at(run, 2)
    assert "\n" not in str(e.value) and "allow_changed=True" in str(e.value)
    got = batch_at(run, 2, allow_changed=True)  # reads anyway, records nothing
    assert (
        got.shape == before.shape and len(json.loads(data_fingerprint_file(run).read_text())["versions"]) == 1
    )


def test_a_changed_footer_of_the_same_size_is_named(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 10)
    fingerprinted(run, shards)
    recorded = json.loads(data_fingerprint_file(run).read_text())
    recorded["versions"][0]["shards"][0]["footer_sha256"] = "0" * 64
    data_fingerprint_file(run).write_text(json.dumps(recorded))
    with pytest.raises(DataError, match="shard part-0.parquet footer changed"):
        batch_at(run, 0)


def test_allow_changed_records_the_new_data_from_its_step(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 10)
    evals = eval_fingerprint(str(shards), read_batch(shards, 4, SEQ))
    record_fingerprint(run, train_fingerprint(build_index(str(shards))), evals=evals)
    change(shards, "added")
    new = train_fingerprint(build_index(str(shards)))
    with pytest.raises(DataError, match="at step 6: shard part-3.parquet added"):
        check_data(run, new, evals=evals, step=6)
    assert check_data(run, new, evals=evals, step=6, allow_changed=True) == "shard part-3.parquet added"
    versions = json.loads(data_fingerprint_file(run).read_text())["versions"]
    assert [(v["step"], v["changes"]) for v in versions] == [(0, None), (6, "shard part-3.parquet added")]
    assert data_changes(run, new, evals=evals, step=6) is None  # the new data from step 6 on
    assert data_changes(run, new, step=5) == "shard part-3.parquet added"  # not what steps before 6 saw
    other = eval_fingerprint("elsewhere", read_batch(shards, 4, SEQ) + 1)
    assert data_changes(run, new, evals=other, step=7) == f"eval batch changed ({shards} -> elsewhere)"


def test_cli_writes_pt_npy_and_parquet(shards, tmp_path, capsys):
    run = make_run(tmp_path / "run", shards, 25, shuffle_seed=5, wrap=True)
    ref = torch.stack([batch_at(run, 3), batch_at(run, 11)])  # (2, B, T+1)
    for ext in ("pt", "npy", "parquet"):
        out = tmp_path / f"batches.{ext}"
        cli.main(["--run", str(run), "--step", "3", "--step", "11", "--output", str(out)])
        assert capsys.readouterr().out == (
            f"step 3: input_ids ({B}, {ROW_LEN}) torch.int64\n"
            f"step 11: input_ids ({B}, {ROW_LEN}) torch.int64\nwrote {out}\n"
        )
        if ext == "pt":
            saved = torch.load(out)
            assert saved["steps"].tolist() == [3, 11] and torch.equal(saved["input_ids"], ref)
        elif ext == "npy":
            assert np.array_equal(np.load(out), ref.numpy())
        else:
            table = pq.read_table(out).to_pydict()
            assert table["step"] == [3] * B + [11] * B and table["row"] == list(range(B)) * 2
            assert torch.equal(torch.tensor(table["input_ids"]), ref.reshape(2 * B, ROW_LEN))
            assert torch.equal(
                TokenStream(out, SEQ, 2 * B, 2 * B, prefetch=0).global_batch(0), ref.flatten(0, 1)
            )


def test_cli_decodes_through_the_runs_tokenizer(shards, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(1200)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(shards / "tokenizer.json"))
    run = make_run(tmp_path / "run", shards, 10)
    cli.main(["--run", str(run), "--step", "2", "--decode"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"step 2: input_ids ({B}, {ROW_LEN}) torch.int64", "--- step 2 row 0 ---", " ".join(
        f"w{i}" for i in range(32 * ROW_LEN, 33 * ROW_LEN)
    )]  # fmt: skip
    assert len(lines) == 1 + 2 * B


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--step", "0", "--output", "x.csv"], "data error: --output x.csv: expected a file ending in .pt"),
        (["--step", "7"], "data error: {shards}: end of data: it has 120 samples, global batch 7"),
        (["--step", "0", "--decode"], "data error: {run}: --decode needs a tokenizer.json next to the data"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(shards, tmp_path, args, line):
    run = make_run(tmp_path / "run", shards, 10)
    proc = subprocess.run(
        [sys.executable, "-m", "pico.data.batches", "--run", str(run), *args],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(line.format(shards=shards, run=run)) and proc.stderr.count("\n") == 1


def test_cli_refuses_changed_data(shards, tmp_path):
    run = make_run(tmp_path / "run", shards, 10)
    fingerprinted(run, shards)
    change(shards, "removed")
    proc = subprocess.run(
        [sys.executable, "-m", "pico.data.batches", "--run", str(run), "--step", "1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "data error:" in proc.stderr and "shard part-1.parquet removed" in proc.stderr


def test_global_batch_leaves_a_prefetching_stream_where_it_was(shards):
    ref = TokenStream(shards, SEQ, B, 4, prefetch=0)
    stream = TokenStream(shards, SEQ, B, 4, prefetch=2)
    first = stream.next_batch()  # the read-ahead thread now runs
    whole = stream.global_batch(5)
    assert row_ids(whole) == list(range(80, 96))
    for ours, theirs in zip(
        first + stream.next_batch() + stream.next_batch(), sum((ref.next_batch() for _ in range(3)), [])
    ):
        assert torch.equal(ours, theirs)
    stream.close(), ref.close()
