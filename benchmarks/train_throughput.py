"""Training throughput and checkpoint cost: single process vs 2-rank DDP vs 2-rank FSDP2.

Runs recipes/pretrain.py for a few steps per setting and prints tokens/s (MFU on GPU), what one checkpoint
step costs: the time training is blocked by its saves (staging the train state, HF model and learning
dynamics to CPU, docs/checkpoints.md), the evaluation and eval-split capture on W_N before them (reported
apart), and the background write time, during which training goes on; the train split is captured inside
the training step (docs/learning_dynamics.md). Also the size of a step dir, next to pico-train's published
figures for its tiny model: 7 m 42 s per checkpoint step, 151 MB of model state. Checkpoints of the first
and the last step are left out (start-up costs; the end of training waits for the last write).

`--ddp-reduction` measures instead what DDP's per-gradient all-reduce costs (the comm hook
`pico.distributed.all_reduce_per_tensor`, which `parallelize` registers from 3 ranks on so that a resumed run
is bitwise, docs/checkpoints.md) vs DDP's default bucket all-reduce, on 2 and 4 CPU ranks (gloo), the two
models' steps alternating.

    python benchmarks/train_throughput.py [--models demo tiny] [--steps 9] [--save-every 3] [--nproc 2]
    python benchmarks/train_throughput.py --ddp-reduction [--models demo tiny] [--steps 9]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.parallel import DistributedDataParallel

from pico.config import load_config
from pico.distributed import all_reduce_per_tensor
from pico.model import PicoDecoder
from pico.training import apply_update, train_step

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


def ddp_steps(rank: int, nproc: int, port: int, model: str, args, out) -> None:
    """One rank: `args.steps` training steps of DDP with the per-gradient hook and of DDP's default,
    alternating; rank 0 puts each variant's step seconds (the first, warm-up, step left out) on `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, os.cpu_count() // nproc))
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    overrides, seq_len, vocab = MODELS[model]
    config = load_config(None, [*overrides, f"model.vocab_size={vocab}", f"data.seq_len={seq_len}"])
    config = config.model_config()
    torch.manual_seed(0)
    models = {"per-tensor": DistributedDataParallel(PicoDecoder(config))}
    models["per-tensor"].register_comm_hook(None, all_reduce_per_tensor)
    models["default"] = DistributedDataParallel(PicoDecoder(config))
    optimizers = {k: torch.optim.AdamW(m.parameters(), fused=True) for k, m in models.items()}
    rows = torch.randint(0, vocab, (args.micro, seq_len + 1))  # (micro, T+1)
    seconds = {k: [] for k in models}
    for _ in range(args.steps + 1):
        for name, m in models.items():
            dist.barrier()
            start = time.perf_counter()
            loss = train_step(m, [rows])
            apply_update(m, optimizers[name], loss, 1.0)
            optimizers[name].zero_grad(set_to_none=True)
            dist.barrier()
            seconds[name].append(time.perf_counter() - start)
    if rank == 0:
        out.put({k: v[1:] for k, v in seconds.items()})
    dist.destroy_process_group()


def ddp_reduction(args) -> None:
    """Print tokens/s of DDP's per-gradient all-reduce vs DDP's default, per model and rank count (CPU,
    gloo), and their ratio: the median over steps of the paired step-time ratios."""
    print(f"{'model':<6} {'procs':>5} {'default tok/s':>13} {'per-tensor tok/s':>16} {'ratio':>7}")
    ctx = mp.get_context("spawn")
    for model in args.models:
        for nproc in (2, 4):
            out = ctx.SimpleQueue()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(ddp_steps, (nproc, port, model, args, out), nprocs=nproc, start_method="spawn")
            seconds = out.get()
            tokens = args.micro * nproc * MODELS[model][1]  # per step, all ranks
            default, hook = (tokens / statistics.median(seconds[k]) for k in ("default", "per-tensor"))
            ratio = statistics.median(d / h for d, h in zip(seconds["default"], seconds["per-tensor"]))
            print(f"{model:<6} {nproc:>5} {default:>13,.0f} {hook:>16,.0f} {ratio:>6.3f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["demo", "tiny"], choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--save-every", type=int, default=3, help="checkpoint interval (steps)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--micro", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--ddp-reduction", action="store_true", help="pico's DDP all-reduce vs DDP's default")
    args = p.parse_args()
    if args.ddp_reduction:
        return ddp_reduction(args)
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
