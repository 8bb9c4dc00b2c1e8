"""One training step: forward/backward over this rank's micro-batches (captured or not), then the update."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pico.capture import capture
from pico.data import split_rows
from pico.distributed import all_reduce_mean, autocast, full_tensor, gather_rows, gradient_sync
from pico.learning_dynamics import SplitDynamics


def train_step(model: torch.nn.Module, batches: list[torch.Tensor], precision: str = "fp32") -> torch.Tensor:
    """Forward/backward over micro-batches of token rows `(micro, T+1)`; returns the global-batch loss.

    The loss is the mean token cross-entropy over the global batch (every rank, every micro-batch; all
    hold the same number of tokens), so the synced gradient is that of the global-batch mean. Gradients
    are synchronised across ranks on the last micro-batch only. A collective under torch.distributed.
    """
    total = torch.zeros((), device=batches[0].device)
    for i, rows in enumerate(batches):
        inputs, labels = split_rows(rows)  # (mb, T) each
        with gradient_sync(model, i == len(batches) - 1), autocast(precision, inputs.device, model):
            logits = model(inputs)  # (mb, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()) / len(batches)
        loss.backward()
        total += loss.detach()
    return all_reduce_mean(total)


def captured_step(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    layers,
    positions: str = "last",
    precision: str = "fp32",
    input_ids: torch.Tensor | None = None,
):
    """`train_step` under capture: (loss, SplitDynamics of this forward/backward). A collective.

    `input_ids` (N, T+1) recorded with it default to the global batch gathered from every rank.
    """
    ids = gather_rows(torch.cat(batches)).cpu() if input_ids is None else input_ids  # (B, T+1)
    with capture(model, layers, positions) as cap:
        loss = train_step(model, batches, precision)
        gradients = cap.gradients()  # before anything clips or zeroes them
    return loss, SplitDynamics(cap.activations(), gradients, ids)


def apply_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None
) -> tuple[torch.Tensor, bool]:
    """Clip the gradient norm to `grad_clip` (None: no clipping) and step the optimizer, unless the loss or
    the norm is non-finite; returns (gradient norm before clipping, whether the update was applied)."""
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    applied = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if applied:
        optimizer.step()
    return grad_norm, applied
