"""Checkpoint writes in a loop, as the recipe makes them: `checkpoint_writes.py RUN_DIR STEPS` under torchrun
(tests/test_checkpoint_writer.py), and the tiny model and update that its tests share.

On rank 0 deleting a directory takes 0.1 s longer (a slow shared file system): a rank that did not wait for
rank 0 to remake `.tmp_step_<N>` would create `state/` in it first, and rank 0's mkdir would then fail.
Rank 0 saves W_N as `expected_<N>.pt` before it writes step N, for the tests to compare.
"""

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import pico and tests

from pico.checkpoint import CheckpointStep, CheckpointWriter  # noqa: E402
from pico.distributed import cleanup, init_distributed, is_main, parallelize  # noqa: E402
from pico.model import PicoDecoder, PicoDecoderConfig  # noqa: E402

CONFIG = PicoDecoderConfig(
    d_model=16,
    n_layers=1,
    attention_n_heads=2,
    attention_n_kv_heads=1,
    activation_hidden_dim=32,
    vocab_size=32,
    max_seq_len=8,
)


def build(world_size: int = 1):
    """The same tiny model on every rank (DDP over gloo with several ranks), and its AdamW."""
    torch.manual_seed(0)
    model = PicoDecoder(CONFIG)
    if world_size > 1:
        model = parallelize(model, strategy="ddp", world_size=world_size, device=torch.device("cpu"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def update(model, optimizer, step: int) -> None:
    """Update step+1 on a batch fixed by `step` (the same on every rank)."""
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(step))  # (B, T)
    optimizer.zero_grad()
    logits = model(ids)  # (B, T, V)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    optimizer.step()


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of the model's weights (pico names)."""
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def save(writer, model, optimizer, step: int, evals: dict | None = None) -> None:
    """As the recipe does: end the previous write, then stage step_<step> (W_step) and start writing it;
    rank 0 keeps W_step as `expected_<step>.pt`."""
    writer.complete_write()
    if is_main():
        torch.save(weights(model), Path(writer.run_dir) / f"expected_{step}.pt")
    writer.save(CheckpointStep(step, {"step": step}, evals=evals), model, optimizer)


def slow_rmtree_on_rank_0(rank: int) -> None:
    """Make shutil.rmtree take 0.1 s longer on rank 0 (a slow shared file system)."""
    rmtree = shutil.rmtree

    def slow(*args, **kwargs):
        rmtree(*args, **kwargs)
        time.sleep(0.1)

    if rank == 0:
        shutil.rmtree = slow


def main(run_dir: Path, steps: int) -> None:
    dist = init_distributed()  # also: this worker dies with its launcher
    (run_dir / f"pid{dist.rank}").write_text(str(os.getpid()))
    slow_rmtree_on_rank_0(dist.rank)
    model, optimizer = build(dist.world_size)
    writer = CheckpointWriter(run_dir)
    for step in range(steps):
        save(writer, model, optimizer, step)
        update(model, optimizer, step)
    writer.complete_write()
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
