"""ReLoRA's pieces for recipes/relora.py: the `relora:` config section, the LoRA linear, wrapping a model with
it, and the reset (merge, re-initialise, prune the optimizer state). docs/case_studies.md, "ReLoRA", explains
them.

Under FSDP2 every parameter and optimizer state is a DTensor sharded on dim 0. Elementwise work (B ← 0,
pruning a moment by a mask) is done on this rank's shard; what needs a whole tensor (B A, a magnitude
threshold, a seeded random tensor) is computed whole and this rank's rows are taken from it, so a run
gives the same numbers on any number of ranks.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from pico.config import Config, ConfigError
from pico.distributed import all_reduce_mean, full_tensor, unwrap
from pico.run_dir import module_matches


@dataclass
class ReLoRAConfig:
    """The `relora:` section: the LoRA factors, and when and how they are merged and reset."""

    # The keys a resumed run may change (pico.config.resume_changes): not r, alpha, target_modules or
    # trainable_scale, which make the model W + s·B·A that the checkpoint holds.
    changeable_on_resume: ClassVar = (
        "dropout",
        "reset_every",
        "restart_warmup_steps",
        "optimizer_reset",
        "prune_ratio",
    )

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    trainable_scale: bool = False
    reset_every: int = 2000
    restart_warmup_steps: int = 100
    optimizer_reset: Literal["random", "magnitude"] = "random"
    prune_ratio: float = 0.999
    target_modules: list[str] = field(
        default_factory=lambda: [f"attention.{p}_proj" for p in "qkvo"] + [f"swiglu.w_{i}" for i in range(3)]
    )

    def __post_init__(self):
        checks = {
            "r": (self.r >= 1, "positive"),
            "alpha": (self.alpha > 0, "positive"),
            "reset_every": (self.reset_every >= 1, "positive"),
            "restart_warmup_steps": (
                0 <= self.restart_warmup_steps <= self.reset_every,
                "in [0, relora.reset_every]",
            ),
            "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
            "prune_ratio": (0 <= self.prune_ratio <= 1, "in [0, 1]"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"relora.{key}: must be {expected}, got {getattr(self, key)}")
        if not self.target_modules:
            raise ConfigError("relora.target_modules: empty; train with recipes/pretrain.py for no LoRA")


@dataclass
class ReLoRARunConfig(Config):
    """pico's Config with the `relora:` section; ReLoRA's jagged cosine needs `training.schedule: cosine`."""

    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)

    def __post_init__(self):
        if self.training.schedule != "cosine":
            raise ConfigError(
                f"training.schedule: {self.training.schedule!r}; ReLoRA's jagged cosine needs 'cosine'"
            )


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the parameter), else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor `full`, laid out as `like` (a DTensor shard, or all of it)."""
    full = full.to(like.device)
    if isinstance(like, DTensor):  # every rank holds the same `full`: slice it, no communication
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


def _kaiming(shape, generator: torch.Generator) -> torch.Tensor:
    """A (r, in) LoRA A: Kaiming-uniform with a=√5 (nn.Linear's default init), on CPU from `generator`."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def reset_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of the reset at `step`: a function of seed and step alone, so that a resumed run
    draws the same A and pruning masks and the global RNG (dropout) is untouched."""
    return torch.Generator().manual_seed((seed << 32) + step)


class LoRALinear(nn.Module):
    """y = W x + s · B A dropout(x): a frozen full-rank W (out, in) plus a trainable rank-r update.

    A (r, in) starts Kaiming-uniform and B (out, r) at zero, so y = W x at first; s is alpha / r, or
    tanh of a trainable scalar. It keeps the name of the nn.Linear it replaces.
    """

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float, trainable_scale: bool):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)  # (out, in), fp32
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device))  # (out, r)
        self.lora_scale = nn.Parameter(torch.ones(1, device=weight.device)) if trainable_scale else None
        self.dropout = nn.Dropout(dropout)
        self.r, self.alpha = r, alpha
        self._probe = None  # (out, in) zeros while captured: its .grad is dL/dW_eff

    def scaling(self) -> torch.Tensor | float:
        """s: alpha / r, or tanh(lora_scale) when trainable (a collective under FSDP2 outside forward)."""
        return self.alpha / self.r if self.lora_scale is None else full_tensor(self.lora_scale).tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self._probe is None else self.weight + self._probe.to(self.weight.dtype)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, w) + self.scaling() * lora  # (..., out)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_eff = W + s · B A, whole (out, in): what capture records and the HF export writes."""
        return full_tensor(self.weight) + self.scaling() * (
            full_tensor(self.lora_B) @ full_tensor(self.lora_A)
        )

    def effective_grad(self) -> torch.Tensor:
        """dL/dW_eff of the backward passes run inside `track_effective_grad`, averaged over ranks like
        any gradient (a collective); with dropout it is dL/dW, the gradient of full-rank training."""
        if self._probe is None or self._probe.grad is None:
            raise RuntimeError("effective_grad: read it after backward() inside track_effective_grad()")
        return all_reduce_mean(self._probe.grad.clone())

    @contextmanager
    def track_effective_grad(self):
        """Inside the block, backward also computes dL/dW_eff: the forward adds a zero (out, in) leaf to W,
        whose gradient that is (y = (W + P) x + s·B A dropout(x), at P = 0). pico.capture enters it."""
        self._probe = torch.zeros(self.weight.shape, device=self.weight.device, requires_grad=True)
        try:
            yield
        finally:
            self._probe = None

    @torch.no_grad()
    def reinit(self, generator: torch.Generator) -> None:
        """A ← Kaiming-uniform from `generator`, B ← 0 and a trainable scale back at 1, as the published
        ReLoRA for pico does (a collective under FSDP2)."""
        _local(self.lora_A).copy_(_shard_of(_kaiming(self.lora_A.shape, generator), self.lora_A))
        _local(self.lora_B).zero_()
        if self.lora_scale is not None:
            _local(self.lora_scale).fill_(1.0)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s · B A in fp32 (a collective under FSDP2).

        FSDP2 shards W (out, in) and B (out, r) on their out dim alike, so this rank's rows of B A are its
        rows of B times the whole of A.
        """
        a, b = full_tensor(self.lora_A).float(), _local(self.lora_B).float()  # (r, in), (out_local, r)
        _local(self.weight).add_(self.scaling() * (b @ a))

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, r={self.r}, alpha={self.alpha}"


def wrap_lora(model: nn.Module, rl, seed: int) -> list[str]:
    """Replace every nn.Linear of `model` whose name ends with one of `rl.target_modules` by a LoRALinear
    holding its weight (A drawn from `seed`); returns their names. A target matching none is a ConfigError."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in rl.target_modules:
        if not any(module_matches(name, target) for name in names):
            raise ConfigError(
                f"relora.target_modules: no nn.Linear of {type(model).__name__} ends with {target!r} "
                f"(they look like {names[0]!r})"
            )
    wrapped = [n for n in names if any(module_matches(n, target) for target in rl.target_modules)]
    generator = reset_generator(seed, 0)
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        lora = LoRALinear(model.get_submodule(name).weight, rl.r, rl.alpha, rl.dropout, rl.trainable_scale)
        lora.reinit(generator)
        setattr(model.get_submodule(parent), child, lora)
    return wrapped


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """The LoRA linears of a (possibly DDP-wrapped) model, in module order."""
    return [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def prune_mask(state: torch.Tensor, ratio: float, how: str, generator: torch.Generator) -> torch.Tensor:
    """The whole bool keep-mask of an optimizer state tensor: `random` zeroes each entry with probability
    `ratio`; `magnitude` zeroes the `ratio` fraction of entries smallest in absolute value."""
    if how == "random":
        return torch.rand(state.shape, generator=generator) >= ratio
    magnitude = full_tensor(state).abs().flatten().cpu()
    k = int(ratio * magnitude.numel())
    if k == 0:
        return torch.ones(state.shape, dtype=torch.bool)
    return (magnitude > magnitude.kthvalue(k).values).view(state.shape)


@torch.no_grad()
def relora_reset(model: nn.Module, optimizer: torch.optim.Optimizer, rl, seed: int, step: int) -> float:
    """ReLoRA's reset at `step`: merge every LoRA linear (W ← W + s·B·A), re-initialise A, B (and a trainable
    scale), and prune Adam's moments of the A and B factors (other parameters' state, the scale's included,
    is untouched); returns the fraction of those moments zeroed. A collective: call it on every rank."""
    generator = reset_generator(seed, step)
    zeroed = total = 0
    for module in lora_modules(model):
        module.merge()
        module.reinit(generator)
        for param in (module.lora_A, module.lora_B):
            for key in ("exp_avg", "exp_avg_sq"):
                state = optimizer.state.get(param, {}).get(key)
                if state is None:  # no update yet, or an optimizer without this moment
                    continue
                keep = prune_mask(state, rl.prune_ratio, rl.optimizer_reset, generator)
                _local(state).mul_(_shard_of(keep, state))
                zeroed, total = zeroed + int((~keep).sum()), total + keep.numel()
    return zeroed / max(total, 1)
