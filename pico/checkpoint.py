"""Checkpoint steps: DCP train state, the HF export and the learning dynamics of W_N, written atomically.

The layout is pico.run_dir's (docs/checkpoints.md); this module fills a step directory and reads one back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pico.distributed import is_main, unwrap
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.run_dir import EVAL, MODEL, STATE, step_writer


@dataclass
class CheckpointStep:
    """What a checkpoint step writes about W_N: the train state from before update N+1, learning dynamics
    per split (`train`, `eval`), the captured weights, evaluation results; empty parts are not written."""

    step: int
    train_state: dict
    dynamics: dict[str, SplitDynamics] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None
    evals: dict | None = None


def save_checkpoint(
    run_dir,
    ckpt: CheckpointStep,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Path | None = None,
    export: bool = True,
    positions: str = "last",
    dtype: str = "float32",
) -> None:
    """Write `step_<N>/` (state/, model/ unless `export` is False, learning_dynamics/, eval.json) atomically.

    A collective: every rank calls it. `latest` names the step only once all of it is on disk.
    """
    with step_writer(run_dir, ckpt.step) as path:
        save_train_state(path / STATE, model, optimizer, ckpt.train_state)
        if export:
            export_model(path / MODEL, model, unwrap(model).config, tokenizer)
        if ckpt.dynamics or ckpt.weights:
            write_learning_dynamics(
                path, ckpt.dynamics, ckpt.weights, step=ckpt.step, positions=positions, dtype=dtype
            )
        if ckpt.evals is not None and is_main():
            (path / EVAL).write_text(json.dumps({"step": ckpt.step, **ckpt.evals}, indent=2))


def train_state(step: int, scheduler, stream) -> dict:
    """What resuming needs besides model and optimizer: the step, LR schedule, data position and RNG."""
    return {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": stream.state_dict(),
        "rng": rng_state(),
    }


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, stream
) -> int:
    """Restore model, optimizer, schedule, data position and RNG from `step_<N>/state`; returns N."""
    extra = load_train_state(Path(path) / STATE, model, optimizer, train_state(0, scheduler, stream))
    scheduler.load_state_dict(extra["scheduler"])
    stream.load_state_dict(extra["data"])
    set_rng_state(extra["rng"])
    return extra["step"]


def save_train_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> None:
    """Save model, optimizer and `extra` (scheduler, data position, RNG, step) with DCP; reshardable.

    Before the first update the optimizer has no state yet and none is saved: asking DCP for it would
    run a zero-lr step that advances AdamW's step counter and so change the run.
    """
    state = {"model": get_model_state_dict(model), "extra": extra}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_train_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> dict:
    """Load a state saved by `save_train_state` into `model`/`optimizer` (any world size); return `extra`.

    `extra` is a template with the same keys as at save time (e.g. the freshly built objects' state dicts).
    """
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"model": get_model_state_dict(model), "extra": extra}
    if any(key.startswith("optim.") for key in saved):
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]


def rng_state() -> dict:
    """The RNG states that training consumes (torch CPU and, when present, CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_model(path: Path, model: torch.nn.Module, model_config, tokenizer: Path | None) -> None:
    """Write an HF-loadable `model/` dir: gather full weights to rank 0's CPU (one copy) and save them there.

    A model with modules the Llama layout cannot express is refused (ValueError naming the module); a module
    with an `effective_weight()` is written as the nn.Linear it computes (docs/model.md).
    """
    from pico.capture import module_name
    from pico.model.hf import (
        export_problem,
        save_pretrained,
        save_tokenizer,
        special_token_ids,
        with_effective_weights,
    )

    problem = export_problem(unwrap(model))
    if problem:
        raise ValueError(f"HF export: {problem}")

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    merged = {module_name(n): m for n, m in unwrap(model).named_modules() if hasattr(m, "effective_weight")}
    state = with_effective_weights(state, merged)  # e.g. a LoRA linear's W + s·B·A, on every rank
    if not is_main():
        return
    save_pretrained(state, model_config, path, **(special_token_ids(tokenizer) if tokenizer else {}))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, model_config.max_seq_len)
