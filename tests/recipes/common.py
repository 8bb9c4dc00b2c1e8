"""What the recipe tests share: a micro model, random pretokenized shards, and launching the recipe."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
SEQ, VOCAB, STEPS = 16, 64, 6
MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.attention_n_heads=4",
    "model.attention_n_kv_heads=2",
    "model.activation_hidden_dim=64",
    f"model.vocab_size={VOCAB}",
    "model.max_seq_len=32",
]
LAYERS = ["layers.0.attention.v_proj", "layers.1.attention.o_proj", "layers.1.swiglu.w_2"]


def write_shards(directory: Path, rows: int, seed: int, files: int = 2) -> Path:
    """Random pretokenized shards (input_ids: seq_len + 1 ids per row)."""
    directory.mkdir(parents=True)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(rows, SEQ + 1))
    for i, part in enumerate(np.array_split(ids, files)):
        table = pa.table({"input_ids": pa.array(part.tolist(), type=pa.list_(pa.int32()))})
        pq.write_table(table, directory / f"part-{i:03d}.parquet", row_group_size=16)
    return directory


KILL_AT = Path(__file__).with_name("kill_at.py")


def launch(args, nproc=1, env=None, check=True, nnodes=None, kill_at=None, recipe="recipes/pretrain.py"):
    """Run the recipe: plain python for one process, ./torchrun.sh otherwise; `kill_at="<step>:<phase>"` runs
    it through tests/recipes/kill_at.py, which SIGKILLs rank 0 at that checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    script = [str(KILL_AT), kill_at, recipe] if kill_at else [recipe]
    if nproc == 1 and nnodes is None:
        cmd = [sys.executable, *script, *args]
    else:
        env["NPROC_PER_NODE"] = str(nproc)
        cmd = ["./torchrun.sh", *script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc
