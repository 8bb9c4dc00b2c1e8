"""One run directory, one run: the lock a live run holds, and what a run checks before it writes there.

docs/checkpoints.md ("One run per directory") says what each refusal means and how to get past it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
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
from pico.config import START_KEYS, Config, load_config, resume_changes, save_config
from pico.config_loader import load_tree
from pico.distributed import all_reduce_sum, is_main
from pico.errors import ConfigError
from pico.run_dir import (
    ANALYSIS,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    LOCK,
    RUN_RECORD,
    STATE,
    TENSORBOARD,
    RunDirError,
    checkpoints_dir,
    list_steps,
    resolve_resume,
    run_file,
    step_dir,
    step_name,
    step_number,
    write_atomic,
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
        if resume == "auto" and marker.exists() and not marker.is_file():
            raise RunDirError(f"{marker}: not a file (it names the newest complete step_<N>)")
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


def open_run_dir(
    run_dir, cfg: Config, device: torch.device, resume: str | None = None, *, recipe: str
) -> Path | None:
    """Lock `run_dir` and return the step dir to resume from (`resume`, default `checkpointing.resume`), or
    None for a new run, once checked: a resumed run must be one of `recipe` (run.json) and change only the
    settings that may change on resume (`pico.config.resume_changes`); a new run's
    `checkpointing.branch_from` must be a step it can start from (`check_branch_point`). Writes nothing but
    the lock; `start_run` writes once the checkpoint is loaded."""
    lock_run_dir(run_dir, device)
    path = resume_point(run_dir, resume or cfg.checkpointing.resume, cfg.checkpointing.overwrite)
    if path is None and cfg.checkpointing.branch_from is not None:
        check_branch_point(Path(cfg.checkpointing.branch_from), cfg)
    if path is not None:
        record = read_record(run_file(path, RUN_RECORD))
        sections = _sections(cfg)
        if record is not None and (record["recipe"], record["sections"]) != (recipe, sections):
            theirs = ", ".join(s for s in record["sections"] if s not in sections)
            raise RunDirError(
                f"{run_file(path, RUN_RECORD)}: a run of {record['recipe']}"
                f"{f' (config sections {theirs})' if theirs else ''}, which {recipe} cannot resume; resume "
                f"it with {record['recipe']}, or start a new run in another checkpointing.run_dir"
            )
        _changes(path, cfg)
    return path


def start_run(
    run_dir,
    cfg: Config,
    *,
    step: int,
    resumed_from: Path | None,
    recipe: str,
    branched_from: Path | None = None,
) -> dict[str, list]:
    """Start training at `step` in `run_dir` (a new run: `resumed_from` None; at step 0, or at the step of
    `branched_from`): rank 0 records the start in run.json (the recipe, its config sections, and per start
    its step, source and changed settings: against the run resumed, or the run branched from) and writes
    config.yaml; a new run with `checkpointing.overwrite` first deletes the earlier run's checkpoints,
    tensorboard logs and analyses. Returns the changed settings it recorded ({} on other ranks). A
    ConfigError when `training.max_steps` < `step`."""
    if step > cfg.training.max_steps:
        raise ConfigError(
            f"training.max_steps: {cfg.training.max_steps} is below step {step}, which the run resumes "
            f"from ({resumed_from}); raise it, or resume from an earlier step with checkpointing.resume"
        )
    if not is_main():
        return {}
    if resumed_from is None and cfg.checkpointing.overwrite:
        for name in (CHECKPOINTS, TENSORBOARD, ANALYSIS):
            shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
        (Path(run_dir) / RUN_RECORD).unlink(missing_ok=True)
    record = read_record(run_file(resumed_from, RUN_RECORD)) if resumed_from is not None else None
    record = record or {"recipe": recipe, "sections": _sections(cfg), "starts": []}
    source = resumed_from or branched_from
    if resumed_from is not None:
        changes = _changes(resumed_from, cfg)
    else:
        changes = branch_changes(branched_from, cfg) if branched_from is not None else {}
    start = {"step": step, "from": None if source is None else str(source), "changes": changes}
    record["starts"].append(start | ({"branched": True} if branched_from is not None else {}))
    save_config(cfg, Path(run_dir) / CONFIG)
    write_atomic(Path(run_dir) / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    return changes


def read_record(path: Path) -> dict | None:
    """A run.json (`start_run`), None when there is none (a run older than the record); RunDirError when
    it cannot be read."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        kinds = (type(record["recipe"]), type(record["sections"]), type(record["starts"]))
        if kinds != (str, list, list):
            raise TypeError(f"recipe, sections, starts are a {', '.join(k.__name__ for k in kinds)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: not a pico run record ({type(e).__name__}: {e})") from None
    return record


def _sections(cfg: Config) -> list[str]:
    """The config's sections, in their order (a fork's own last)."""
    return [f.name for f in dataclasses.fields(cfg)]


def _changes(path: Path, cfg: Config) -> dict[str, list]:
    """`resume_changes` against the config of the run of step dir `path`; {} when it has no config.yaml."""
    config = run_file(path, CONFIG)
    return resume_changes(load_tree(config), cfg, str(config)) if config.is_file() else {}


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


def branch_changes(path: Path, cfg: Config) -> dict[str, list]:
    """{`section.key`: [old, new]} of the keys whose values differ between the run that step dir `path`
    belongs to (its config.yaml) and `cfg` (where the run lives and what it starts from aside)."""
    parent_config = path.parent.parent / CONFIG
    if not parent_config.is_file():
        return {}
    try:  # with this pico's defaults for keys the parent's config.yaml predates
        parent = _flat(load_config(parent_config, cls=type(cfg)).to_dict())
    except ConfigError:
        parent = _flat(load_tree(parent_config))
    new = _flat(cfg.to_dict())
    return {
        key: [parent.get(key), value]
        for key, value in new.items()
        if key not in START_KEYS and parent.get(key) != value
    }


def changes_line(changes: dict[str, list]) -> str:
    """`key old → new, ...` of `changes` ({key: [old, new]}, as `start_run` returns), or "nothing"."""
    return ", ".join(f"{key} {old} → {new}" for key, (old, new) in changes.items()) or "nothing"


def _flat(tree: dict, prefix: str = "") -> dict:
    """`{"section.key": value}` of a nested mapping (lists are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
