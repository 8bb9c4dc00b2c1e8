"""Checkpoint steps: DCP train state, the HF export and the learning dynamics of W_N, written atomically.

The layout is pico.run_dir's (docs/checkpoints.md); this module fills a step directory and reads one back.
"""

from __future__ import annotations

import dataclasses
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

from pico.config import load_config
from pico.distributed import is_main, unwrap
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.model.config import PicoDecoderConfig
from pico.run_dir import (
    CONFIG,
    EVAL,
    MODEL,
    STATE,
    checkpoints_dir,
    list_steps,
    step_dir,
    step_name,
    step_writer,
)


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the step directory and file."""


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, stream
) -> int:
    """Restore model, optimizer, schedule, data position and RNG from `step_<N>/state`; returns N.

    Before reading any tensor it checks that the state is complete and was trained with `model`'s config,
    raising CheckpointError naming the file (and the newest earlier complete step) or the differing fields.
    """
    path, number = Path(path), Path(path).name.removeprefix("step_")
    try:
        check_train_state(path / STATE)
    except CheckpointError as e:
        before = int(number) if number.isdigit() else None
        raise CheckpointError(f"{e}; {earlier_complete_step(path.parent.parent, before)}") from None
    check_model_config(path, unwrap(model).config)
    extra = load_train_state(path / STATE, model, optimizer, train_state(0, scheduler, stream))
    scheduler.load_state_dict(extra["scheduler"])
    stream.load_state_dict(extra["data"])
    set_rng_state(extra["rng"])
    return extra["step"]


def check_train_state(path: Path) -> None:
    """Raise CheckpointError naming the file when DCP dir `path` has no readable `.metadata`, or a file it
    lists is missing or shorter than the metadata says (a deleted or truncated shard)."""
    metadata_file = path / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointError(f"{metadata_file}: missing")
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # a truncated or garbage pickle: any unpickling error
        raise CheckpointError(f"{metadata_file}: unreadable ({type(e).__name__})") from None
    sizes = {}  # file → the bytes its entries need
    for info in storage.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(sizes.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{shard}: truncated ({shard.stat().st_size} of {size} bytes)")


def earlier_complete_step(run_dir, before: int | None = None) -> str:
    """Say which step of `run_dir` (before step `before`) is the newest whose state is complete, e.g.
    `step_3 is complete (checkpointing.resume=<its path>)`, or that there is none."""
    try:
        steps = [n for n in list_steps(run_dir, require=STATE) if before is None or n < before]
    except ValueError:  # no checkpoints at all
        steps = []
    for step in reversed(steps):
        try:
            check_train_state(step_dir(run_dir, step) / STATE)
        except CheckpointError:
            continue
        return f"{step_name(step)} is complete (checkpointing.resume={step_dir(run_dir, step)})"
    return f"no {'earlier ' if before is not None else ''}complete step in {checkpoints_dir(run_dir)}"


def saved_model_config(path: Path) -> tuple[PicoDecoderConfig, Path]:
    """The model config step dir `path` was trained with, and the file it comes from: `model/config.json`,
    or the run's `config.yaml` when the step has no `model/` (a fork the Llama layout cannot express) —
    beside `state/` in a step downloaded from the Hub (docs/hub.md), else at the run's root."""
    from pico.model.hf import pico_config_from_llama

    exported = path / MODEL / "config.json"
    run_config = path / CONFIG if (path / CONFIG).is_file() else path.parent.parent / CONFIG
    try:
        if exported.is_file():
            return pico_config_from_llama(json.loads(exported.read_text()), str(exported)), exported
        if run_config.is_file():
            return load_config(run_config).model_config(), run_config
    except (ValueError, KeyError) as e:  # ConfigError and json errors are ValueErrors
        source = exported if exported.is_file() else run_config
        raise CheckpointError(f"{source}: cannot read the model config ({e})") from None
    raise CheckpointError(f"{path}: no {MODEL}/config.json and no {run_config} to check the model against")


def check_model_config(path: Path, config: PicoDecoderConfig) -> None:
    """Raise CheckpointError naming every field where step dir `path`'s model differs from `config`."""
    saved, source = saved_model_config(path)
    diff = [
        f"{f.name} {getattr(saved, f.name)} ≠ {getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diff:
        raise CheckpointError(
            f"{source}: the checkpoint's model differs from this run's model.*: {', '.join(diff)} "
            "(checkpoint ≠ requested); train a new model in another checkpointing.run_dir"
        )


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
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP wraps every rank's failure (bad bytes, wrong shapes) in its own exception
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{path}: cannot be loaded: {first.strip()}") from None
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
        export_state,
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
    state = export_state(unwrap(model), state)  # without the training-only modules
    save_pretrained(state, model_config, path, **(special_token_ids(tokenizer) if tokenizer else {}))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, model_config.max_seq_len)
