"""Run-directory checkpoints (DESIGN contract 3): atomic step dirs, DCP train state, HF export, `latest`, resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from pico.distributed import barrier

CHECKPOINTS = "checkpoints"
LATEST = "latest"
# Crash-safety test hook: "<step>:writing" SIGKILLs rank 0 once step_<step>'s files are written but before
# it is renamed and named `latest` (the worst moment); "<step>:done" right after `latest` names it.
KILL_ENV = "PICO_KILL_AT_CHECKPOINT"


def _maybe_kill(step: int, phase: str) -> None:
    if os.environ.get(KILL_ENV) == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def step_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer updates."""
    return f"step_{step}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint named by `<run_dir>/checkpoints/latest`, or None."""
    marker = Path(run_dir) / CHECKPOINTS / LATEST
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"{marker}: names {path.name}, which has no state/ directory")
    return path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """Map `checkpointing.resume` (auto | never | <path>) to the checkpoint dir to load, or None."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"checkpointing.resume: {path} is not a checkpoint directory (no state/ inside)")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see either the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def checkpoint_writer(run_dir: str | Path, step: int, is_main: bool):
    """Yield a temporary step dir to fill; on success rename it to `step_<N>` and point `latest` at it.

    All ranks enter and leave together. If the block raises (or the process dies) the temporary dir is
    left behind unnamed and `latest` still names the previous complete checkpoint.
    """
    root = Path(run_dir) / CHECKPOINTS
    tmp = root / f".tmp_{step_name(step)}"
    final = root / step_name(step)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    yield tmp
    barrier()
    if is_main:
        _maybe_kill(step, "writing")
        if final.exists():  # a re-run of a step whose checkpoint was written but never named `latest`
            old = root / f".old_{step_name(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, step_name(step) + "\n")
        _maybe_kill(step, "done")
    barrier()


def save_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Save model, optimizer and `extra` (scheduler, data position, RNG, step) with DCP; reshardable.

    Before the first update the optimizer has no state yet and none is saved: asking DCP for it would
    run a zero-lr step that advances AdamW's step counter and so change the run.
    """
    state = {"model": get_model_state_dict(model), "extra": extra}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> dict:
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


def export_model(path: Path, model: torch.nn.Module, model_config, tokenizer: Path | None, is_main: bool) -> None:
    """Write an HF-loadable `model/` dir: gather full weights to rank 0's CPU (one copy) and save them there."""
    from pico.model.hf import save_pretrained

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    save_pretrained(state, model_config, path)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path, model_config.max_seq_len)


def copy_tokenizer(tokenizer: Path, path: Path, max_len: int) -> None:
    """Copy `tokenizer.json` next to the weights with a `tokenizer_config.json` so AutoTokenizer loads it;
    its first special token becomes the EOS token, also in the model's `config.json` (for `generate`)."""
    shutil.copy(tokenizer, path / "tokenizer.json")
    special = [t for t in json.loads(Path(tokenizer).read_text()).get("added_tokens", []) if t["special"]]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if special:
        config["eos_token"] = special[0]["content"]
        model_config = json.loads((path / "config.json").read_text())
        model_config["eos_token_id"] = model_config["bos_token_id"] = special[0]["id"]
        (path / "config.json").write_text(json.dumps(model_config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
