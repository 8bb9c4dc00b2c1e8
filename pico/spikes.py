"""Loss spikes: one is a loss above the mean of the last `window` losses by more than `threshold` of their
standard deviations, and it leaves evidence: the update's batch (its rows in the data) and its learning
dynamics, kept as a dynamics-only checkpoint (docs/learning_dynamics.md, "Loss spikes")."""

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pico.capture import capture_weights
from pico.checkpoint import set_rng_state
from pico.data.fingerprint import shard_names
from pico.distributed import is_main
from pico.learning_dynamics import write_learning_dynamics
from pico.run_dir import SPIKE, checkpoints_dir, new_step_dir, publish_step, spikes_dir, step_dir
from pico.training import recaptured_step


@dataclass(frozen=True)
class Spike:
    """A loss and what made it a spike: the mean and standard deviation of the window before it, and its
    distance from that mean in standard deviations (`z`)."""

    loss: float
    mean: float
    std: float
    z: float

    def __str__(self) -> str:
        return f"{self.loss:.4f}, {self.z:.1f} std above the mean {self.mean:.4f} (std {self.std:.2g})"


class SpikeDetector:
    """Flags a loss above the mean of the last `window` finite losses by more than `threshold` of their
    (population) standard deviations. Every finite loss joins the window, a spike too, so a loss level that
    persists stops being one; non-finite losses are training.nan_policy's and are left out."""

    def __init__(self, window: int, threshold: float):
        self.threshold = threshold
        self.losses: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> Spike | None:
        """Add `loss`; the Spike when it is one, None otherwise (also until the window is full)."""
        if not math.isfinite(loss):
            return None
        spike = None
        n = len(self.losses)
        if n == self.losses.maxlen:
            mean = math.fsum(self.losses) / n
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / n)
            if std > 0 and loss - mean > self.threshold * std:
                spike = Spike(loss, mean, std, (loss - mean) / std)
        self.losses.append(loss)
        return spike


def save_spike(
    run_dir, step: int, spike: Spike, model, batches, stream, *, rng: dict, ld, precision: str
) -> Path:
    """Keep the evidence of a spike in update step+1, whose forward/backward has run (W_step, its gradients
    not yet clipped or applied): `<run_dir>/spikes/checkpoints/step_<step>/` with learning_dynamics/
    train.safetensors (`recaptured_step` from `rng`, the RNG state the update began with; the layers of `ld`
    when learning dynamics are enabled, input_ids always), weights.safetensors and spike.json (the Spike, and
    the global batch's rows as [shard, row]). Returns that path; a collective, rank 0 writes (blocking: spikes
    are rare). The RNG is left as it was, so training goes on unchanged."""
    layers = list(ld.layers) if ld.enabled else []
    device = batches[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng_state(rng)  # the update's own random draws (dropout)
        dynamics = recaptured_step(model, batches, layers, positions=ld.positions, precision=precision)
    weights = capture_weights(model, layers)
    final = step_dir(spikes_dir(run_dir), step)
    if not is_main():
        return final
    names = shard_names(stream.index)
    record = {"step": step, **asdict(spike), "rows": [[names[f], r] for f, r in stream.batch_rows(step)]}
    tmp = new_step_dir(spikes_dir(run_dir), step)
    write_learning_dynamics(
        tmp, {"train": dynamics}, weights, step=step, positions=ld.positions, dtype=ld.dtype
    )
    (tmp / SPIKE).write_text(json.dumps(record) + "\n")
    publish_step(checkpoints_dir(spikes_dir(run_dir)), tmp, step)  # `latest` there: the newest spike
    return final
