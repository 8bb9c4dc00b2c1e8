"""What recipes/maml.py adds to pretraining: the `maml:` config section, the classification head, episodes,
the functional inner loop and the hybrid (meta / next-token) training step (docs/case_studies.md).

First-order MAML with subset-masked LM tasks (Africa et al. 2025). Shapes: B sequences, T positions, C
d_model, K k_shot, N n_way, V vocab_size, H head_hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from pico.capture import capture
from pico.config import Config, ConfigError
from pico.data import split_rows
from pico.distributed import all_reduce_mean, all_reduce_sum, autocast, gather_rows, gradient_sync
from pico.learning_dynamics import SplitDynamics
from pico.model import PicoDecoder
from pico.training import chunked_cross_entropy

DRAW, EPISODE = 0, 1  # the streams of random numbers derived from (training.seed, step)
# What maml_step sums over a step's micro-batches and ranks: branch counts, the adapted head's support and
# query loss sums, correct and kept counts, then the episodes' counts (Episode.counts).
STATS = (
    "meta",
    "lm",
    "support_loss",
    "support_correct",
    "support_n",
    "query_loss",
    "query_correct",
    "query_n",
    "support_items",
    "queries",
    "classes",
    "classes_no_support",
    "classes_one_shot",
    "no_query",
)


@dataclass
class MamlConfig:
    """The `maml:` section: how often a micro-batch is a meta step, the episodes and the inner loop."""

    # The keys a resumed run may change (pico.config.resume_changes): not the head's shape, which the
    # checkpoint holds, nor mask_token, the id the model has learnt as the mask.
    changeable_on_resume: ClassVar = ("hybrid_ratio", "k_shot", "n_way", "inner_steps", "inner_lr")

    hybrid_ratio: float = 0.5
    k_shot: int = 4
    n_way: int = 32
    inner_steps: int = 10
    inner_lr: float = 0.01
    head_layers: int = 4
    head_hidden: int = 128
    mask_token: int | None = None  # null: model.vocab_size - 1, which the tokenizer must not use

    def __post_init__(self):
        if not 0 <= self.hybrid_ratio <= 1:
            raise ConfigError(f"maml.hybrid_ratio: must be in [0, 1], got {self.hybrid_ratio}")
        for key in ("k_shot", "n_way", "head_layers", "head_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"maml.{key}: must be positive, got {getattr(self, key)}")
        if self.inner_steps < 0 or self.inner_lr < 0:
            raise ConfigError(
                f"maml.inner_steps, maml.inner_lr: must be >= 0, got {self.inner_steps}, {self.inner_lr}"
            )


@dataclass
class MamlRunConfig(Config):
    """pico's Config with the `maml:` section."""

    maml: MamlConfig = field(default_factory=MamlConfig)


def mask_token_id(cfg: MamlRunConfig, tokenizer_size: int | None) -> int:
    """The mask token id, after checking the `maml:` section against the model, data and tokenizer."""
    m, vocab = cfg.maml, cfg.model_config().vocab_size
    mask = vocab - 1 if m.mask_token is None else m.mask_token
    if not 0 <= mask < vocab:
        raise ConfigError(f"maml.mask_token: {mask} is not an id of the model's vocabulary [0, {vocab})")
    if tokenizer_size is not None and mask < tokenizer_size:
        raise ConfigError(
            f"maml.mask_token: {mask} is a token of the tokenizer ({tokenizer_size} tokens); "
            f"use an id in [{tokenizer_size}, {vocab}) or raise model.vocab_size"
        )
    if m.n_way > vocab - 1:
        raise ConfigError(f"maml.n_way: {m.n_way} classes exceed the {vocab - 1} token ids besides the mask")
    if cfg.data.seq_len < m.k_shot + 2:
        raise ConfigError(
            f"maml.k_shot: {m.k_shot} + 1 masked positions do not fit data.seq_len={cfg.data.seq_len}"
        )
    if cfg.training.seed < 0:
        raise ConfigError(f"training.seed: must be >= 0 for the episode draws, got {cfg.training.seed}")
    return mask


class Head(nn.Module):
    """MLP classifier on final hidden states: (n, C) -> (n, V) logits; ReLU between bias-free layers."""

    def __init__(self, d_model: int, hidden: int, n_layers: int, vocab_size: int):
        super().__init__()
        dims = [d_model] + [hidden] * (n_layers - 1) + [vocab_size]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(o, i)) for i, o in zip(dims, dims[1:]))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Xavier-uniform weights, as in the published head."""
        for w in self.weights:
            nn.init.xavier_uniform_(w)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(self.weights):
            h = F.linear(h, w)  # (n, H), and (n, V) at the last layer
            h = F.relu(h) if i < len(self.weights) - 1 else h
        return h

    def episode_weights(self, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weights by name (fp32), the last restricted to the rows of the N `classes`: logits (n, N)."""
        weights = {name: w.float() for name, w in self.named_parameters()}
        last = f"weights.{len(self.weights) - 1}"
        weights[last] = weights[last][classes]  # (N, H)
        return weights


class Episode(NamedTuple):
    """One meta micro-batch: K support and 1 query position per sequence, labels as class indices."""

    support_inputs: torch.Tensor  # (B, T) the K support positions masked
    support_pos: torch.Tensor  # (B, K)
    support_target: torch.Tensor  # (B, K) class index of the original token
    support_keep: torch.Tensor  # (B, K) whether that token is one of the N classes
    query_inputs: torch.Tensor  # (B, T) the query position masked
    query_pos: torch.Tensor  # (B,)
    query_target: torch.Tensor  # (B,)
    query_keep: torch.Tensor  # (B,)
    classes: torch.Tensor  # (N,) token ids

    def counts(self) -> torch.Tensor:
        """[support items, queries, classes, classes with no kept support item, classes with one, whether no
        query is kept] (float, on the episode's device): what `maml/*` logs about the episodes."""
        shots = torch.bincount(self.support_target[self.support_keep], minlength=len(self.classes))  # (N,)
        counts = [self.support_keep.numel(), len(self.query_keep), len(self.classes)]
        counts += [(shots == 0).sum(), (shots == 1).sum(), ~self.query_keep.any()]
        return torch.stack([torch.as_tensor(c, device=shots.device) for c in counts]).float()


def make_episode(
    rows: torch.Tensor, rng: np.random.Generator, k: int, n: int, vocab: int, mask: int
) -> Episode:
    """The episode of token rows (B, T+1): positions from 1..T-1 per sequence, N classes drawn from the
    support labels (random vocabulary ids fill up when fewer), items whose label is no class dropped."""
    ids = rows[:, :-1].cpu()  # (B, T)
    B, T = ids.shape
    pos = torch.from_numpy(np.argsort(rng.random((B, T - 1)), axis=1)[:, : k + 1] + 1)  # (B, K+1) distinct
    support_pos, query_pos = pos[:, :k], pos[:, k]
    support_labels, query_labels = ids.gather(1, support_pos), ids.gather(1, query_pos[:, None])[:, 0]
    present = np.unique(support_labels.numpy())
    if len(present) >= n:
        classes = rng.choice(present, n, replace=False)
    else:
        others = np.setdiff1d(np.arange(vocab), np.append(present, mask))
        classes = np.concatenate([present, rng.choice(others, n - len(present), replace=False)])
    classes = torch.from_numpy(classes).long()  # (N,)

    def target(labels):  # class index and whether the label is a class at all (else the item is dropped)
        match = labels[..., None] == classes  # (..., N)
        return match.int().argmax(-1), match.any(-1)

    support_inputs, query_inputs = ids.scatter(1, support_pos, mask), ids.scatter(1, query_pos[:, None], mask)
    episode = Episode(
        support_inputs,
        support_pos,
        *target(support_labels),
        query_inputs,
        query_pos,
        *target(query_labels),
        classes,
    )
    return Episode(*(t.to(rows.device) for t in episode))


def step_episodes(batches, m: MamlConfig, seed: int, step: int, rank: int, vocab: int, mask: int) -> list:
    """This rank's micro-batches' episodes, None for a next-token micro-batch. The meta/LM draw of micro-batch
    k derives from (seed, step, k) alone, so every rank takes the same branch and a resumed run the same
    draws; an episode from (seed, step, global micro-batch index)."""
    n = len(batches)
    meta = np.random.default_rng([seed, step, DRAW]).random(n) < m.hybrid_ratio
    return [
        make_episode(
            rows, np.random.default_rng([seed, step, EPISODE, rank * n + k]), m.k_shot, m.n_way, vocab, mask
        )
        if meta[k]
        else None
        for k, rows in enumerate(batches)
    ]


def masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor):
    """(mean cross-entropy over the kept items, their summed cross-entropy, correct count, count)."""
    keep = keep.float()
    ce = F.cross_entropy(logits, target, reduction="none") * keep  # (n,)
    n = keep.sum()
    correct = ((logits.argmax(-1) == target).float() * keep).sum()
    return ce.sum() / n.clamp(min=1), ce.sum().detach(), correct, n


def adapt(head: nn.Module, weights: dict, hs: torch.Tensor, target, keep, steps: int, lr: float) -> dict:
    """The fast weights: `steps` SGD steps on the support loss from (detached) `weights`; `hs` (n, C) fixed.

    Functional (torch.func): the head's parameters are never written and no gradient reaches them."""

    def support_loss(w):
        return masked_ce(functional_call(head, w, (hs,)), target, keep)[0]

    fast = {name: w.detach() for name, w in weights.items()}
    for _ in range(steps):
        grads = torch.func.grad(support_loss)(fast)
        fast = {name: w - lr * grads[name] for name, w in fast.items()}
    return fast


class MamlDecoder(PicoDecoder):
    """A PicoDecoder with the MAML head, a training-only module (in state/, not in the HF export).

    `model(ids)` are next-token logits; `model(inputs, labels=labels)` the mean next-token cross-entropy, the
    output layer fused with it in chunks (pico.training.chunked_cross_entropy); `model(support_inputs,
    episode=e)` the support hidden states (B, K, C); `model(query_inputs, episode=e, support=states)` the
    meta step's query loss and statistics. Everything runs inside forward, so DDP (which looks for unused
    parameters here) and FSDP2 see the output layer and the head like any other module."""

    training_only = ("head",)

    def __init__(self, config, m: MamlConfig):
        super().__init__(config)
        self.head = Head(config.d_model, m.head_hidden, m.head_layers, config.vocab_size)
        self.inner_steps, self.inner_lr = m.inner_steps, m.inner_lr

    def forward(self, input_ids, episode: Episode | None = None, support=None, labels=None, reduction="mean"):
        if labels is not None:
            return self.next_token_loss(input_ids, labels, reduction)
        if episode is None:
            return super().forward(input_ids)  # (B, T, V)
        h = self.hidden(input_ids)  # (B, T, C)
        rows = torch.arange(h.shape[0], device=h.device)
        if support is None:
            return h[rows[:, None], episode.support_pos]  # (B, K, C)
        return self.meta_loss(h[rows, episode.query_pos], support, episode)

    def next_token_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """Next-token cross-entropy on `input_ids` (B, T) against `labels` (B, T) (`reduction="none"`: per
        token, (B·T,)), fused and chunked as pretrain.py's (pico.training.token_loss: no (B·T, V) logits)
        unless a hook on the output layer (a capture of it) needs them."""
        h = self.hidden(input_ids)  # (B, T, C)
        out = self.de_embedding_proj
        if out._forward_hooks or out._forward_pre_hooks:
            logits = out(h).float().flatten(0, 1)  # (B·T, V)
            return F.cross_entropy(logits, labels.flatten(), reduction=reduction)
        return chunked_cross_entropy(h.flatten(0, 1), out.weight, labels.flatten(), reduction)

    def meta_loss(self, hq: torch.Tensor, support: torch.Tensor, e: Episode):
        """Query loss of the head adapted on the support set, and [support loss sum, correct, n, query ...].

        First order: the outer weights have the fast weights' values and pass the query gradient straight to
        the head's own weights, which never change; the backbone gets it through the query states `hq`."""
        with torch.autocast(hq.device.type, enabled=False):  # the inner loop in fp32
            base = self.head.episode_weights(e.classes)
            hs = support.detach().float().flatten(0, 1)  # (B·K, C)
            ys, ks = e.support_target.flatten(), e.support_keep.flatten()  # (B·K,) each
            fast = adapt(self.head, base, hs, ys, ks, self.inner_steps, self.inner_lr)
            outer = {name: w + (fast[name] - w).detach() for name, w in base.items()}
            loss, *query = masked_ce(
                functional_call(self.head, outer, (hq.float(),)), e.query_target, e.query_keep
            )
            with torch.no_grad():
                _, *adapted = masked_ce(functional_call(self.head, fast, (hs,)), ys, ks)
        return loss, torch.stack([*adapted, *query]).detach()


def maml_step(
    model, batches, episodes, precision: str = "fp32", layers=None, positions: str = "last", losses=False
):
    """pico.training.train_step with meta micro-batches: (global-batch loss, summed STATS, SplitDynamics of
    this forward/backward when `layers` are captured, else None). A collective under torch.distributed.

    Each micro-batch's loss (mean token cross-entropy, or mean query cross-entropy) is divided by the number
    of micro-batches and backpropagated; the step's loss is their mean over ranks and micro-batches. The
    support states come first, from no-grad forwards outside capture, which records the forwards that train.
    With `losses` (next-token micro-batches only: the eval split), the dynamics also hold the per-token
    cross-entropy (N, T), and each micro-batch's loss is its mean.
    """
    if losses and any(e is not None for e in episodes):
        raise ValueError("maml_step: per-token losses are those of next-token micro-batches, not of episodes")
    n = len(batches)
    with torch.no_grad():
        support = [
            None if e is None else _forward(model, e.support_inputs, precision, episode=e) for e in episodes
        ]
    ids = gather_rows(torch.cat(batches)).cpu() if layers else None  # (B, T+1)
    per_token = []
    with capture(model, layers, positions) if layers else contextlib.nullcontext() as cap:
        device = batches[0].device
        total, stats = torch.zeros((), device=device), torch.zeros(len(STATS), device=device)
        for i, (rows, e) in enumerate(zip(batches, episodes)):
            with gradient_sync(model, i == n - 1):
                if e is None:
                    inputs, labels = split_rows(rows)  # (mb, T) each
                    reduce = "none" if losses else "mean"
                    loss = _forward(model, inputs, precision, labels=labels, reduction=reduce)
                    if losses:  # per token (mb·T,): kept, and the micro-batch trains on their mean
                        per_token.append(loss.detach().float().view_as(labels))  # (mb, T)
                        loss = loss.mean()
                    stats[1] += 1
                else:
                    loss, s = _forward(model, e.query_inputs, precision, episode=e, support=support[i])
                    stats[0] += 1
                    stats[2:8] += s
                    stats[8:] += e.counts()
                (loss / n).backward()
            total += loss.detach() / n
        gradients = cap.gradients() if layers else None  # before anything clips or zeroes them
    token_losses = gather_rows(torch.cat(per_token)).cpu() if losses else None  # (N, T)
    dynamics = SplitDynamics(cap.activations(), gradients, ids, token_losses) if layers else None
    return all_reduce_mean(total), all_reduce_sum(stats), dynamics


def _forward(model, inputs, precision, **kwargs):
    with autocast(precision, inputs.device, model):
        return model(inputs, **kwargs)


def maml_scalars(stats: torch.Tensor) -> dict[str, float]:
    """The step's `maml/*` scalars from maml_step's STATS: branch counts, support and query loss/accuracy,
    and, with a meta micro-batch, what its episodes held (docs/case_studies.md, "Episode statistics")."""
    s = dict(zip(STATS, stats.tolist()))
    out = {"maml/meta_micro_batches": s["meta"], "maml/lm_micro_batches": s["lm"]}
    for part in ("support", "query"):
        if s[f"{part}_n"]:
            out[f"maml/{part}_loss"] = s[f"{part}_loss"] / s[f"{part}_n"]
            out[f"maml/{part}_accuracy"] = s[f"{part}_correct"] / s[f"{part}_n"]
    if s["meta"]:
        out["maml/queries_kept"] = s["query_n"] / s["queries"]
        out["maml/support_kept"] = s["support_n"] / s["support_items"]
        out["maml/shots_per_class"] = s["support_n"] / s["classes"]
        out["maml/classes_no_support"] = s["classes_no_support"] / s["classes"]
        out["maml/classes_one_shot"] = s["classes_one_shot"] / s["classes"]
        out["maml/meta_micro_batches_no_query"] = s["no_query"]
    return out
