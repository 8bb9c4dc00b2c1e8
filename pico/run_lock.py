"""One run directory, one run: the lock a live run holds, and what a run checks before it writes there.

docs/checkpoints.md ("One run per directory") says what each refusal means and how to get past it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

import torch

from pico.checkpoint import (
    CheckpointError,
    check_model_config,
    check_train_state,
    earlier_complete_step,
)
from pico.config import Config, load_config, save_config
from pico.config_loader import ConfigError, load_tree
from pico.distributed import all_reduce_sum, is_main
from pico.run_dir import (
    ANALYSIS,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    LOCK,
    STATE,
    TENSORBOARD,
    RunDirError,
    checkpoints_dir,
    list_steps,
    resolve_resume,
    step_dir,
    step_name,
    step_number,
)

_held = {}  # lock path → its open file, for this process's lifetime: the OS releases it however it ends


def lock_run_dir(run_dir, device: torch.device) -> None:
    """Hold `<run_dir>/run.lock` (fcntl.flock, on rank 0) until this process exits; a collective.

    Every rank raises RunDirError naming the holder's host and pid when another live process holds it.
    A killed holder leaves no stale lock: the kernel drops a flock with its last open file.
    """
    path, busy = Path(run_dir).resolve() / LOCK, 0
    if is_main() and path not in _held:  # a second call in the holding process holds it already
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as e:
            raise RunDirError(f"{path}: cannot create the lock file ({e.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            busy = 1
        else:
            handle.truncate(0)
            handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            handle.flush()
            _held[path] = handle
    # NOTE: a collective that every rank waits in until rank 0 has tried the lock: all learn its answer.
    if all_reduce_sum(torch.tensor([busy], device=device)).item():
        try:  # the holder wrote "<host> <pid>"; a rank on a node that does not share the file reads none
            host, _, pid = path.read_text().strip().partition(" ")
        except OSError:
            host = pid = ""
        holder = f"pid {pid} on host {host}" if pid else "another process"
        raise RunDirError(
            f"{run_dir}: in use by a live run ({holder} holds {path}); wait for it to end, or set "
            "another checkpointing.run_dir"
        )


def resume_point(run_dir, resume: str, overwrite: bool = False) -> Path | None:
    """The step dir this run resumes from (`checkpointing.resume`), or None for a new run.

    Raises RunDirError when `latest` or `resume` names no checkpoint (saying which complete step there is),
    and when a new run (`resume: never`) would mix with checkpoints already there, unless `overwrite`.
    """
    marker = checkpoints_dir(run_dir) / LATEST
    try:
        if resume == "auto" and marker.is_file() and not marker.read_text().strip():
            raise RunDirError(f"{marker}: empty")
        path = resolve_resume(run_dir, resume)
    except RunDirError as e:
        if step_number(resume) is not None and Path(resume).is_dir():  # a step whose state/ is gone
            raise RunDirError(without_state(Path(resume), "checkpointing.resume")) from None
        named = Path(resume).parent.parent if Path(resume).parent.name == CHECKPOINTS else run_dir
        raise RunDirError(f"{e}; {earlier_complete_step(named)}") from None
    old = [p.name for p in checkpoints_dir(run_dir).glob("*")] if resume == "never" else []
    if old and not overwrite:
        raise RunDirError(
            f"{checkpoints_dir(run_dir)}: holds checkpoints of an earlier run ({', '.join(sorted(old)[:3])}"
            f"{', ...' if len(old) > 3 else ''}) and checkpointing.resume=never; resume it with "
            "checkpointing.resume=auto, or delete them with checkpointing.overwrite=true"
        )
    return path


def open_run_dir(run_dir, cfg: Config, device: torch.device, resume: str | None = None) -> Path | None:
    """Lock `run_dir` and return the step dir to resume from (`resume`, default `checkpointing.resume`);
    for a new run (None), `checkpointing.branch_from` (when set) is checked as the step it starts from, rank
    0 deletes the earlier run's checkpoints, tensorboard logs and analyses when `checkpointing.overwrite` is
    set, then writes `config.yaml`: after every check, so that a refused run changes nothing there."""
    lock_run_dir(run_dir, device)
    path = resume_point(run_dir, resume or cfg.checkpointing.resume, cfg.checkpointing.overwrite)
    if path is None and cfg.checkpointing.branch_from is not None:
        check_branch_point(Path(cfg.checkpointing.branch_from), cfg)
    if path is None and is_main():
        if cfg.checkpointing.overwrite:
            for name in (CHECKPOINTS, TENSORBOARD, ANALYSIS):
                shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
        save_config(cfg, Path(run_dir) / CONFIG)
    return path


def without_state(path: Path, key: str) -> str:
    """The one line for starting from step dir `path` that holds no `state/`, naming the nearest step that
    has a complete one."""
    nearest = nearest_complete_step(path.parent.parent, step_number(path))
    return (
        f"{key}: {path} holds no {STATE}/ to start from (checkpointing.keep_state_last keeps it only in the "
        f"newest checkpoints); {nearest}"
    )


def nearest_complete_step(run_dir, step: int) -> str:
    """Say which step of `run_dir` nearest to `step` has a complete `state/`: `step_9 has the nearest
    complete state/ (checkpointing.resume=<its path>)`, or that none has."""
    try:
        steps = sorted(list_steps(run_dir, require=STATE), key=lambda s: (abs(s - step), -s))
    except RunDirError:  # no checkpoints at all
        steps = []
    for candidate in steps:
        try:
            check_train_state(step_dir(run_dir, candidate) / STATE)
        except CheckpointError:
            continue
        path = step_dir(run_dir, candidate)
        return f"{step_name(candidate)} has the nearest complete state/ (checkpointing.resume={path})"
    return f"no step in {checkpoints_dir(run_dir)} has a complete state/"


def check_branch_point(path: Path, cfg: Config) -> None:
    """`checkpointing.branch_from` is a step dir with a complete state/ of this config's model; else
    RunDirError or CheckpointError, one line naming the file (and the nearest step with state)."""
    if path.parent.name != CHECKPOINTS or step_number(path) is None or not path.is_dir():
        raise RunDirError(
            f"checkpointing.branch_from: {path} is not a step dir of a run (<run_dir>/checkpoints/step_<N>)"
        )
    if not (path / STATE).is_dir():
        raise RunDirError(without_state(path, "checkpointing.branch_from"))
    try:
        check_train_state(path / STATE)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; {nearest_complete_step(path.parent.parent, step_number(path))}"
        ) from None
    check_model_config(path, cfg.model_config())


def branch_changes(path: Path, cfg: Config) -> list[str]:
    """The keys whose values differ between the run that step dir `path` belongs to (its config.yaml) and
    `cfg`, as `section.key old → new` (where the run lives and what it resumes from aside)."""
    parent_config = path.parent.parent / CONFIG
    if not parent_config.is_file():
        return []
    try:  # with this pico's defaults for keys the parent's config.yaml predates
        parent = _flat(load_config(parent_config, cls=type(cfg)).to_dict())
    except ConfigError:
        parent = _flat(load_tree(parent_config))
    new = _flat(cfg.to_dict())
    skip = {
        "checkpointing.run_dir",
        "checkpointing.resume",
        "checkpointing.branch_from",
        "checkpointing.overwrite",
    }
    return [
        f"{key} {parent.get(key)} → {value}"
        for key, value in new.items()
        if key not in skip and parent.get(key) != value
    ]


def _flat(tree: dict, prefix: str = "") -> dict:
    """`{"section.key": value}` of a nested mapping (lists are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
