"""Hook capture of activations, gradients and weights: the learning dynamics of contract 3.

TransformerLens-style: hook names are module paths, and hooks live only inside `capture(...)`,
which always removes them. Activations are recorded on the forward passes that run inside the
context (the real training step; no extra pass), gradients are read from `.grad` after the last
backward, and every result is a full tensor on CPU in global sample order, whether the model is
plain, DDP-wrapped or FSDP2-sharded.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

import pico
from pico.distributed import unwrap
from pico.metrics import get_metric

DEFAULT_LAYERS = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
POSITIONS = ("last", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Path components that wrappers insert: torch.compile (OptimizedModule) and activation checkpointing.
# DDP's `module.` prefix is removed by unwrapping the DDP root instead (a user's model may own a `module`).
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def module_name(name: str) -> str:
    """A module path without wrapper parts: `layers.0._orig_mod.attention.v_proj` -> `layers.0.attention.v_proj`."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def find_modules(model: nn.Module, layers) -> dict[str, nn.Module]:
    """Modules of `model` whose clean names end with one of the suffixes `layers` (on dot boundaries)."""
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    root = unwrap(model)

    def matches(name, suffix):
        return name == suffix or name.endswith("." + suffix)

    found = {}
    for name, module in root.named_modules():
        clean = module_name(name)
        if any(matches(clean, suffix) for suffix in layers):
            found[clean] = module  # pre-order: a wrapper's inner module comes later and wins
    for suffix in layers:
        if not any(matches(name, suffix) for name in found):
            raise ValueError(f"learning_dynamics.layers: no module of {type(root).__name__} ends with {suffix!r} "
                             f"(module names look like {next(iter(_leaf_names(root)), '<none>')!r})")
    return found


def _leaf_names(root: nn.Module):
    """Clean names of the modules without children, for error messages."""
    return (module_name(n) for n, m in root.named_modules() if n and not list(m.children()))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) value of a plain tensor or an FSDP2 DTensor; a collective for DTensors."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _weight(name: str, module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name} ({type(module).__name__}) has no weight tensor to capture")
    return weight


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


class Capture:
    """What one `capture(...)` context recorded; read it with `activations()` and `gradients()`."""

    def __init__(self, modules: dict[str, nn.Module], positions: str):
        self.modules = modules
        self.positions = positions
        self.records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(self, name: str):
        """A forward hook that appends the module's detached output to `records[name]`."""
        def record(module, args, output):
            # Activation checkpointing re-runs forwards during backward; record the first run only
            # (same backward test as torch.utils.module_tracker and FSDP2).
            if torch._C._current_graph_task_id() != -1:
                return
            out = output.detach()  # (mb, T, out)
            if out.dim() != 3:
                raise ValueError(f"capture expects module outputs of shape (batch, seq, features); "
                                 f"{name} returned {tuple(out.shape)}")
            out = out[:, -1, :] if self.positions == "last" else out.reshape(-1, out.shape[-1])
            self.records[name].append(out.clone())  # (mb, out) or (mb·T, out)
        return record

    def activations(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Recorded outputs per module, `(N, out)` (or `(N·T, out)` for positions="all"), rows in global
        sample order (each rank's micro-batches in order, then ranks in rank order), on CPU.

        A collective under torch.distributed: call it on every rank.
        """
        result = {}
        for name, chunks in self.records.items():
            if not chunks:
                raise RuntimeError(
                    f"capture recorded no forward pass of {name}: run the model inside the `with capture(...)` "
                    "block; a torch.compile'd model ignores hooks added after compilation unless "
                    "torch._dynamo.config.skip_nnmodule_hook_guards = False was set before compiling")
            result[name] = gather_rows(torch.cat(chunks).to(dtype)).cpu()
        return result

    def gradients(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Weight gradients `(out, in)` of the captured modules as they are now in `.grad` (full tensors, CPU).

        Call after the last backward of the update and before clipping, `optimizer.step()` and
        `zero_grad()`. A collective under FSDP2: call it on every rank.
        """
        return _full_weights(self.modules, dtype, grad=True)


def _full_weights(modules: dict[str, nn.Module], dtype: torch.dtype, grad: bool) -> dict[str, torch.Tensor]:
    result = {}
    for name, module in modules.items():
        tensor = _weight(name, module)
        if grad:
            if tensor.grad is None:
                raise RuntimeError(f"{name}.weight has no gradient: read gradients after backward() "
                                   "and before zero_grad()")
            tensor = tensor.grad
        result[name] = _full(tensor.detach()).to("cpu", dtype, copy=True)  # (out, in), never a live view
    return result


@contextmanager
def capture(model: nn.Module, layers=DEFAULT_LAYERS, positions: str = "last"):
    """Record the outputs of the modules whose names end with one of `layers` on every forward pass
    inside the block (positions "last": `[:, -1, :]`, or "all"); hooks are removed on exit, also on error.

    Module names are reported without wrapper prefixes (DDP `module.`, `_orig_mod.`,
    `_checkpoint_wrapped_module.`), e.g. `layers.3.attention.v_proj`.
    """
    if positions not in POSITIONS:
        raise ValueError(f"learning_dynamics.positions={positions!r} is not one of {POSITIONS}")
    cap = Capture(find_modules(model, layers), positions)
    handles = []
    try:
        for name, module in cap.modules.items():
            handles.append(module.register_forward_hook(cap.hook(name)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()


def capture_weights(model: nn.Module, layers=DEFAULT_LAYERS,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full weights `(out, in)` of the modules whose names end with one of `layers`, on CPU.

    A collective under FSDP2: call it on every rank.
    """
    return _full_weights(find_modules(model, layers), dtype, grad=False)


def _check_split_tensors(split: str, tensors: dict, positions: str):
    unknown = set(tensors) - {"activations", "gradients", "weights", "input_ids"}
    if unknown:
        raise ValueError(f"learning dynamics tensors have unknown keys {sorted(unknown)}; "
                         "expected activations, gradients, input_ids and optionally weights")
    for key in ("activations", "gradients", "input_ids"):
        if key not in tensors:
            raise ValueError(f"learning dynamics for split {split!r} need {key!r}")
    ids = tensors["input_ids"]
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor (N, T+1) or (N, T), got {ids.dtype} {tuple(ids.shape)}")
    n, length = ids.shape
    allowed = {n} if positions == "last" else {n * length, n * (length - 1)}
    for name, t in tensors["activations"].items():
        if t.dim() != 2 or t.shape[0] not in allowed:
            raise ValueError(f"activations.{name} has shape {tuple(t.shape)}; with input_ids {tuple(ids.shape)} "
                             f"and positions={positions!r} it needs {sorted(allowed)} rows")
    for data_type in ("gradients", "weights"):
        for name, t in tensors.get(data_type, {}).items():
            if t.dim() != 2:
                raise ValueError(f"{data_type}.{name} must be (out_features, in_features), got {tuple(t.shape)}")


def write_learning_dynamics(directory, split: str, tensors: dict, *, step: int, positions: str = "last",
                            dtype: str = "float32", world_size: int | None = None) -> list[Path]:
    """Write `<split>.safetensors` (and `weights.safetensors` when `tensors` has weights) into `directory`.

    `tensors` = {"activations": {module: (N, out)}, "gradients": {module: (out, in)}, "input_ids": (N, T+1),
    optionally "weights": {module: (out, in)}}, as returned by `capture`/`capture_weights`. Float tensors are
    stored as `dtype` ("float32" or "bfloat16"), input_ids as int32. Only rank 0 writes; returns the paths
    written ([] on other ranks).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"learning dynamics split must be 'train' or 'eval', got {split!r}")
    if dtype not in DTYPES:
        raise ValueError(f"learning_dynamics.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if positions not in POSITIONS:
        raise ValueError(f"learning_dynamics.positions={positions!r} is not one of {POSITIONS}")
    _check_split_tensors(split, tensors, positions)
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def stored(t):
        return t.detach().to("cpu", DTYPES[dtype]).contiguous()

    def metadata(file_split):
        return {"step": str(step), "split": file_split, "positions": positions, "dtype": dtype,
                "world_size": str(world_size), "pico_version": pico.__version__}

    files = {split: {f"{kind}.{name}": stored(t) for kind in ("activations", "gradients")
                     for name, t in tensors[kind].items()}}
    files[split]["input_ids"] = tensors["input_ids"].detach().to("cpu", torch.int32).contiguous()  # (N, T+1)
    if "weights" in tensors:
        files["weights"] = {f"weights.{name}": stored(t) for name, t in tensors["weights"].items()}
    paths = []
    for name, data in files.items():  # metadata "split" is the file's name: train, eval or weights
        path = directory / f"{name}.safetensors"
        save_file(data, path, metadata=metadata(name))
        paths.append(path)
    return paths


def dynamics_scalars(tensors: dict, metrics: list[str], split: str) -> dict[str, float]:
    """In-situ metrics: each single-input metric on each captured tensor of the data types it suits
    (its `register_metric(data_types=...)`), tagged `dynamics/<metric>/<split>/<data_type>/<module>`."""
    chosen = [get_metric(name) for name in metrics]
    for metric in chosen:
        if metric.comparative:
            raise ValueError(f"learning_dynamics.metrics: {metric.name!r} compares two tensors; in-situ metrics "
                             "take one (per, condition_number, gini, hoyer, norm, ...); compare checkpoints "
                             "with pico.analysis")
    scalars = {}
    for metric in chosen:
        for data_type in metric.data_types:
            for module, t in tensors.get(data_type, {}).items():
                scalars[f"dynamics/{metric.name}/{split}/{data_type}/{module}"] = metric(t)
    return scalars
