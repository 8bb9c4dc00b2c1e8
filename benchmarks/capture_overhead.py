"""Cost of learning-dynamics capture: a captured training step vs a plain one, the eval split, the write.

Reference: the plain training step (forward/backward over the micro-batches, clip, AdamW, zero_grad).
The capture step is the same step inside `capture(...)` plus reading out gradients, activations and
weights (what the recipe does on the update after a checkpoint); the eval split is one extra forward/
backward on the eval batch; the write is `write_learning_dynamics` for both splits (blocking, rank 0).
Each iteration runs plain, capture and a second plain step (an A/A control showing the noise floor) in
rotating order; times are medians, ratios medians of per-iteration ratios (back-to-back steps share the load).
Then bytes per checkpoint for each preset, computed from shapes, next to pico-train's published sizes.

    python benchmarks/capture_overhead.py --steps 8
"""

import argparse
import statistics
import tempfile
import time

import torch

from pico.capture import capture_weights
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.run_dir import DEFAULT_LAYERS
from pico.training import apply_update, captured_step, train_step

# name: (model overrides of the tiny preset, global batch, micro-batch)
SETUPS = {
    "demo": (dict(vocab_size=8192, max_seq_len=256), 8, 4),  # the demo corpus: 8192-token BPE, 256 positions
    "tiny-cpu": (dict(vocab_size=2048, max_seq_len=64), 32, 16),
}


def update(model, optimizer, rows: torch.Tensor, micro: int):
    """One optimizer update over the global batch `rows` (N, T+1) in micro-batches of `micro` rows."""
    loss = train_step(model, list(rows.split(micro)))
    apply_update(model, optimizer, loss, 1.0)
    optimizer.zero_grad(set_to_none=True)


def captured_update(model, optimizer, rows: torch.Tensor, micro: int) -> tuple[SplitDynamics, dict]:
    """The same update with the train split captured on it; returns what it captured and the weights."""
    loss, split = captured_step(model, list(rows.split(micro)), DEFAULT_LAYERS, input_ids=rows)
    weights = capture_weights(model, DEFAULT_LAYERS)
    apply_update(model, optimizer, loss, 1.0)
    optimizer.zero_grad(set_to_none=True)
    return split, weights


def eval_split(model, rows: torch.Tensor) -> SplitDynamics:
    """The eval split: one forward/backward on the eval batch with the current weights (and, as the
    recipe records them, its per-token losses)."""
    _, split = captured_step(model, [rows], DEFAULT_LAYERS, input_ids=rows, losses=True)
    model.zero_grad(set_to_none=True)
    return split


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bench(name: str, args) -> dict[str, float]:
    """Median ms of each part and median per-iteration ratios to the plain step, for one setup."""
    overrides, batch, micro = SETUPS[name]
    torch.manual_seed(0)
    config = PicoDecoderConfig.preset("tiny", **overrides)
    model = PicoDecoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the recipe builds it
    rows = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1))
    step = {
        "plain": lambda: update(model, optimizer, rows, micro),
        "capture": lambda: captured_update(model, optimizer, rows, micro),
        "plain again": lambda: update(model, optimizer, rows, micro),
    }  # A/A control: the noise floor
    times = {key: [] for key in ("plain", "capture", "plain again", "eval", "write")}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.warmup + args.steps):
            took, result = {}, {}
            order = list(step)[i % 3 :] + list(step)[: i % 3]  # rotate which step goes first
            for key in order:
                took[key], result[key] = timed(step[key])
            train, weights = result["capture"]
            took["eval"], evals = timed(eval_split, model, rows)
            splits = {"train": train, "eval": evals}
            took["write"], paths = timed(write_learning_dynamics, tmp, splits, weights, step=i)
            if i >= args.warmup:
                for key, t in took.items():
                    times[key].append(1000 * t)
        size = sum(p.stat().st_size for p in paths) / 1e6
    row = {key: statistics.median(t) for key, t in times.items()}
    for key in (
        "capture",
        "plain again",
        "eval",
    ):  # ratios of steps run back to back share the machine's load
        row[f"{key}/plain"] = statistics.median(t / p for t, p in zip(times[key], times["plain"]))
    return row | {"MB written": size}


def sizes(preset: str, n_train: int, n_eval: int, seq_len: int, bytes_per: int) -> dict[str, float]:
    """MB of each part of a checkpoint's learning_dynamics at the default layers, positions="last"."""
    c = PicoDecoderConfig.preset(preset)
    kv = c.attention_n_kv_heads * c.head_dim
    outs = kv + 2 * c.d_model  # out_features of v_proj, o_proj, swiglu.w_2
    params = kv * c.d_model + c.d_model * c.d_model + c.d_model * c.activation_hidden_dim
    n_bytes = {
        "train acts": n_train * outs * c.n_layers * bytes_per,
        "eval acts": n_eval * outs * c.n_layers * bytes_per,
        "grads/split": params * c.n_layers * bytes_per,
        "weights": params * c.n_layers * bytes_per,
        "input_ids": (n_train + n_eval) * (seq_len + 1) * 4,
        "eval losses": n_eval * seq_len * 4,  # float32 per token
    }
    return {part: n / 1e6 for part, n in n_bytes.items()}


def model_mb(preset: str) -> float:
    """MB of the fp32 model.safetensors of a preset (built on the meta device)."""
    with torch.device("meta"):
        return PicoDecoder(PicoDecoderConfig.preset(preset)).num_params() * 4 / 1e6


# pico-train's published learning-dynamics sizes per checkpoint
PICO_TRAIN = {
    "tiny": "train acts 5.52 MB, weights 1.19 MB, grads 2.37 MB",
    "large": "2.47 GB per step folder",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setup")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--train-batch", type=int, default=1024, help="pico-train's global batch (sequences)")
    parser.add_argument("--eval-batch", type=int, default=64, help="learning_dynamics.eval_batch_size")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"threads={torch.get_num_threads()} torch={torch.__version__} steps={args.steps} "
        f"(+{args.warmup} warm-up), "
        f"fp32 on CPU, layers={list(DEFAULT_LAYERS)}, positions=last"
    )
    columns = (
        "plain ms",
        "capture ms",
        "capture/plain",
        "plain again/plain",
        "eval ms",
        "eval/plain",
        "write ms",
        "MB written",
    )
    print(f"\n{'setup':<9} " + " ".join(columns))
    for name in args.setups:
        row = bench(name, args)
        values = [row[c.removesuffix(" ms")] for c in columns]
        print(
            f"{name:<9} "
            + " ".join(f"{v:>{len(c)}.{3 if '/' in c else 1}f}" for c, v in zip(columns, values))
        )
    for name in args.setups:
        overrides, batch, micro = SETUPS[name]
        print(
            f"  {name}: tiny preset with {overrides}, global batch {batch}, micro-batch {micro}, "
            f"eval batch {batch}"
        )

    print(
        f"\nMB per checkpoint from shapes: train batch {args.train_batch}, eval batch {args.eval_batch}, "
        f"seq {args.seq_len}, default layers, positions=last; gradients for both splits; input_ids int32, "
        "eval losses float32"
    )
    parts = list(sizes("tiny", 1, 1, 1, 4))
    print(
        f"{'preset':<7} {'dtype':<9} "
        + " ".join(f"{p:>11}" for p in parts)
        + f" {'total':>9} {'+model fp32':>12}  pico-train"
    )
    for preset in ("tiny", "small", "medium", "large"):
        for dtype, bytes_per in (("float32", 4), ("bfloat16", 2)):
            s = sizes(preset, args.train_batch, args.eval_batch, args.seq_len, bytes_per)
            total = sum(s.values()) + s["grads/split"]
            ref = PICO_TRAIN.get(preset, "") if dtype == "float32" else ""
            print(
                f"{preset:<7} {dtype:<9} "
                + " ".join(f"{v:>11.2f}" for v in s.values())
                + f" {total:>9.1f} {total + model_mb(preset):>12.1f}  {ref}"
            )


if __name__ == "__main__":
    main()
