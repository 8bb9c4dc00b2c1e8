"""A tiny PicoDecoder, a batch, and the recipe's training step on this rank's slice of it."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pico.model import PicoDecoder, PicoDecoderConfig
from pico.training import train_step as pico_train_step

LAYERS = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
SEQ = 8  # positions the model sees; batches hold SEQ + 1 tokens per row


def tiny_model(seed: int = 0) -> PicoDecoder:
    """A 2-layer PicoDecoder small enough for CPU tests, identical for a given seed."""
    torch.manual_seed(seed)
    return PicoDecoder(
        PicoDecoderConfig(
            d_model=16,
            n_layers=2,
            attention_n_heads=2,
            attention_n_kv_heads=1,
            activation_hidden_dim=32,
            vocab_size=64,
            max_seq_len=16,
        )
    )


def batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    """A global batch of token rows (n, SEQ + 1)."""
    return torch.randint(0, 64, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def global_mean_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all rows."""
    logits = model(rows[:, :-1])  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def train_step(model, rows: torch.Tensor, micro_batch_size: int):
    """The recipe's update (pico.training.train_step) on this rank's contiguous slice of the global batch,
    cut into micro-batches; returns the global-batch mean loss."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = rows.shape[0] // world
    return pico_train_step(
        model, list(rows[rank * n : (rank + 1) * n].split(micro_batch_size))
    )  # (mb, T+1) each
