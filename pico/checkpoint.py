"""Checkpoint steps: DCP train state, the HF export and the learning dynamics of W_N, written atomically.

The layout is pico.run_dir's (docs/checkpoints.md); this module fills a step directory and reads one back.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
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

import pico.run_dir
from pico.distributed import barrier, is_main, new_gloo_group, unwrap
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.run_dir import EVAL, MODEL, STATE, checkpoints_dir, new_step_dir


@dataclass
class CheckpointStep:
    """What a checkpoint step writes about W_N: the train state from before update N+1, learning dynamics
    per split (`train`, `eval`), the captured weights, evaluation results; empty parts are not written."""

    step: int
    train_state: dict
    dynamics: dict[str, SplitDynamics] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None
    evals: dict | None = None


class CheckpointWriter:
    """Writes checkpoint steps in the background, one at a time (docs/checkpoints.md, "Background writes").

    `save` blocks only while it copies the step's tensors to CPU: the DCP train state (staged by
    `dcp.async_save`) and the HF weights gathered to rank 0; the captured learning dynamics are CPU copies
    already. The files are written by a background thread (and DCP's), then rank 0 fsyncs `step_<N>`,
    renames it and moves `latest`. The next `save` and `wait` wait for that, so a kill at any moment leaves
    `latest` on the last complete step. A collective: every rank calls `save` and `wait`.
    """

    def __init__(
        self,
        run_dir,
        tokenizer: Path | None = None,
        export: bool = True,
        positions: str = "last",
        dtype: str = "float32",
    ):
        self.run_dir, self.tokenizer, self.export = run_dir, tokenizer, export
        self.positions, self.dtype = positions, dtype
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pico-checkpoint")
        self._pending: Future | None = None
        self._group = None  # DCP's collectives in the background get a gloo group of their own
        self._written: dict[int, float] = {}

    def save(self, ckpt: CheckpointStep, model: torch.nn.Module, optimizer, wait: bool = False) -> None:
        """Wait for the previous write, stage `step_<N>` (state/, model/ unless `export` is False,
        learning_dynamics/, eval.json) and write it in the background; `wait`: also wait for this one."""
        self.wait()
        tmp = new_step_dir(self.run_dir, ckpt.step)
        state = {"model": get_model_state_dict(model), "extra": copy.deepcopy(ckpt.train_state)}
        # Before the first update the optimizer has no state and none is saved: asking DCP for it would
        # run a zero-lr step that advances AdamW's step counter and so change the run.
        if optimizer.state:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        if self._group is None:
            self._group = new_gloo_group()
        upload = dcp.async_save(state, checkpoint_id=str(tmp / STATE), process_group=self._group)
        weights = export_weights(model) if self.export else None
        config = unwrap(model).config
        self._pending = self._thread.submit(self._write, tmp, ckpt, weights, config, upload)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight (if any) is published as `step_<N>`; re-raise its error."""
        if self._pending is not None:
            step, seconds = self._pending.result()
            self._pending = None
            self._written[step] = seconds
            barrier()

    def written(self) -> dict[int, float]:
        """{step: seconds its background write took} for the writes completed since the last call."""
        written, self._written = self._written, {}
        return written

    def _write(self, tmp: Path, ckpt: CheckpointStep, weights: dict | None, config, upload: Future):
        """The background part: every file of `tmp`, then (rank 0) fsync, rename and `latest`."""
        start = time.perf_counter()
        if weights is not None and is_main():
            save_model(tmp / MODEL, weights, config, self.tokenizer)
        if ckpt.dynamics or ckpt.weights:
            write_learning_dynamics(
                tmp, ckpt.dynamics, ckpt.weights, step=ckpt.step, positions=self.positions, dtype=self.dtype
            )
        if ckpt.evals is not None and is_main():
            (tmp / EVAL).write_text(json.dumps({"step": ckpt.step, **ckpt.evals}, indent=2))
        upload.result()  # on rank 0 also every other rank's shards: DCP writes its metadata last
        if is_main():
            pico.run_dir.publish_step(checkpoints_dir(self.run_dir), tmp, ckpt.step)
        return ckpt.step, time.perf_counter() - start


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


def load_train_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> dict:
    """Load a `state/` dir (`CheckpointWriter`) into `model`/`optimizer` (any world size); return `extra`.

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

    A model with modules the Llama layout cannot express is refused (ValueError naming the module).
    """
    weights = export_weights(model)
    if weights is not None:
        save_model(path, weights, model_config, tokenizer)


def export_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights on rank 0's CPU, a copy that later updates leave alone (None on other ranks).

    A collective (FSDP2 gathers parameter by parameter). A model with modules the Llama layout cannot
    express is refused (ValueError naming the module).
    """
    from pico.model.hf import export_problem

    problem = export_problem(unwrap(model))
    if problem:
        raise ValueError(f"HF export: {problem}")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    on_cpu = next(unwrap(model).parameters()).device.type == "cpu"  # then `state` holds the live tensors
    return {name: t.clone() for name, t in state.items()} if on_cpu else state


def save_model(path: Path, weights: dict[str, torch.Tensor], model_config, tokenizer: Path | None) -> None:
    """Write `weights` (from `export_weights`) as an HF-loadable `model/` dir, with the tokenizer if given."""
    from pico.model.hf import save_pretrained, save_tokenizer, special_token_ids

    save_pretrained(weights, model_config, path, **(special_token_ids(tokenizer) if tokenizer else {}))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, model_config.max_seq_len)
