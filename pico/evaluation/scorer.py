"""The one log-likelihood scorer behind every task: requests sorted by length, batched, split over ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pico.distributed import all_reduce_sum, autocast, reshard

TOKENS_PER_BATCH = 4096  # padded tokens per forward when a task sets no batch_size


def plan_batches(lengths: list[int], batch_size: int | None = None) -> list[list[int]]:
    """Request indices per batch: longest first, `batch_size` rows each (else TOKENS_PER_BATCH tokens).

    The plan depends on the requests only, so every world size scores each request in the same batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        rows = batch_size or max(1, TOKENS_PER_BATCH // lengths[order[start]])
        batches.append(order[start : start + rows])
        start += rows
    return batches


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    requests: list[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
    max_length: int,
    batch_size: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Summed log-likelihood of each request's continuation given its context, as HFLM computes it.

    A request is (context ids, continuation ids), 1 ≤ len(continuation) ≤ max_length; the model sees the last
    max_length + 1 tokens of context + continuation, minus the last. Batch b runs on rank b mod W; ranks
    without a batch in a round run a one-token dummy forward, so all run the same number of forwards (FSDP2
    gathers weights in each). Identical requests are scored once, so equal choices tie exactly (and the
    first wins an argmax, as in the harness). Returns a float64 CPU tensor (R,), the same on every rank.
    """
    first_of, windows, scored, index = {}, [], [], []  # unique requests, and each request's unique index
    for context, continuation in requests:
        window = np.concatenate([context, continuation])[-(max_length + 1) :]
        key = (window.tobytes(), len(continuation))
        if key not in first_of:
            first_of[key] = len(windows)
            windows.append(window)
            scored.append(len(continuation))
        index.append(first_of[key])
    batches = plan_batches([len(w) - 1 for w in windows], batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    scores = torch.zeros(len(windows), dtype=torch.float64, device=device)  # (U,) unique requests
    for first in range(0, len(batches), world):
        if first + rank >= len(batches):
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
            continue
        rows = batches[first + rank]
        width = len(windows[rows[0]]) - 1
        tokens = torch.zeros(len(rows), width + 1, dtype=torch.long)  # (B, T + 1), right-padded with 0
        mask = torch.zeros(
            len(rows), width, dtype=torch.bool
        )  # (B, T): positions predicting a continuation token
        for row, i in enumerate(rows):
            n = len(windows[i])
            tokens[row, :n] = torch.from_numpy(windows[i].astype(np.int64))
            mask[row, n - 1 - scored[i] : n - 1] = True
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(precision, device, model):
            logits = model(tokens[:, :-1])  # (B, T, V)
        picked = F.log_softmax(logits[mask].float(), dim=-1)  # (N, V): N scored positions
        token_ll = picked.gather(1, tokens[:, 1:][mask].unsqueeze(1)).squeeze(1)  # (N,)
        row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(mask)[mask]  # (N,)
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, row_of, token_ll.double()
        )
        scores[torch.tensor(rows, device=device)] = per_row  # (B,)
    reshard(model)
    return all_reduce_sum(scores).cpu()[index]  # (R,)
