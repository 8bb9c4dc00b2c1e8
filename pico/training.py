"""One training step: forward/backward over this rank's micro-batches (captured or not), then the update."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pico.capture import capture
from pico.data import split_rows
from pico.distributed import all_reduce_mean, autocast, full_tensor, gather_rows, gradient_sync, unwrap
from pico.learning_dynamics import SplitDynamics

# Logits per chunk of the fused output layer + loss: 2^25 (128 MB in fp32), 667 tokens at vocab 50304.
LOSS_CHUNK_ELEMENTS = 2**25


def train_step(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    precision: str = "fp32",
    *,
    token_losses: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward/backward over micro-batches of token rows `(micro, T+1)`; returns the global-batch loss.

    The loss is the mean token cross-entropy over the global batch (every rank, every micro-batch; all
    hold the same number of tokens), so the synced gradient is that of the global-batch mean. Gradients
    are synchronised across ranks on the last micro-batch only. A collective under torch.distributed.
    With a list `token_losses`, each micro-batch's per-token cross-entropy (mb, T) float32 is appended to
    it, and the micro-batch's loss is their mean (the same forward, unreduced: no extra pass).
    """
    total = torch.zeros((), device=batches[0].device)
    for i, rows in enumerate(batches):
        inputs, labels = split_rows(rows)  # (mb, T) each
        with gradient_sync(model, i == len(batches) - 1), autocast(precision, inputs.device, model):
            if token_losses is None:
                loss = token_loss(model, inputs, labels) / len(batches)
            else:
                losses = token_loss(model, inputs, labels, reduction="none").view_as(labels)  # (mb, T)
                token_losses.append(losses.detach().float())
                loss = losses.mean() / len(batches)
        loss.backward()
        total += loss.detach()
    return all_reduce_mean(total)


def token_loss(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean next-token cross-entropy of a PicoDecoder (plain, DDP or FSDP2) on `inputs` (mb, T) vs `labels`
    (`reduction="none"`: per token, (mb·T,)).

    The output layer and the loss run fused and chunked over tokens (`chunked_cross_entropy`), so the
    (mb·T, V) logits never exist whole, unless a hook on the output layer (a capture of it) needs them.
    The fused output layer runs outside the wrapper's forward: DDP must not look for unused parameters
    (`find_unused_parameters`), which would count it unused.
    """
    head = unwrap(model).de_embedding_proj
    if head._forward_hooks or head._forward_pre_hooks:
        logits = model(inputs)  # (mb, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)
    with hidden_states(model):
        hidden = model(inputs)  # (mb, T, C)
    return chunked_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten(), reduction)


@contextlib.contextmanager
def hidden_states(model: torch.nn.Module):
    """Inside the block, `model(input_ids)` returns `PicoDecoder.hidden` (B, T, C) instead of the logits.

    The call still goes through the wrapper's `__call__`, so DDP's gradient-sync set-up and FSDP2's
    all-gather hooks run exactly as on the plain forward.
    """
    module = unwrap(model)
    module.forward = module.hidden
    try:
        yield
    finally:
        del module.forward


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, labels, reduction=reduction)` for hidden (N, C), weight (V, C),
    labels (N,), computed over chunks of LOSS_CHUNK_ELEMENTS logits by torch's fused `F.linear_cross_entropy`.

    Neither the (N, V) logits nor their gradient is materialised: with a reduction each chunk's gradients are
    computed in the forward and applied in the backward; with `reduction="none"` ((N,) losses) the backward
    recomputes them chunk by chunk. Under autocast the matmuls run in its dtype and the softmax accumulates
    in fp32, as the plain `logits.float()` path does.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    options = torch.nn.LinearCrossEntropyOptions(
        batch_chunk_size=max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0]),
        acc_policy="accurate",
        acc_dtype=torch.float32,
    )
    return F.linear_cross_entropy(hidden, weight, labels, reduction=reduction, options=options)


def captured_step(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    layers,
    *,
    positions: str = "last",
    precision: str = "fp32",
    input_ids: torch.Tensor | None = None,
    losses: bool = False,
):
    """`train_step` under capture: (loss, SplitDynamics of this forward/backward). A collective.

    `input_ids` (N, T+1) recorded with it default to the global batch gathered from every rank. With
    `losses`, it also records the per-token cross-entropy (N, T) of those rows, from the same forward.
    """
    ids = gather_rows(torch.cat(batches)).cpu() if input_ids is None else input_ids  # (B, T+1)
    per_token = [] if losses else None
    with capture(model, layers, positions) as cap:
        loss = train_step(model, batches, precision, token_losses=per_token)
        gradients = cap.gradients()  # before anything clips or zeroes them
    token_losses = gather_rows(torch.cat(per_token)).cpu() if losses else None  # (N, T)
    return loss, SplitDynamics(cap.activations(), gradients, ids, token_losses)


def recaptured_step(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    layers,
    *,
    positions: str = "last",
    precision: str = "fp32",
) -> SplitDynamics:
    """The train split of an update whose forward/backward has run already, for when capturing it is decided
    only after its loss was seen (a loss spike): `captured_step` again on the same micro-batches with the
    same weights, while the update's own gradients are set aside and then put back, so that the update is
    as without it. Random draws (dropout) are the caller's: it forks the RNG around the call (pico.spikes
    does, from the update's own state). A collective; at its peak it holds two sets of gradients."""
    params = list(model.parameters())
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    _, dynamics = captured_step(model, batches, layers, positions=positions, precision=precision)
    for p, grad in zip(params, kept):
        p.grad = grad
    return dynamics


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
