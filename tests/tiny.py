"""The tiny runs the tests train, written once: the micro model, random pretokenized shards, and the
`section.key=value` overrides of a short run of the recipes on them."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pico.model import PicoDecoderConfig

SEQ, VOCAB = 16, 64  # tokens per training row (+1 in the shards), token ids of the shards
STEPS = 6  # updates of a tiny run
MODEL_FIELDS = dict(
    d_model=32,
    n_layers=2,
    attention_n_heads=4,
    attention_n_kv_heads=2,
    activation_hidden_dim=64,
    vocab_size=VOCAB,
    max_seq_len=32,
)
MODEL = [f"model.{key}={value}" for key, value in MODEL_FIELDS.items()]  # the micro model as overrides
LAYERS = ["layers.0.attention.v_proj", "layers.1.attention.o_proj", "layers.1.swiglu.w_2"]


def model_config(**fields) -> PicoDecoderConfig:
    """The micro model's config, with `fields` changed."""
    return PicoDecoderConfig(**{**MODEL_FIELDS, **fields})


def write_shards(directory: Path, rows: int, seed: int, files: int = 2) -> Path:
    """Random pretokenized shards (input_ids: SEQ + 1 ids below VOCAB per row) in `files` parquet files."""
    directory.mkdir(parents=True)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(rows, SEQ + 1))
    for i, part in enumerate(np.array_split(ids, files)):
        table = pa.table({"input_ids": pa.array(part.tolist(), type=pa.list_(pa.int32()))})
        pq.write_table(table, directory / f"part-{i:03d}.parquet", row_group_size=16)
    return directory


def shards(root: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """(train, eval) shards under `root`: `train_rows` rows in 2 files (seed 1), `eval_rows` in 1 (seed 2)."""
    train = write_shards(root / "train", train_rows, seed=1)
    return train, write_shards(root / "eval", eval_rows, seed=2, files=1)


def tiny_run(
    train: Path,
    run_dir: Path | None = None,
    *extra: str,
    steps: int = STEPS,
    batch_size: int = 8,
    micro_batch_size: int = 2,
    save_every: int = 3,
    evals: Path | None = None,
    eval_batch_size: int = 4,
) -> list[str]:
    """A short run of the micro model on the shards `train`: `steps` updates of `batch_size` rows, a
    checkpoint every `save_every` steps, a log line every step; with `evals`, the eval split of learning
    dynamics on its first `eval_batch_size` rows. `extra` overrides come last, so they win."""
    args = [
        *MODEL,
        f"data.path={train}",
        f"data.seq_len={SEQ}",
        f"data.batch_size={batch_size}",
        f"data.micro_batch_size={micro_batch_size}",
        f"training.max_steps={steps}",
        f"checkpointing.save_every={save_every}",
        "logging.log_every=1",
    ]
    if run_dir is not None:
        args.append(f"checkpointing.run_dir={run_dir}")
    if evals is not None:
        args += [
            f"learning_dynamics.eval_data={evals}",
            f"learning_dynamics.eval_batch_size={eval_batch_size}",
        ]
    return [*args, *extra]
