"""`python -m pico.data.batches --run R --step N [--step M ...] [--output FILE] [--decode]`: the global
training batches of a run's updates, as shapes, as text (`--decode`) or as ids in a `.pt`, `.npy` or
`.parquet` file (`--output`)."""

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pico.data.replay import Replay
from pico.data.shards import DataError, find_tokenizer
from pico.errors import exit_on
from pico.run_dir import MODEL, checkpoints_dir

FORMATS = (".pt", ".npy", ".parquet")


def write_batches(path: Path, steps: list[int], ids: torch.Tensor) -> None:
    """Write the batches `ids` (S, B, T+1) of `steps`: `.pt` {"steps", "input_ids"}, `.npy` the array,
    `.parquet` one row per sequence with columns step, row, input_ids (a shard pico.data reads)."""
    if path.suffix == ".pt":
        torch.save({"steps": torch.tensor(steps), "input_ids": ids}, path)
    elif path.suffix == ".npy":
        np.save(path, ids.numpy())
    else:
        S, B, L = ids.shape
        flat = ids.reshape(S * B, L).numpy()  # (S·B, T+1)
        column = pa.ListArray.from_arrays(pa.array(np.arange(S * B + 1) * L), pa.array(flat.ravel()))
        table = pa.table({"step": np.repeat(steps, B), "row": np.tile(np.arange(B), S), "input_ids": column})
        pq.write_table(table, path)


def run_tokenizer(replay: Replay) -> Path:
    """The run's tokenizer.json: next to its data (find_tokenizer), else in a checkpoint's exported model/."""
    found = find_tokenizer(replay.stream.path)
    if found is None:
        exported = sorted(checkpoints_dir(replay.run_dir).glob(f"step_*/{MODEL}/tokenizer.json"))
        found = exported[-1] if exported else None
    if found is None:
        raise DataError(
            f"{replay.run_dir}: --decode needs a tokenizer.json next to the data or in a checkpoint"
        )
    return found


def show(step: int, ids: torch.Tensor, decoder) -> torch.Tensor:
    """Print the batch `ids` (B, T+1) of `step`: its shape, and with a `decoder` the text of each row."""
    print(f"step {step}: input_ids {tuple(ids.shape)} {ids.dtype}")
    texts = decoder.decode_batch(ids.tolist(), skip_special_tokens=False) if decoder is not None else []
    for row, text in enumerate(texts):
        print(f"--- step {step} row {row} ---\n{text}")
    return ids


def main(argv=None) -> None:
    """Print (and write) the batches asked for; exit 2 with one line on bad input."""
    p = argparse.ArgumentParser(
        prog="python -m pico.data.batches",
        description="The global training batch of a run's updates (docs/data.md, 'Replaying a run').",
    )
    p.add_argument("--run", required=True, help="the run directory (holding config.yaml)")
    p.add_argument("--step", type=int, action="append", required=True, help="an update number (repeatable)")
    p.add_argument(
        "--output", type=Path, help="write the ids (S, batch_size, seq_len + 1): " + ", ".join(FORMATS)
    )
    p.add_argument("--decode", action="store_true", help="print each sequence's text through the tokenizer")
    p.add_argument("--data", help="read the data here instead of the config's data.path (the same data)")
    p.add_argument("--allow-changed", action="store_true", help="read data that differ from the run's")
    args = p.parse_args(argv)
    with exit_on():
        if args.output is not None and args.output.suffix not in FORMATS:
            raise DataError(f"--output {args.output}: expected a file ending in {', '.join(FORMATS)}")
        with Replay(args.run, data_path=args.data, allow_changed=args.allow_changed) as replay:
            decoder = None
            if args.decode:
                from tokenizers import Tokenizer

                decoder = Tokenizer.from_file(str(run_tokenizer(replay)))
            batches = [show(step, replay.batch(step), decoder) for step in args.step]
        if args.output is not None:
            try:
                write_batches(args.output, args.step, torch.stack(batches))
            except OSError as e:
                raise DataError(f"--output {args.output}: cannot write ({e.strerror or e})") from None
            print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
