"""Console and tensorboard logging from rank 0: loss, lr, grad norm, tokens/s, MFU, ETA."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pico.analysis.in_situ import in_situ_scalars
from pico.distributed import is_main
from pico.evaluation import flat_metrics, format_results
from pico.run_dir import TENSORBOARD

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def format_duration(seconds: float) -> str:
    """`1h02m`, `4m12s` or `37s`."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class TrainLogger:
    """Writes scalars to `<run_dir>/tensorboard` and one console line per log step, on rank 0 only."""

    def __init__(self, run_dir: str | Path, max_steps: int):
        self.is_main, self.max_steps = is_main(), max_steps
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))
        self._t0 = time.perf_counter()
        self._step0 = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Add each `tag: value` to tensorboard at `step`."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def evals(self, step: int, results: dict[str, dict]) -> None:
        """Log evaluation results: `eval/<task>/<metric>` scalars (subsets too) and one line per task."""
        self.scalars(step, flat_metrics(results))
        for line in format_results(results):
            self.print(f"eval  {step:>6} | {line}")

    def dynamics(self, step: int, dynamics: dict, weights: dict | None, metrics: list[str]) -> None:
        """Log the in-situ `metrics` of a checkpoint's captured tensors (`dynamics/*`, computed on rank 0):
        `dynamics` maps a split to its SplitDynamics, `weights` module names to tensors."""
        if self.is_main:
            self.scalars(step, in_situ_scalars(dynamics, weights, metrics))

    def checkpoint(
        self, step: int, blocking_seconds: float, eval_seconds: float, written: dict[int, float]
    ) -> None:
        """Log how long checkpoint step `step` held training up (`checkpoint/blocking_seconds`: staging its
        writes, and waiting for the previous one), the evaluation and eval-split pass on W_step before it
        (`checkpoint/eval_seconds`), and the background writes completed since (`checkpoint/write_seconds`,
        at their own steps, from pico.checkpoint.CheckpointWriter.written)."""
        self.scalars(
            step, {"checkpoint/blocking_seconds": blocking_seconds, "checkpoint/eval_seconds": eval_seconds}
        )
        for done, seconds in written.items():
            self.scalars(done, {"checkpoint/write_seconds": seconds})
        line = f"saved  {step:>6} | step_{step}: blocked {blocking_seconds:.1f}s, eval {eval_seconds:.1f}s"
        self.print(line + "".join(f" | step_{n} written in {s:.1f}s" for n, s in written.items()))

    def print(self, message: str) -> None:
        """Print a line from rank 0."""
        if self.is_main:
            print(message, file=sys.stdout, flush=True)

    def train(
        self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float | None
    ) -> None:
        """Log one training step: `train/*` scalars and a console line with an ETA from the average speed."""
        self.scalars(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": tokens_per_s,
                **({"train/mfu": mfu} if mfu else {}),
            },
        )
        now = time.perf_counter()
        if self._step0 is None:
            self._step0, self._t0 = step, now
        done = step - self._step0
        eta = (now - self._t0) / done * (self.max_steps - step) if done > 0 else float("nan")
        line = (
            f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s"
        )
        if mfu is not None:
            line += f" | mfu {100 * mfu:.1f}%"
        if done > 0:
            line += f" | eta {format_duration(eta)}"
        self.print(line)

    def close(self) -> None:
        """Flush and close the tensorboard writer."""
        if self.writer is not None:
            self.writer.close()
