"""Process-group set-up from the torchrun environment and `parallelize()`: the one place parallelism
is applied."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from pico.errors import ConfigError
from pico.lifecycle import die_with_parent


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device


def is_main() -> bool:
    """True on global rank 0 (or without a process group): the one convention for rank-0-only work.

    Files and logs are written by rank 0 alone; every function that writes asks this, never a flag.
    """
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Init the process group from torchrun's env (nccl on CUDA, gloo on CPU); a plain 1-process run
    needs none.

    A worker started by a launcher (LOCAL_RANK set) exits when the launcher dies (pico.lifecycle), so a
    killed torchrun leaves no orphans writing checkpoints; a plain `python` run is left alone (nohup).
    """
    if "LOCAL_RANK" in os.environ:
        die_with_parent()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, device)


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """The torch device that `name` (auto, cpu, cuda or cuda:N) means for this process; the one parser of
    device names. auto is cuda when torch sees a GPU, else cpu; cuda is this process's GPU: cuda:LOCAL_RANK
    under a launcher, else the current one. A bad name, or cuda without a GPU, raises a ConfigError that
    starts with `key` (the option or config key it came from)."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} asked for, but torch sees no CUDA GPU")
    if name == "cuda":
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank) if local_rank else torch.cuda.current_device())
    return torch.device(name)


def resolve_strategy(strategy: str, world_size: int, device: torch.device) -> str:
    """`auto` → `fsdp` on several GPUs, `ddp` otherwise; one process always runs unwrapped (`single`)."""
    if world_size == 1:
        return "single"
    if strategy == "auto":
        return "fsdp" if device.type == "cuda" else "ddp"
    return strategy


def parallelize(
    model: nn.Module,
    *,
    strategy: str,
    world_size: int,
    device: torch.device,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    ddp_options: dict | None = None,
) -> nn.Module:
    """Apply activation checkpointing, per-block compile, then DDP or FSDP2 (per block, then root).

    `model` must have its weights materialised on `device` and expose its blocks as `model.layers`.
    `ddp_options` are more keyword arguments of DistributedDataParallel (strategy ddp only), e.g.
    `{"find_unused_parameters": True}` for a model whose steps leave some parameters unused.
    Returns the model to train (a DDP wrapper for `ddp`, the same module otherwise).
    """
    strategy = resolve_strategy(strategy, world_size, device)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in model.layers:
            block.compile()
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, **(ddp_options or {}))
        if world_size > 2:  # at 2 ranks every element's sum is a + b, whatever its place in the bucket
            ddp.register_comm_hook(None, all_reduce_per_tensor)
        return ddp
    if strategy == "fsdp":
        mp = None
        if precision == "bf16-mixed":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for i, block in enumerate(model.layers):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if strategy != "single":
        raise ConfigError(f"training.strategy: unknown strategy {strategy!r} (expected auto, ddp or fsdp)")
    return model


def all_reduce_per_tensor(group, bucket):  # no annotations: DDP rejects the strings of __future__'s
    """DDP comm hook: a Future of the dist.GradBucket `bucket`'s buffer holding the mean over the ranks of
    `group` of each gradient in it, one all-reduce per gradient.

    NOTE: DDP's own hook all-reduces the whole bucket, and a ring all-reduce sums each element in an order
    set by its position in the bucket. DDP's first iteration buckets the parameters in their order, later
    ones in the order their gradients became ready, so at 3+ ranks update 1 rounds differently from the
    same update later in a run, and a resumed run (whose first update is an iteration 1) is not bitwise the
    uninterrupted one. Per gradient, the order depends on the gradient alone. Like DDP's default, it
    multiplies by 1/world size before the sum. `parallelize` registers it from 3 ranks on; it costs one
    collective per gradient instead of one per bucket (benchmarks/train_throughput.py --ddp-reduction).
    """
    buffer = bucket.buffer().mul_(1.0 / dist.get_world_size(group))  # (bucket numel,)
    grads = buffer.split([p.numel() for p in bucket.parameters()])  # views, one per gradient
    works = [dist.all_reduce(g, group=group, async_op=True).get_future() for g in grads]
    return torch.futures.collect_all(works).then(lambda _: buffer)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under any DDP wrapper (FSDP2 and compile keep the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter inside the block unless `enabled` (accumulation)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def autocast(precision: str, device: torch.device, model: nn.Module):
    """bf16 autocast for `bf16-mixed` unless FSDP2's MixedPrecisionPolicy already casts; else a no-op."""
    if precision == "bf16-mixed" and not isinstance(model, FSDPModule):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered weights after a no-grad forward (no backward will): else a block kept
    unsharded (reshard_after_forward=False) would run its next forward on weights from before
    optimizer.step."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) value of a plain tensor or an FSDP2 DTensor; a collective for DTensors."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (rows, ...) over all ranks in rank order; `x` itself in a single process.

    Ranks may hold different numbers of rows. `x` must live on the process group's device (CUDA for NCCL).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    rows = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(rows, torch.tensor([x.shape[0]], device=x.device))
    rows = [int(r) for r in rows]
    padded = x.new_zeros((max(rows), *x.shape[1:]))  # all_gather needs equal shapes
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op without a process group) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself without a process group)."""
    return all_reduce_sum(t) / world_size()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on any rank (a MAX all-reduce of one CPU int), `flag` itself
    without a process group. A collective on `group`: a gloo group (`new_gloo_group`), so that asking
    costs no device synchronisation."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def new_gloo_group():
    """A new gloo process group of all ranks (None without a process group): for collectives that run in a
    background thread beside training's, such as DCP's async_save. A collective."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def agree_on_error(error: str | None, group=None) -> str | None:
    """The first rank's `error` (in rank order; None: that rank had none), the same answer on every rank, or
    None when no rank had one. A collective on `group` (all ranks; default: the default group)."""
    if not dist.is_initialized():
        return error
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    return next((e for e in errors if e is not None), None)


def gather_to_main(obj, group=None) -> list | None:
    """Every rank's `obj` in rank order on rank 0, None on the others ([obj] without a process group). A
    collective on `group` (all ranks; default: the default group)."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(obj, objects, dst=0, group=group)
    return objects
