"""Training throughput and checkpoint cost: single process vs 2-rank DDP vs 2-rank FSDP2.

Runs recipes/pretrain.py for a few steps per setting and prints tokens/s (MFU on GPU), what one checkpoint
step costs: the time training is blocked by its saves (staging the train state, HF model and learning
dynamics to CPU, docs/checkpoints.md), the evaluation and eval-split capture on W_N before them (reported
apart), and the background write time, during which training goes on; the train split is captured inside
the training step (docs/learning_dynamics.md). Also the size of a step dir, next to pico-train's published
figures for its tiny model: 7 m 42 s per checkpoint step, 151 MB of model state. Checkpoints of the first
and the last step are left out (start-up costs; the end of training waits for the last write).

    python benchmarks/train_throughput.py [--models demo tiny] [--steps 9] [--save-every 3] [--nproc 2]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
PICO_TRAIN = {"checkpoint step (tiny)": "7 m 42 s", "model state (tiny)": "151 MB"}
MODELS = {  # name: (overrides, seq_len, vocab)
    "demo": (
        [
            "model.d_model=128",
            "model.n_layers=4",
            "model.attention_n_heads=4",
            "model.attention_n_kv_heads=2",
            "model.activation_hidden_dim=512",
            "model.max_seq_len=256",
        ],
        256,
        8192,
    ),
    "tiny": (["model.preset=tiny"], 512, 50304),
}


def make_data(directory: Path, seq_len: int, vocab: int, rows: int = 512) -> Path:
    """Random pretokenized shards, enough rows for the run."""
    directory.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
    pq.write_table(
        pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}), directory / "d.parquet"
    )
    return directory


def run(model: str, strategy: str, nproc: int, workdir: Path, args) -> dict:
    """One short training run; returns tokens/s, MFU, checkpoint seconds and step-dir bytes."""
    steps, batch, micro = args.steps, args.batch, args.micro
    overrides, seq_len, vocab = MODELS[model]
    data = workdir / f"data-{model}"
    if not data.exists():
        make_data(data, seq_len, vocab)
    run_dir = workdir / f"{model}-{strategy}-{nproc}"
    args = [
        *overrides,
        f"model.vocab_size={vocab}",
        f"data.path={data}",
        f"data.seq_len={seq_len}",
        f"data.batch_size={batch}",
        f"data.micro_batch_size={micro}",
        f"training.max_steps={steps}",
        "training.warmup_steps=1",
        f"training.strategy={strategy}",
        f"checkpointing.run_dir={run_dir}",
        f"checkpointing.save_every={args.save_every}",
        f"learning_dynamics.eval_data={data}",
        "learning_dynamics.eval_batch_size=8",
        f"evaluation.data={data}",
        "evaluation.batch_size=4",
        "evaluation.max_batches=4",
        "logging.log_every=1",
    ]
    env = {
        **os.environ,
        "NPROC_PER_NODE": str(nproc),
        "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
    }
    cmd = (["./torchrun.sh"] if nproc > 1 else [sys.executable]) + ["recipes/pretrain.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tps = [e.value for e in acc.Scalars("train/tokens_per_s")][1:]  # drop the first (warm-up) step
    mfu = [e.value for e in acc.Scalars("train/mfu")] if "train/mfu" in acc.Tags()["scalars"] else []
    inner = {e.step for e in acc.Scalars("checkpoint/blocking_seconds")} - {0, steps}

    def checkpoint(tag):  # median over the checkpoint steps between the first and the last
        return statistics.median(e.value for e in acc.Scalars(f"checkpoint/{tag}_seconds") if e.step in inner)

    step_dir = run_dir / "checkpoints" / f"step_{steps}"
    size = {
        p: sum(f.stat().st_size for f in (step_dir / p).rglob("*") if f.is_file())
        for p in ("model", "state", "learning_dynamics")
    }
    return {
        "tokens_per_s": statistics.median(tps),
        "mfu": statistics.median(mfu) if mfu else None,
        "blocking_s": checkpoint("blocking"),
        "eval_s": checkpoint("eval"),
        "write_s": checkpoint("write"),
        **size,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["demo", "tiny"], choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--save-every", type=int, default=3, help="checkpoint interval (steps)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--micro", type=int, default=2, help="micro-batch per rank")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for strategy, nproc in (("single", 1), ("ddp", args.nproc), ("fsdp", args.nproc)):
                r = run(model, "ddp" if strategy == "single" else strategy, nproc, Path(tmp), args)
                rows.append((model, strategy, nproc, r))
    print(
        f"{'model':<6} {'setup':<7} {'procs':>5} {'tokens/s':>10} {'vs single':>9} {'mfu':>6} "
        f"{'blocked s':>9} {'eval s':>7} {'bg write s':>10} "
        f"{'model MB':>9} {'state MB':>9} {'dynamics MB':>11}"
    )
    for model, strategy, nproc, r in rows:
        base = next(x for m, s, _, x in rows if m == model and s == "single")["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(
            f"{model:<6} {strategy:<7} {nproc:>5} {r['tokens_per_s']:>10,.0f} "
            f"{r['tokens_per_s'] / base:>8.2f}x "
            f"{mfu:>6} {r['blocking_s']:>9.2f} {r['eval_s']:>7.2f} {r['write_s']:>10.2f} "
            f"{r['model'] / 1e6:>9.1f} {r['state'] / 1e6:>9.1f} "
            f"{r['learning_dynamics'] / 1e6:>11.2f}"
        )
    print("pico-train (published, tiny): " + "; ".join(f"{k} {v}" for k, v in PICO_TRAIN.items()))
    tiny = [r for m, s, _, r in rows if m == "tiny"]
    if tiny:
        print(
            f"ratio: pico-train's tiny checkpoint step / ours, blocked + eval (median over setups): "
            f"{462 / statistics.median(r['blocking_s'] + r['eval_s'] for r in tiny):,.0f}x"
        )


if __name__ == "__main__":
    main()
