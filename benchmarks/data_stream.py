"""TokenStream throughput vs a plain pyarrow full read, the data-wait fraction of a tiny-model
training step, and the time of `batch_at` for one global batch of the tiny preset's shape.

Reference: `pyarrow.parquet.read_table` of every file + `to_numpy` (what any reader must at least pay
to see all tokens). The stream delivers int64 (inputs, labels) micro-batches; with W simulated ranks
each rank reads only its slices, so its wall time should fall ~1/W ("vs pyarrow" = reference seconds /
seconds per rank).
Data wait = time blocked in next() / total training-step time.
Replay reference: a full scan, i.e. streaming global batches 0..s to reach batch s (what finding a step's
batch costs without seeking); `batch_at` reads the run's config, indexes and fingerprints the shards and
reads only the row groups of batch s ("vs scan" = scan seconds / batch_at seconds).

    python benchmarks/data_stream.py --rows 8192 --seq-len 256 --steps 10
    python benchmarks/data_stream.py --replay-only --replay-rows 8192
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pico.config import load_config, save_config
from pico.data import TokenStream, batch_at, build_index
from pico.data.fingerprint import record_fingerprint, train_fingerprint
from pico.data.prepare import write_shards
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.training import train_step


def full_read(path: Path) -> tuple[int, float]:
    """(tokens, seconds) of reading every file's input_ids into numpy with pyarrow."""
    start, tokens = time.perf_counter(), 0
    for f in sorted(path.glob("*.parquet")):
        tokens += pq.read_table(f, columns=["input_ids"]).column(0).combine_chunks().flatten().to_numpy().size
    return tokens, time.perf_counter() - start


def stream_read(path: Path, seq_len: int, rows: int, world_size: int, micro: int) -> tuple[int, float]:
    """(tokens per rank, slowest rank's seconds) to stream one epoch through `world_size` simulated ranks."""
    times, tokens = [], 0
    for rank in range(world_size):
        start = time.perf_counter()
        with TokenStream(path, seq_len, rows, micro, rank, world_size, prefetch=0) as stream:
            tokens = sum(next(stream)[:, :-1].numel() for _ in range(stream.accumulation_steps))
        times.append(time.perf_counter() - start)
    return tokens * (seq_len + 1) // seq_len, max(times)


def data_wait(
    path: Path, seq_len: int, vocab: int, micro: int, accum: int, steps: int, prefetch: int
) -> tuple:
    """(blocked seconds, total seconds, steps) of PicoDecoder-tiny training fed by the stream."""
    torch.manual_seed(0)
    model = PicoDecoder(PicoDecoderConfig.preset("tiny", vocab_size=vocab, max_seq_len=seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with TokenStream(
        path, seq_len, micro * accum, micro, vocab_size=vocab, wrap=True, prefetch=prefetch
    ) as stream:
        blocked = total = 0.0
        for step in range(steps + 2):  # the first two steps warm up and are not counted
            t0 = time.perf_counter()
            batches = stream.next_batch()
            wait = time.perf_counter() - t0
            train_step(model, batches)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                blocked, total = blocked + wait, total + time.perf_counter() - t0
    return blocked, total, steps


def replay(rows: int, shards: int, shuffle_seed: int) -> None:
    """Print the seconds to get the last global batch of the tiny preset's shape: batch_at vs a scan."""
    cfg = load_config(None, [f"data.shuffle_seed={shuffle_seed}"])  # the defaults are the tiny preset's shape
    B, L = cfg.data.batch_size, cfg.data.seq_len + 1
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        ids = np.random.default_rng(0).integers(0, cfg.model_config().vocab_size, (rows, L), dtype=np.int32)
        write_shards(ids, data, "bench", shards)
        run.mkdir()
        cfg.data.path = str(data)
        save_config(cfg, run / "config.yaml")
        record_fingerprint(run, train_fingerprint(build_index(str(data))))  # so batch_at checks it
        step = rows // B - 1
        scan_s, got_s = [], []
        for _ in range(3):
            start = time.perf_counter()
            with TokenStream(data, L - 1, B, B, shuffle_seed=shuffle_seed, prefetch=0) as stream:
                for _ in range(step + 1):
                    scanned = next(stream)
            scan_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = batch_at(run, step)
            got_s.append(time.perf_counter() - start)
        assert torch.equal(got, scanned)
    print(
        f"\nreplay: global batch {step} ({B} × {L}) of {rows} rows in {shards} shards (row groups of 256), "
        f"shuffle_seed {shuffle_seed}, best of 3"
    )
    print(f"{'reader':<44}{'seconds':>10}{'vs scan':>10}")
    print(f"{f'scan: TokenStream batches 0..{step} (reference)':<44}{min(scan_s):>10.3f}{1.0:>10.2f}")
    print(f"{f'batch_at(run, {step})':<44}{min(got_s):>10.3f}{min(scan_s) / min(got_s):>10.2f}")


def main() -> None:
    """Print the throughput and data-wait tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--replay-rows", type=int, default=8192, help="rows of 2049 tokens for the replay table")
    p.add_argument("--replay-only", action="store_true", help="print only the replay table")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.replay_only:
        replay(args.replay_rows, 8, shuffle_seed=0)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        rng = np.random.default_rng(0)
        write_shards(
            rng.integers(0, args.vocab_size, (args.rows, args.seq_len + 1), dtype=np.int32),
            path,
            "bench",
            args.shards,
        )
        full_read(path)  # warm the page cache
        ref_tokens, ref_s = min((full_read(path) for _ in range(3)), key=lambda r: r[1])
        print(f"{args.rows} rows × {args.seq_len + 1} tokens in {args.shards} shards (row groups of 256)")
        print(f"{'reader':<36}{'tokens/rank':>12}{'s/rank':>10}{'tokens/s':>14}{'vs pyarrow':>11}")
        print(
            f"{'pyarrow read_table (reference)':<36}{ref_tokens:>12}{ref_s:>10.4f}"
            f"{ref_tokens / ref_s:>14,.0f}"
            f"{1.0:>11.2f}"
        )
        for world_size in (1, 2):
            tokens, s = min(
                (stream_read(path, args.seq_len, args.rows, world_size, 64) for _ in range(3)),
                key=lambda r: r[1],
            )
            print(
                f"{f'TokenStream, {world_size} rank(s), per rank':<36}{tokens:>12}{s:>10.4f}"
                f"{tokens / s:>14,.0f}"
                f"{ref_s / s:>11.2f}"
            )
        print(
            f"\ntraining step: PicoDecoder tiny, vocab {args.vocab_size}, "
            f"micro-batch {args.micro_batch_size} × "
            f"{args.accumulation} accumulation, seq_len {args.seq_len}, 1 CPU thread, {args.steps} steps"
        )
        print(f"{'prefetch':<12}{'ms/step':>10}{'ms waiting':>12}{'data wait':>12}")
        for prefetch in (0, 2):
            blocked, total, steps = data_wait(
                path,
                args.seq_len,
                args.vocab_size,
                args.micro_batch_size,
                args.accumulation,
                args.steps,
                prefetch,
            )
            print(
                f"{prefetch:<12}{1e3 * total / steps:>10.1f}{1e3 * blocked / steps:>12.3f}"
                f"{100 * blocked / total:>11.3f}%"
            )
    replay(args.replay_rows, 8, shuffle_seed=0)


if __name__ == "__main__":
    main()
