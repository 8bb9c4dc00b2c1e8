"""Bytes per checkpoint by part, for each preset, and the storage of a Pythia-style grid with and without
retention of the train state (docs/checkpoints.md, "Storage").

Computed from shapes: `model/` holds the fp32 weights, `state/` the fp32 weights and AdamW's two moments,
`learning_dynamics/` the default layers' gradients (train and eval splits) and weights, their activations at
the last position of each row, and the rows' token ids (int32), in float32 or bfloat16. The sizes are those
of the presets' configs (recipes/configs/pico-decoder-*.yaml: 1024 rows of 2048 tokens per step, an eval
batch of 64). The grid is Pythia's: 154 checkpoints (0, 1, 2, 4, ..., 512, then every 1000 to 143000), all
with `state/`, or with `checkpointing.keep_state_last: 1`.

Reference: a real run. `--check` trains the tiny preset for 2 steps on random data (rows of `--seq` tokens,
`--batch` per step, eval batch 4) and compares each part of its step_1 on disk to the computed bytes for that
run's shape (headers, metadata and RNG state are the difference).

    python benchmarks/checkpoint_storage.py --check
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pico.checkpoint_schedule import checkpoint_steps
from pico.config import load_config
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.run_dir import DEFAULT_LAYERS, module_matches

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "small", "medium", "large")
GRID = ["training.max_steps=143000", "checkpointing.save_every=1000", "checkpointing.save_log_spaced=true"]


def part_bytes(
    config: PicoDecoderConfig, *, train_rows: int, eval_rows: int, seq_len: int, dyn_bytes: int
) -> dict:
    """Bytes of `model/`, `state/` (after the first update: with AdamW's moments) and `learning_dynamics/`
    of one checkpoint of a model with `config`, at the default layers and positions="last"."""
    with torch.device("meta"):
        model = PicoDecoder(config)
    params = sum(p.numel() for p in model.parameters())
    captured = [
        m for name, m in model.named_modules() if any(module_matches(name, s) for s in DEFAULT_LAYERS)
    ]
    matrices = sum(m.weight.numel() for m in captured)  # (out, in) of every captured module
    outs = sum(m.weight.shape[0] for m in captured)
    dynamics = (
        3 * matrices * dyn_bytes  # gradients of the train and eval splits, weights
        + (train_rows + eval_rows) * outs * dyn_bytes  # activations (rows, out)
        + (train_rows + eval_rows) * (seq_len + 1) * 4  # input_ids, int32
    )
    return {"model": 4 * params, "state": 3 * 4 * params, "dynamics": dynamics}


def preset_table() -> list[dict]:
    """Per preset: its parts (dynamics in fp32 and bf16) at its config's shapes, and the grid's totals."""
    grid = checkpoint_steps(load_config(None, GRID).checkpointing, 143_000)
    rows = []
    for preset in PRESETS:
        cfg = load_config(ROOT / "recipes" / "configs" / f"pico-decoder-{preset}.yaml")
        shape = dict(train_rows=cfg.data.batch_size, eval_rows=cfg.learning_dynamics.eval_batch_size)
        fp32 = part_bytes(cfg.model_config(), **shape, seq_len=cfg.data.seq_len, dyn_bytes=4)
        bf16 = part_bytes(cfg.model_config(), **shape, seq_len=cfg.data.seq_len, dyn_bytes=2)
        n = len(grid)
        everywhere = n * (fp32["model"] + fp32["dynamics"])
        rows.append(
            {
                "preset": preset,
                **fp32,
                "dynamics bf16": bf16["dynamics"],
                "checkpoint": sum(fp32.values()),
                "grid, all state": everywhere + n * fp32["state"] - 2 * fp32["model"],  # step 0: no moments
                "grid, keep 1": everywhere + fp32["state"],
                "grid, keep 1, bf16": n * (bf16["model"] + bf16["dynamics"]) + bf16["state"],
                "n": n,
            }
        )
    return rows


def real_run(workdir: Path, seq: int, batch: int) -> dict:
    """Bytes of each part of step_1 of a 2-step tiny-preset run on random data (one process)."""
    data = workdir / "data"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50304, size=(4 * batch, seq + 1), dtype=np.int32)
    pq.write_table(
        pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}), data / "d.parquet"
    )
    run_dir = workdir / "run"
    args = [
        "model.preset=tiny",
        f"data.path={data}",
        f"data.seq_len={seq}",
        f"data.batch_size={batch}",
        f"data.micro_batch_size={batch}",
        "training.max_steps=2",
        "training.warmup_steps=1",
        f"checkpointing.run_dir={run_dir}",
        "checkpointing.save_every=1",
        f"learning_dynamics.eval_data={data}",
        "learning_dynamics.eval_batch_size=4",
    ]
    proc = subprocess.run(
        [sys.executable, "recipes/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"the tiny run failed:\n{proc.stderr[-3000:]}")
    step = run_dir / "checkpoints" / "step_1"
    parts = {"model": "model", "state": "state", "dynamics": "learning_dynamics"}
    return {
        part: sum(f.stat().st_size for f in (step / d).rglob("*") if f.is_file()) for part, d in parts.items()
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with a real tiny-preset run")
    p.add_argument("--seq", type=int, default=64, help="tokens per row of the real run")
    p.add_argument("--batch", type=int, default=8, help="rows per step of the real run")
    args = p.parse_args()
    mb, gb = 1e6, 1e9
    print("bytes per checkpoint (MB; dynamics at the default layers, last positions, 1024 + 64 rows of 2048)")
    print(f"{'preset':>7} {'model':>9} {'state':>9} {'dyn fp32':>9} {'dyn bf16':>9} {'total':>9}")
    rows = preset_table()
    for r in rows:
        print(
            f"{r['preset']:>7} {r['model'] / mb:9.1f} {r['state'] / mb:9.1f} {r['dynamics'] / mb:9.1f} "
            f"{r['dynamics bf16'] / mb:9.1f} {r['checkpoint'] / mb:9.1f}"
        )
    print(f"\na {rows[0]['n']}-checkpoint grid (GB): state/ everywhere vs keep_state_last: 1, and the ratio")
    print(
        f"{'preset':>7} {'all state':>10} {'keep 1':>10} {'ratio':>6} {'keep 1, bf16 dyn':>17} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['preset']:>7} {r['grid, all state'] / gb:10.1f} {r['grid, keep 1'] / gb:10.1f} "
            f"{r['grid, all state'] / r['grid, keep 1']:5.1f}x {r['grid, keep 1, bf16'] / gb:17.1f} "
            f"{r['grid, all state'] / r['grid, keep 1, bf16']:5.1f}x"
        )
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            measured = real_run(Path(tmp), args.seq, args.batch)
        config = PicoDecoderConfig.preset("tiny")
        computed = part_bytes(config, train_rows=args.batch, eval_rows=4, seq_len=args.seq, dyn_bytes=4)
        print(
            f"\nreal tiny run, step_1 (rows of {args.seq}, batch {args.batch}, eval 4): "
            "bytes on disk, computed, ratio"
        )
        for part, size in measured.items():
            print(f"{part:>9} {size:12,d} {computed[part]:12,d} {size / computed[part]:8.4f}x")


if __name__ == "__main__":
    main()
