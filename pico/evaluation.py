"""Evaluation at checkpoints: perplexity on a pretokenized eval set, sharded across ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pico.distributed import all_reduce_sum, autocast, reshard


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches, device: torch.device, precision: str = "fp32") -> dict:
    """Token-level perplexity over `batches` of (inputs, labels), each rank feeding its own shard.

    Every rank must receive the same number of batches (FSDP gathers weights in each forward).
    Returns {"loss": mean nats/token, "perplexity": exp(loss), "tokens": tokens scored over all ranks}.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, token count)
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast(precision, device, model):
            logits = model(inputs)  # (B, T, V)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").double()
        totals[1] += labels.numel()
    reshard(model)
    all_reduce_sum(totals)
    if totals[1] == 0:
        raise ValueError("evaluation.data: no eval batches reached the model")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals[1].item())}
