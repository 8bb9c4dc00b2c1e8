"""Checkpoint steps: DCP train state, the HF export and the learning dynamics of W_N, written atomically.

The layout is pico.run_dir's (docs/checkpoints.md); this module fills a step directory and reads one back.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import pickle
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
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
from pico.distributed import (
    agree_on_error,
    barrier,
    gather_to_main,
    is_main,
    new_gloo_group,
    rank,
    unwrap,
    world_size,
)
from pico.errors import PicoError, exit_on
from pico.learning_dynamics import SplitDynamics, learning_dynamics_files
from pico.manifest import (
    HASH,
    HashingWriter,
    read_manifest,
    run_root,
    step_faults,
    verify_files,
    write_bytes,
    write_manifest,
    write_safetensors,
)
from pico.model.config import PicoDecoderConfig
from pico.model.hf import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_METADATA,
    export_state,
    model_files,
    pico_config_from_llama,
)
from pico.run_dir import (
    CHECKPOINTS,
    CONFIG,
    DYNAMICS,
    EVAL,
    MANIFEST,
    MODEL,
    STATE,
    TRAIN_STATE,
    CheckpointError,
    RunDirError,
    checkpoints_dir,
    dynamics_file,
    latest_checkpoint,
    list_steps,
    model_config_file,
    new_step_dir,
    step_dir,
    step_name,
)
from pico.state_reader import SafeLoadPlanner, StateReader, check_train_state, read_metadata

_SINGLE_PROCESS_WARNING = (  # what DCP says on every save and load without a process group
    r"torch\.distributed is disabled, unavailable or uninitialized, "
    r"assuming the intent is to (save|load) in a single process"
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
        # DCP holds only tensors; the rest of the train state goes to state/train_state.json (JSON).
        state, train = {"model": get_model_state_dict(model)}, copy.deepcopy(ckpt.train_state)
        # Before the first update the optimizer has no state and none is saved: asking DCP for it would
        # run a zero-lr step that advances AdamW's step counter and so change the run.
        if optimizer.state:
            optim = get_optimizer_state_dict(model, optimizer)
            state["optim"] = {"state": optim["state"]}
            train["param_groups"] = copy.deepcopy(optim["param_groups"])  # lr, betas, ...: numbers
        _ignore_single_process_warning()
        storage = HashingWriter(tmp / STATE)  # hashes DCP's files as it writes them, for the manifest
        dcp_write = dcp.async_save(state, storage_writer=storage, process_group=self._group)
        ckpt, config = dataclasses.replace(ckpt, train_state=train), unwrap(model).config
        write = self._write_executor.submit(self._write, tmp, ckpt, weights, config, (dcp_write, storage))
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

    def _write(
        self, tmp: Path, ckpt: CheckpointStep, weights, config, dcp_write: tuple[Future, HashingWriter]
    ):
        """The background part: this rank's files of `tmp`, then (rank 0, when every rank's are written)
        the manifest, fsync, rename and `latest`. Returns (seconds, None or this rank's failure
        `rank <r>: <error>`)."""
        start, (dcp_done, storage), digests = time.perf_counter(), dcp_write, {}
        try:
            digests = self._write_files(tmp, ckpt, weights, config)
            error = None
        except Exception as e:
            error = _failure(e, tmp)
        try:
            # NOTE: waited for also after a failure: DCP's collectives on the group end before ours start.
            dcp_done.result()  # on rank 0 also every other rank's shards: DCP writes its metadata last
        except (Exception, CheckpointException) as e:
            error = error or _failure(e, tmp)
        digests |= {path.relative_to(tmp).as_posix(): d for path, d in storage.digests().items()}
        # NOTE: collectives: rank 0 publishes only a step that every rank has written all of, and lists every
        # rank's files in its manifest.
        error = agree_on_error(error, self._group)
        every_rank = gather_to_main(digests, self._group)
        if error is None and is_main():
            try:
                write_manifest(tmp, {name: d for part in every_rank for name, d in part.items()})
                pico.run_dir.publish_step(checkpoints_dir(self.run_dir), tmp, ckpt.step)
                if self.on_published is not None:
                    self.on_published(ckpt.step)
            except Exception as e:
                error = _failure(e, tmp)
        # Every rank's part has ended (the agreement above): a failed step leaves nothing to fill the disk.
        if error is not None and is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        return time.perf_counter() - start, error

    def _write_files(self, tmp: Path, ckpt: CheckpointStep, weights: dict | None, config) -> dict:
        """This rank's files of `tmp` besides DCP's (rank 0: state/train_state.json, model/,
        learning_dynamics/ and eval.json); returns {path in the step: digest} of those written."""
        dynamics = {}
        if ckpt.dynamics or ckpt.weights:  # every rank checks the shapes
            dynamics = learning_dynamics_files(
                ckpt.dynamics, ckpt.weights, step=ckpt.step, positions=self.positions, dtype=self.dtype
            )
        if not is_main():
            return {}
        digests = {}  # path in the step -> digest of the bytes written

        def write(name: str, data: bytes) -> None:
            digests[name] = write_bytes(tmp / name, data)

        write(f"{STATE}/{TRAIN_STATE}", json.dumps(ckpt.train_state, indent=1).encode())
        for name, (tensors, metadata) in dynamics.items():
            path = dynamics_file(tmp, name)
            digests[path.relative_to(tmp).as_posix()] = write_safetensors(path, tensors, metadata)
        if weights is not None:
            tensors, files = model_files(weights, config, tokenizer=self.tokenizer)
            path = tmp / MODEL / WEIGHTS_FILE
            digests[f"{MODEL}/{WEIGHTS_FILE}"] = write_safetensors(path, tensors, WEIGHTS_METADATA)
            for name, data in files.items():
                write(f"{MODEL}/{name}", data)
        if ckpt.evals is not None:
            write(EVAL, json.dumps({"step": ckpt.step, **ckpt.evals}, indent=2).encode())
        return digests


def _failure(e: BaseException, tmp: Path) -> str:
    """`rank <r>: <type>: <first line>` of an error writing step dir `tmp`: this rank's, or for DCP's (which
    every rank gets) that of the first rank where it happened; a full disk is said as such, with a path."""
    where, cause = _dcp_cause(e)
    what = _one_line(cause)
    named = getattr(cause, "errno", None) == errno.ENOSPC and getattr(cause, "filename", None)
    # ENOSPC without the file; or, where the writer lost the errno (torch's zip writer: 'unexpected pos 704
    # vs 598'), a file system with less than 1 MiB left
    if not named and ("No space left on device" in what or _free_bytes(tmp) < 2**20):
        what = f"OSError: [Errno {errno.ENOSPC}] No space left on device: '{tmp}' ({what})"
    return f"rank {rank() if where is None else where}: {what}"


def _free_bytes(path: Path) -> float:
    """Bytes free for this process on the file system of `path` (inf when it cannot be asked)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


def _dcp_cause(e: BaseException) -> tuple[int | None, BaseException]:
    """(rank, error) of the first failing rank of DCP's CheckpointException; (None, e) for another error."""
    if isinstance(e, CheckpointException) and e.failures:
        return min(e.failures), e.failures[min(e.failures)][0]
    return None, e


def _one_line(e: BaseException) -> str:
    """`<type>: <first line of the message>` of an error."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _ignore_single_process_warning() -> None:
    """Without a process group (a 1-process run), ignore DCP's warning that it saves or loads in a single
    process: pico means it to. That warning alone (its text, from DCP's modules); for the whole process,
    as DCP's save warns from a thread of its own."""
    if world_size() == 1:
        dcp_modules = r"torch\.distributed\.checkpoint"
        warnings.filterwarnings("ignore", _SINGLE_PROCESS_WARNING, UserWarning, dcp_modules)


def train_state(step: int, scheduler, stream) -> dict:
    """What resuming needs besides model and optimizer, as JSON values: the step, LR schedule, data position
    and RNG (state/train_state.json)."""
    return {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": stream.state_dict(),
        "rng": rng_state(),
    }


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, stream
) -> int:
    """Restore model, optimizer, schedule, data position and RNG from `step_<N>/state`; returns N.

    Before reading any tensor it verifies the files it reads against the step's manifest, checks that the
    state is complete and was trained with `model`'s config, raising CheckpointError naming the file (and the
    newest earlier complete step) or the differing fields. A collective (rank 0 verifies the files).
    """
    path = Path(path)
    check_complete(path)
    check_model_config(path, unwrap(model).config)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    train = load_train_state(path / STATE, model, optimizer)
    try:
        scheduler.load_state_dict(train["scheduler"])
        _keep_config_settings(optimizer, scheduler, settings)
        stream.load_state_dict(train["data"])
        set_rng_state(train["rng"])
        return int(train["step"])
    except PicoError:  # e.g. the data changed: its own line
        raise
    except (
        KeyError,
        TypeError,
        AttributeError,
        ValueError,
        RuntimeError,
    ) as e:  # a train state of another shape
        raise CheckpointError(f"{path / STATE / TRAIN_STATE}: cannot be restored ({_one_line(e)})") from None


def _keep_config_settings(optimizer: torch.optim.Optimizer, scheduler, settings: list[dict]) -> None:
    """Put back the optimizer settings of this run's config (`settings`: each param group's, as built), which
    loading the state replaced with the checkpoint's, and set each group's LR to its base LR times the
    schedule's factor at the resumed step: a changed training.lr, betas, eps, weight_decay or schedule applies
    from that step on (docs/checkpoints.md). For an unchanged config this is the LR the step had."""
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def check_complete(path: Path) -> None:
    """Raise CheckpointError when step dir `path`'s files differ from its manifest (`verify_resume`) or its
    state is incomplete (`check_train_state`), naming the file and the newest earlier complete step. A
    collective."""
    number = path.name.removeprefix("step_")
    try:
        verify_resume(path)
        check_train_state(path / STATE)
    except CheckpointError as e:
        before = int(number) if number.isdigit() else None
        raise CheckpointError(f"{e}; {earlier_complete_step(path.parent.parent, before)}") from None


def saved_step(path) -> int:
    """The step N that step dir `path` resumes at, read alone (no tensor), for what must be checked before
    `load_checkpoint` (the run's data). Not verified here: `load_checkpoint` verifies the whole state. A
    collective for a state written before train_state.json (read through DCP)."""
    state = Path(path) / STATE
    if (state / TRAIN_STATE).is_file() or not (state / ".metadata").is_file():
        return read_train_state(state)["step"]
    extra = {"extra": _legacy_extra(read_metadata(state), state)}
    _ignore_single_process_warning()
    try:
        dcp.load(extra, storage_reader=StateReader(state), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException, a BaseException: any rank's failure
        raise CheckpointError(f"{state}: cannot read the step ({_one_line(_dcp_cause(e)[1])})") from None
    return int(extra["extra"]["step"])


def verify_resume(path: Path) -> None:
    """Verify what resuming from step dir `path` reads (state/, model/config.json) against its manifest,
    symlinks included (`pico.manifest.verify_files`): rank 0 hashes, every rank raises the same
    CheckpointError. A collective. A step written before manifests is not verified."""
    error = None
    if is_main():
        parts = [STATE] + ([f"{MODEL}/{CONFIG_FILE}"] if model_config_file(path).is_file() else [])
        try:
            verify_files(path, parts, root=run_root(path))
        except CheckpointError as e:
            error = str(e)
    error = agree_on_error(error)  # NOTE: the other ranks wait here for rank 0's verdict
    if error is not None:
        raise CheckpointError(error)


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


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a `state/` dir (`CheckpointWriter`) into `model`/`optimizer` (any world size); return the rest
    of the train state (`train_state.json`, as `train_state` made it).

    Nothing is unpickled but with an allow-list (pico.state_reader). A state that does not fit (other
    shapes, damaged bytes, crafted objects) is a CheckpointError naming the file. A state written before
    train_state.json kept the rest in DCP: it is read from there, with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    metadata = read_metadata(path)
    legacy = not (path / TRAIN_STATE).is_file()
    state = {"model": get_model_state_dict(model)}
    if any(key.startswith("optim.") for key in metadata.state_dict_metadata):
        optim = get_optimizer_state_dict(model, optimizer)
        state["optim"] = optim if legacy else {"state": optim["state"]}
    if legacy:
        state["extra"] = _legacy_extra(metadata, path)
    _ignore_single_process_warning()
    try:
        dcp.load(state, storage_reader=StateReader(path), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException, a BaseException: any rank's failure
        cause = _dcp_cause(e)[1]
        if isinstance(cause, pickle.UnpicklingError):  # torch.load(weights_only=True) refused an item
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True): {_refusal(cause)} (a damaged, crafted or "
                "foreign checkpoint; pico does not run code from checkpoints)"
            ) from None
        raise CheckpointError(f"{path}: cannot be loaded: {_one_line(cause)}") from None
    train = _from_legacy(state.pop("extra")) if legacy else read_train_state(path)
    groups = train.pop("param_groups", None)
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        if not legacy:
            state["optim"]["param_groups"] = _param_groups(groups, optimizer, path / TRAIN_STATE)
        try:
            set_optimizer_state_dict(model, optimizer, state["optim"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit ({_one_line(e)})") from None
    return train


def _refusal(e: pickle.UnpicklingError) -> str:
    """Why torch.load(weights_only=True) refused, without its advice to load with weights_only=False."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(boilerplate)), "not plain tensors and numbers")


def read_train_state(path: Path) -> dict:
    """`state/train_state.json` of DCP dir `path`; not a JSON object with an integer `step` is a
    CheckpointError naming it."""
    file = Path(path) / TRAIN_STATE
    try:
        train = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({_one_line(e)})") from None
    if not isinstance(train, dict) or type(train.get("step")) is not int:
        raise CheckpointError(f"{file}: not a pico train state (a JSON object with an integer step)")
    return train


def _param_groups(saved, optimizer: torch.optim.Optimizer, file: Path) -> list[dict]:
    """The saved optimizer param groups (fqn params), with tuples (AdamW's betas) tuples again."""
    current = optimizer.param_groups
    if (
        not isinstance(saved, list)
        or len(saved) != len(current)
        or not all(isinstance(g, dict) for g in saved)
    ):
        raise CheckpointError(f"{file}: no param_groups for the optimizer's {len(current)} param group(s)")
    return [
        {
            k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
            for k, v in group.items()
        }
        for group, now in zip(saved, current)
    ]


def _legacy_extra(metadata, path: Path) -> dict:
    """What to load the `extra.*` entries of a state written before train_state.json into: a nested dict of
    their keys, with an empty tensor of the saved shape for each tensor (the RNG states)."""
    extra = {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys = (metadata.planner_data or {}).get(fqn)
        if not fqn.startswith("extra.") or not keys:
            continue
        node = extra
        for key in keys[1:-1]:
            node = node.setdefault(key, {})
        tensor = isinstance(md, TensorStorageMetadata)
        node[keys[-1]] = torch.empty(md.size, dtype=md.properties.dtype) if tensor else None
    if "step" not in extra:
        raise CheckpointError(f"{path}: no {TRAIN_STATE} and no extra.step (not a pico train state)")
    return extra


def _from_legacy(extra: dict) -> dict:
    """The train state of a state written before train_state.json, as `train_state` makes it now."""
    return {**extra, "rng": {name: _hex(t) for name, t in extra.get("rng", {}).items()}}


def _hex(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as a hex string."""
    return t.numpy().tobytes().hex()


def _from_hex(text: str) -> torch.Tensor:
    """The uint8 tensor of a hex string made by `_hex`."""
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


def rng_state() -> dict:
    """The RNG states that training consumes (torch CPU and, when present, CUDA), as hex strings."""
    state = {"torch": _hex(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _hex(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(_from_hex(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_from_hex(state["cuda"]))


def export_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights that the HF export holds (`pico.model.hf.export_state`) on rank 0's CPU, a copy
    that later updates leave alone (None on other ranks); the writer writes them as `model/`
    (`pico.model.hf.model_files`).

    A collective (FSDP2 gathers parameter by parameter, and so may `effective_weight()`). A model with
    modules the Llama layout cannot express is refused (ModelError naming the module).
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = export_state(unwrap(model), state, module_names=module_name)  # on every rank
    if not is_main():
        return None
    on_cpu = next(unwrap(model).parameters()).device.type == "cpu"  # then `state` holds the live tensors
    return {name: t.clone() for name, t in state.items()} if on_cpu else state


NO_MANIFEST = "no manifest.json (written before manifests): metadata and sizes checked, contents not verified"


def verify(path: Path, echo=print) -> list[str]:
    """Check every step of run dir `path` (its `latest` too), or step dir `path` alone (`step_faults`); print
    a line per sound step and return one line per problem, each naming its file."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        steps = [step_dir(path, n) for n in list_steps(path, require="")]  # every published step_<N>
        problems = []
        try:
            latest_checkpoint(path)
        except RunDirError as e:
            problems.append(str(e))
    elif any((path / part).exists() for part in (STATE, MODEL, DYNAMICS, MANIFEST)):
        steps, problems = [path], []
    else:
        raise RunDirError(
            f"{path}: neither a run directory (no {CHECKPOINTS}/) nor a checkpoint step directory"
        )
    for step in steps:
        found = step_faults(step)
        problems += found
        if not found:
            manifest = read_manifest(step)
            how = f"{len(manifest)} files verified ({HASH})" if manifest is not None else NO_MANIFEST
            echo(f"{step}: ok, {how}")
    return problems


def main(argv=None) -> None:
    """`python -m pico.checkpoint verify <run_dir|step_dir>`: verify checkpoint files against their manifests;
    exit 0 when every step is sound, 2 with one line per file at fault."""
    parser = argparse.ArgumentParser(prog="python -m pico.checkpoint", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="verify a run's steps (or one step)").add_argument("path")
    args = parser.parse_args(argv)
    with exit_on():
        problems = verify(Path(args.path))
    for problem in problems:
        sys.stderr.write(f"{CheckpointError.kind}: {problem}\n")
    sys.exit(2 if problems else 0)


if __name__ == "__main__":
    main()
