"""Cost of loss-spike detection when no spike happens: a training step with `training.spike_detection` on
vs the same step without it.

Reference: the recipe's plain step (forward/backward over the micro-batches, clip, AdamW, zero_grad). The
detecting step adds what recipes/pretrain.py adds on every update: `loss.item()` and
`SpikeDetector.observe` over a full window (the statistics of `window` losses). Each iteration runs plain,
detecting and a second plain step (an A/A control: the noise floor) in rotating order; times are medians,
ratios medians of per-iteration ratios. Because the difference is far below that floor, the detection
itself is also timed alone, over many calls, and given as a share of the plain step.

    python benchmarks/spike_overhead.py --steps 12
"""

import argparse
import statistics
import time

import torch

from pico.model import PicoDecoder, PicoDecoderConfig
from pico.spikes import SpikeDetector
from pico.training import apply_update, train_step

# name: (model overrides of the tiny preset, global batch, micro-batch)
SETUPS = {
    "demo": (dict(vocab_size=8192, max_seq_len=256), 8, 4),  # the demo corpus: 8192-token BPE, 256 positions
    "tiny-cpu": (dict(vocab_size=2048, max_seq_len=64), 32, 16),
}


def update(model, optimizer, rows: torch.Tensor, micro: int, detector: SpikeDetector | None = None):
    """One optimizer update over `rows` (N, T+1) in micro-batches of `micro` rows, the recipe's way; with a
    `detector`, its loss is observed first (no spike: the window is filled with that same loss level)."""
    loss = train_step(model, list(rows.split(micro)))
    if detector is not None and detector.observe(loss.item()) is not None:
        raise RuntimeError("spike_overhead: a spike was detected; this measures steps without one")
    apply_update(model, optimizer, loss, 1.0)
    optimizer.zero_grad(set_to_none=True)


def observe_seconds(window: int, calls: int = 20_000) -> float:
    """Seconds of one `observe` (of a 0-d tensor's `.item()` and the window's statistics), no spike."""
    detector, loss = SpikeDetector(window, threshold=6.0), torch.tensor(2.5)
    noise = torch.rand(calls).mul(0.01).add(2.5).tolist()
    start = time.perf_counter()
    for x in noise:
        detector.observe(loss.item() + x - 2.5)
    return (time.perf_counter() - start) / calls


def bench(name: str, args) -> dict[str, float]:
    """Median ms of each step, median per-iteration ratios to the plain step, and observe's share."""
    overrides, batch, micro = SETUPS[name]
    torch.manual_seed(0)
    config = PicoDecoderConfig.preset("tiny", **overrides)
    model = PicoDecoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the recipe builds it
    rows = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1))
    detector = SpikeDetector(args.window, threshold=6.0)
    step = {
        "plain": lambda: update(model, optimizer, rows, micro),
        "detect": lambda: update(model, optimizer, rows, micro, detector),
        "plain again": lambda: update(model, optimizer, rows, micro),
    }
    times = {key: [] for key in step}
    for i in range(args.warmup + args.steps):
        for key in list(step)[i % 3 :] + list(step)[: i % 3]:  # rotate which step goes first
            start = time.perf_counter()
            step[key]()
            if i >= args.warmup:
                times[key].append(1000 * (time.perf_counter() - start))
    row = {key: statistics.median(t) for key, t in times.items()}
    for key in ("detect", "plain again"):  # ratios of steps run back to back share the machine's load
        row[f"{key}/plain"] = statistics.median(t / p for t, p in zip(times[key], times["plain"]))
    row["observe us"] = 1e6 * observe_seconds(args.window)
    row["observe/plain %"] = 100 * row["observe us"] / (1000 * row["plain"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed iterations per setup")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per setup")
    parser.add_argument("--window", type=int, default=100, help="training.spike_detection.window")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"threads={torch.get_num_threads()} torch={torch.__version__} steps={args.steps} (+{args.warmup} "
        f"warm-up), fp32 on CPU, window={args.window}; no spike"
    )
    columns = ("plain ms", "detect ms", "detect/plain", "plain again/plain", "observe us", "observe/plain %")
    print(f"\n{'setup':<9} " + " ".join(columns))
    for name in args.setups:
        row = bench(name, args)
        values = [row[c.removesuffix(" ms")] for c in columns]
        print(
            f"{name:<9} "
            + " ".join(
                f"{v:>{len(c)}.{4 if '%' in c else 3 if '/' in c else 1}f}" for c, v in zip(columns, values)
            )
        )
    for name in args.setups:
        overrides, batch, micro = SETUPS[name]
        print(f"  {name}: tiny preset with {overrides}, global batch {batch}, micro-batch {micro}")


if __name__ == "__main__":
    main()
