"""Checkpoint steps: DCP train state, the HF export and the learning dynamics of W_N, written atomically.

The layout is pico.run_dir's (docs/checkpoints.md); this module fills a step directory and reads one back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import pico.run_dir  # publish_step through the module: tests/recipes/kill_at.py replaces it to kill there
from pico.capture import module_name
from pico.config import load_model_config
from pico.distributed import agree_on_error, barrier, is_main, new_gloo_group, rank, unwrap
from pico.errors import PicoError
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.model.config import PicoDecoderConfig
from pico.model.hf import export_state, pico_config_from_llama, save_pretrained
from pico.run_dir import (
    CONFIG,
    EVAL,
    MODEL,
    STATE,
    RunDirError,
    checkpoints_dir,
    list_steps,
    model_config_file,
    new_step_dir,
    step_dir,
    step_name,
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


class CheckpointError(PicoError, ValueError):
    """A checkpoint that cannot be written or resumed from; the message names the step, file or rank."""

    kind = "run error"


class CheckpointWriter:
    """Writes checkpoint steps in the background, one at a time (docs/checkpoints.md, "Background writes").

    `save` blocks only while it copies the step's tensors to CPU: the DCP train state (staged by
    `dcp.async_save`) and the HF weights gathered to rank 0; the captured learning dynamics are CPU copies
    already. A background thread (and DCP's) writes the files; once every rank's are written, rank 0 fsyncs
    `step_<N>`, renames it and moves `latest`, so a kill at any moment leaves `latest` on the last complete
    step. `complete_write` waits for that write and ends it: call it before the next `save` and at the end;
    when any rank's part failed, every rank raises the same CheckpointError. Constructing the writer, `save`
    and `complete_write` are collectives. `on_published(N)` runs on rank 0 once step_<N> is complete (e.g.
    the Hub uploader's enqueue).
    """

    def __init__(
        self,
        run_dir,
        *,
        tokenizer: Path | None = None,
        export: bool = True,
        positions: str = "last",
        dtype: str = "float32",
        on_published: Callable[[int], None] | None = None,
    ):
        self.run_dir, self.tokenizer, self.export = run_dir, tokenizer, export
        self.positions, self.dtype, self.on_published = positions, dtype, on_published
        self._write_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pico-checkpoint")
        self._write_in_flight: tuple[int, Future] | None = None  # (step N, the background write of step_<N>)
        # NOTE: the writes' collectives (DCP's, and the agreements on their outcome) run on a gloo group of
        # their own, so that those of a background thread never interleave with training's.
        self._group = new_gloo_group()
        self._written: dict[int, float] = {}

    def save(self, ckpt: CheckpointStep, model: torch.nn.Module, optimizer) -> None:
        """Stage `step_<N>` (state/, model/ unless `export` is False, learning_dynamics/, eval.json) and write
        it in the background; the previous write must be complete (`complete_write`)."""
        if self._write_in_flight is not None:
            raise RuntimeError(
                f"CheckpointWriter.save({step_name(ckpt.step)}): the write of "
                f"{step_name(self._write_in_flight[0])} is in flight; call complete_write() first"
            )
        weights = export_weights(model) if self.export else None
        tmp = new_step_dir(self.run_dir, ckpt.step)
        # NOTE: rank 0 has just deleted and re-made `tmp`. Without this barrier another rank's DCP thread
        # could make `tmp/state` meanwhile, and its mkdir or rank 0's would fail (issue 22: a 4-rank run lost
        # its final checkpoint to FileNotFoundError .tmp_step_30/state).
        barrier()
        state = {"model": get_model_state_dict(model), "extra": copy.deepcopy(ckpt.train_state)}
        # Before the first update the optimizer has no state and none is saved: asking DCP for it would
        # run a zero-lr step that advances AdamW's step counter and so change the run.
        if optimizer.state:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        dcp_write = dcp.async_save(state, checkpoint_id=str(tmp / STATE), process_group=self._group)
        config = unwrap(model).config
        write = self._write_executor.submit(self._write, tmp, ckpt, weights, config, dcp_write)
        self._write_in_flight = ckpt.step, write

    def complete_write(self) -> None:
        """Wait for the write in flight (if any) and end it: then `step_<N>` is published, or every rank
        raises the same CheckpointError("step_<N>: background write failed on rank <r>: <error>")."""
        if self._write_in_flight is None:
            return
        (step, write), self._write_in_flight = self._write_in_flight, None
        seconds, error = write.result()
        # NOTE: every rank reaches this once its part is done, rank 0 once step N is published (or not): it is
        # the barrier that ends step N, and it tells every rank the same outcome (also of the publishing).
        error = agree_on_error(error, self._group)
        if error is not None:
            raise CheckpointError(f"{step_name(step)}: background write failed on {error}")
        self._written[step] = seconds

    def written(self) -> dict[int, float]:
        """{step: seconds its background write took} for the writes completed since the last call."""
        written, self._written = self._written, {}
        return written

    def _write(self, tmp: Path, ckpt: CheckpointStep, weights, config, dcp_write: Future):
        """The background part: this rank's files of `tmp`, then (rank 0, when every rank's are written)
        fsync, rename and `latest`. Returns (seconds, None or this rank's failure `rank <r>: <error>`)."""
        start = time.perf_counter()
        try:
            self._write_files(tmp, ckpt, weights, config)
            error = None
        except Exception as e:
            error = _failure(e)
        try:
            # NOTE: waited for also after a failure: DCP's collectives on the group end before ours start.
            dcp_write.result()  # on rank 0 also every other rank's shards: DCP writes its metadata last
        except (Exception, CheckpointException) as e:
            error = error or _failure(e)
        # NOTE: a collective: rank 0 publishes only a step that every rank has written all of.
        error = agree_on_error(error, self._group)
        if error is None and is_main():
            try:
                pico.run_dir.publish_step(checkpoints_dir(self.run_dir), tmp, ckpt.step)
                if self.on_published is not None:
                    self.on_published(ckpt.step)
            except Exception as e:
                error = _failure(e)
        return time.perf_counter() - start, error

    def _write_files(self, tmp: Path, ckpt: CheckpointStep, weights: dict | None, config) -> None:
        """This rank's files of `tmp` besides DCP's: model/, learning_dynamics/ and eval.json (rank 0)."""
        if weights is not None and is_main():
            save_pretrained(weights, config, tmp / MODEL, tokenizer=self.tokenizer)
        if ckpt.dynamics or ckpt.weights:
            write_learning_dynamics(
                tmp, ckpt.dynamics, ckpt.weights, step=ckpt.step, positions=self.positions, dtype=self.dtype
            )
        if ckpt.evals is not None and is_main():
            (tmp / EVAL).write_text(json.dumps({"step": ckpt.step, **ckpt.evals}, indent=2))


def _failure(e: BaseException) -> str:
    """`rank <r>: <type>: <first line>` of a write's error: this rank's, or for DCP's (which every rank
    gets) that of the first rank where it happened."""
    where, cause = _dcp_cause(e)
    return f"rank {rank() if where is None else where}: {_one_line(cause)}"


def _dcp_cause(e: BaseException) -> tuple[int | None, BaseException]:
    """(rank, error) of the first failing rank of DCP's CheckpointException; (None, e) for another error."""
    if isinstance(e, CheckpointException) and e.failures:
        return min(e.failures), e.failures[min(e.failures)][0]
    return None, e


def _one_line(e: BaseException) -> str:
    """`<type>: <first line of the message>` of an error."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def train_state(step: int, scheduler, stream) -> dict:
    """What resuming needs besides model and optimizer: the step, LR schedule, data position and RNG."""
    return {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": stream.state_dict(),
        "rng": rng_state(),
    }


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    stream,
    *,
    branch: bool = False,
) -> int:
    """Restore model, optimizer, schedule position, data position and RNG from `step_<N>/state`; returns N.

    The hyperparameters (lr, betas, weight decay, ...) stay those `optimizer` was built with, and the LR is
    the schedule's (`scheduler`'s LambdaLR) at step N, so that a run may change them. `branch`: a new run
    from another run's step, whose data may differ: the stream continues at the same sample position of this
    run's data. Before reading any tensor it checks that the state is complete and was trained with
    `model`'s config, raising CheckpointError naming the file (and the newest earlier complete step) or the
    differing fields.
    """
    path, number = Path(path), Path(path).name.removeprefix("step_")
    try:
        check_train_state(path / STATE)
    except CheckpointError as e:
        before = int(number) if number.isdigit() else None
        raise CheckpointError(f"{e}; {earlier_complete_step(path.parent.parent, before)}") from None
    check_model_config(path, unwrap(model).config)
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    extra = load_train_state(path / STATE, model, optimizer, train_state(0, scheduler, stream))
    scheduler.load_state_dict(extra["scheduler"])
    keep_hyperparameters(optimizer, scheduler, hyperparameters)
    data = {**stream.state_dict(), "samples": extra["data"]["samples"]} if branch else extra["data"]
    stream.load_state_dict(data)
    set_rng_state(extra["rng"])
    return extra["step"]


def keep_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, hyperparameters: list[dict]) -> None:
    """After loading a checkpoint: put back each param group's `hyperparameters` (what the config built),
    and set its LR to the schedule's at the loaded step, `initial_lr · lr_lambda(step)` as LambdaLR computes
    it (so a resume with unchanged config is bitwise unchanged)."""
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


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
    except RunDirError:  # no checkpoints at all
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
    exported = model_config_file(path)
    run_config = path / CONFIG if (path / CONFIG).is_file() else path.parent.parent / CONFIG
    try:
        if exported.is_file():
            return pico_config_from_llama(json.loads(exported.read_text()), str(exported)), exported
        if run_config.is_file():
            return load_model_config(run_config), run_config
    except ValueError as e:  # ConfigError, ModelError and json errors are ValueErrors
        source = exported if exported.is_file() else run_config
        raise CheckpointError(f"{source}: cannot read the model config ({e})") from None
    raise CheckpointError(
        f"{path}: no {exported.relative_to(path)} and no {run_config} to check the model against"
    )


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


def load_train_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> dict:
    """Load a `state/` dir (`CheckpointWriter`) into `model`/`optimizer` (any world size); return `extra`.

    `extra` is a template with the same keys as at save time (e.g. the freshly built objects' state dicts).
    A state that does not fit them (other shapes, damaged bytes) is a CheckpointError naming the file.
    """
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"model": get_model_state_dict(model), "extra": extra}
    if any(key.startswith("optim.") for key in saved):
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException, a BaseException: any rank's failure
        raise CheckpointError(f"{path}: cannot be loaded: {_one_line(_dcp_cause(e)[1])}") from None
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


def export_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights that the HF export holds (`pico.model.hf.export_state`) on rank 0's CPU, a copy
    that later updates leave alone (None on other ranks); `pico.model.hf.save_pretrained` writes them.

    A collective (FSDP2 gathers parameter by parameter, and so may `effective_weight()`). A model with
    modules the Llama layout cannot express is refused (ModelError naming the module).
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = export_state(unwrap(model), state, module_names=module_name)  # on every rank
    if not is_main():
        return None
    on_cpu = next(unwrap(model).parameters()).device.type == "cpu"  # then `state` holds the live tensors
    return {name: t.clone() for name, t in state.items()} if on_cpu else state
