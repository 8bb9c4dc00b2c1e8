"""Hook capture of activations, gradients and weights: the learning dynamics of docs/learning_dynamics.md.

TransformerLens-style: hook names are module paths, and hooks live only inside `capture(...)`,
which always removes them. Activations are recorded on the forward passes that run inside the
context (the real training step; no extra pass), gradients are read from `.grad` after the last
backward, and every result is a full tensor on CPU in global sample order, whether the model is
plain, DDP-wrapped or FSDP2-sharded. This module holds the hooks only: the collectives are in
pico.distributed and the file format in pico.learning_dynamics.
"""

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from pico.distributed import full_tensor, gather_rows, unwrap
from pico.errors import ConfigError
from pico.learning_dynamics import POSITIONS
from pico.run_dir import DEFAULT_LAYERS, module_matches

# Path components that wrappers insert: torch.compile (OptimizedModule) and activation checkpointing.
# DDP's `module.` prefix is removed by unwrapping the DDP root instead (a user's model may own a `module`).
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def module_name(name: str) -> str:
    """A module path without wrapper parts:
    `layers.0._orig_mod.attention.v_proj` -> `layers.0.attention.v_proj`."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def find_modules(model: nn.Module, layers) -> dict[str, nn.Module]:
    """Modules of `model` whose clean names end with one of the suffixes `layers` (on dot boundaries)."""
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    root = unwrap(model)
    found = {}
    for name, module in root.named_modules():
        clean = module_name(name)
        if any(module_matches(clean, suffix) for suffix in layers):
            found[clean] = module  # pre-order: a wrapper's inner module comes later and wins
    for suffix in layers:
        if not any(module_matches(name, suffix) for name in found):
            raise ConfigError(
                f"learning_dynamics.layers: no module of {type(root).__name__} ends with {suffix!r} "
                f"(module names look like {next(iter(_leaf_names(root)), '<none>')!r})"
            )
    return found


def _leaf_names(root: nn.Module):
    """Clean names of the modules without children, for error messages."""
    return (module_name(n) for n, m in root.named_modules() if n and not list(m.children()))


def _weight(name: str, module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(
            f"learning_dynamics.layers: module {name} ({type(module).__name__}) has no weight to capture"
        )
    return weight


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing re-runs forwards there).

    torch has no public API for this; torch.utils.module_tracker and FSDP2 use the same private call.
    """
    return torch._C._current_graph_task_id() != -1


def prepare_compile() -> None:
    """Make the hooks that capture() adds later reach compiled code; call before a model's first
    compiled forward.

    torch.compile skips guards on module hooks by default, so a block compiled before a hook was added
    would run without it. This makes dynamo guard on hooks (a global dynamo setting, which is why it is a
    call of its own): adding or removing capture's hooks then recompiles the block once per state.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False


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
            if _in_backward():
                return
            out = output.detach()  # (mb, T, out)
            if out.dim() != 3:
                raise ConfigError(
                    f"learning_dynamics.layers: capture expects module outputs of shape (batch, seq, "
                    f"features); {name} returned {tuple(out.shape)}"
                )
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
                    f"capture recorded no forward pass of {name}: run the model inside the "
                    "`with capture(...)` "
                    "block; a torch.compile'd model ignores hooks added after compilation unless "
                    "pico.capture.prepare_compile() ran before its first forward"
                )
            result[name] = gather_rows(torch.cat(chunks).to(dtype)).cpu()
        return result

    def gradients(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Weight gradients `(out, in)` of the captured modules as they are now in `.grad`
        (full tensors, CPU).

        Call after the last backward of the update and before clipping, `optimizer.step()` and
        `zero_grad()`. A collective under FSDP2: call it on every rank.
        """
        return _full_weights(self.modules, dtype, grad=True)


def _full_weights(modules: dict[str, nn.Module], dtype: torch.dtype, grad: bool) -> dict[str, torch.Tensor]:
    result = {}
    for name, module in modules.items():
        if hasattr(module, "effective_weight"):  # it computes with another weight than .weight
            tensor = module.effective_grad() if grad else module.effective_weight()
            result[name] = full_tensor(tensor.detach()).to("cpu", dtype, copy=True)  # (out, in)
            continue
        tensor = _weight(name, module)
        if grad:
            if tensor.grad is None:
                raise RuntimeError(
                    f"{name}.weight has no gradient: read gradients after backward() and before zero_grad()"
                )
            tensor = tensor.grad
        result[name] = full_tensor(tensor.detach()).to(
            "cpu", dtype, copy=True
        )  # (out, in), never a live view
    return result


@contextmanager
def capture(model: nn.Module, layers=DEFAULT_LAYERS, positions: str = "last"):
    """Record the outputs of the modules whose names end with one of `layers` on every forward pass
    inside the block (positions "last": `[:, -1, :]`, or "all"); hooks are removed on exit, also on error.

    Module names are reported without wrapper prefixes (DDP `module.`, `_orig_mod.`,
    `_checkpoint_wrapped_module.`), e.g. `layers.3.attention.v_proj`. A module that computes with an
    effective weight is captured through it (docs/learning_dynamics.md, "Modules with an effective weight").
    """
    if positions not in POSITIONS:
        raise ConfigError(f"learning_dynamics.positions={positions!r} is not one of {POSITIONS}")
    cap = Capture(find_modules(model, layers), positions)
    with ExitStack() as stack:
        for name, module in cap.modules.items():
            if hasattr(module, "track_effective_grad"):
                stack.enter_context(module.track_effective_grad())
            stack.callback(module.register_forward_hook(cap.hook(name)).remove)
        yield cap


def capture_weights(
    model: nn.Module, layers=DEFAULT_LAYERS, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Full weights `(out, in)` of the modules whose names end with one of `layers`, on CPU.

    A collective under FSDP2: call it on every rank.
    """
    return _full_weights(find_modules(model, layers), dtype, grad=False)


def check_capture(model: nn.Module, ld, world_size: int) -> None:
    """Check a `learning_dynamics:` section against the model before step 0: every layer suffix names a
    module with a weight and the eval batch splits evenly over the ranks; a one-line ConfigError names the
    key."""
    if not ld.enabled:
        return
    for name, module in find_modules(model, ld.layers).items():
        if not hasattr(module, "effective_weight"):
            _weight(name, module)
    if ld.eval_data and ld.eval_batch_size % world_size:
        raise ConfigError(
            f"learning_dynamics.eval_batch_size: {ld.eval_batch_size} is not divisible by "
            f"the world size {world_size}"
        )
