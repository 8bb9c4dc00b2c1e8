"""The run directory: every path, step discovery, `latest`, and the learning-dynamics key format.

Writers (the recipe, pico.checkpoint, pico.learning_dynamics) and readers (pico.analysis) both go through
this module, so the layout is written down once. docs/checkpoints.md is its specification:

    <run_dir>/config.yaml, tensorboard/, checkpoints/{latest, step_<N>/{model/, state/,
    learning_dynamics/{train,eval,weights}.safetensors, eval.json}}, analysis/<name>/
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pico.distributed import is_main
from pico.errors import PicoError
from pico.model.hf import CONFIG_FILE

CONFIG = "config.yaml"
RUN_RECORD = "run.json"  # the recipe that trains the run, and each start's step and changed settings
LOCK = "run.lock"  # held by the live run (pico.run_lock)
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model"  # an HF model dir (pico.model.hf): config.json, model.safetensors, tokenizer files
STATE = "state"
TRAIN_STATE = "train_state.json"  # in state/: step, LR schedule, data position, RNG, optimizer param groups
MANIFEST = "manifest.json"  # in a step dir: every file's size and hash (pico.manifest)
DYNAMICS = "learning_dynamics"
EVAL = "eval.json"
ANALYSIS = "analysis"
SPLITS = (
    "train",
    "eval",
)  # learning-dynamics files of captured passes; weights.safetensors holds the weights
DATA_TYPES = ("activations", "gradients", "weights")
LOSSES = "losses"  # the key of a split's per-token cross-entropy (N, T), no module (the eval split's)
DEFAULT_LAYERS = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
_STEP = re.compile(r"step_(\d+)")


class RunDirError(PicoError, ValueError):
    """The run directory cannot be used as asked; the message names the directory, file or holder."""

    kind = "run error"


class CheckpointError(PicoError, ValueError):
    """A checkpoint that cannot be written, verified or resumed from; the message names the step, file or
    rank."""

    kind = "run error"


def step_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer updates."""
    return f"step_{step}"


def checkpoints_dir(run_dir) -> Path:
    """`<run_dir>/checkpoints`."""
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir, step: int) -> Path:
    """`<run_dir>/checkpoints/step_<step>`."""
    return checkpoints_dir(run_dir) / step_name(step)


def model_config_file(step_path) -> Path:
    """`<step_path>/model/config.json`: the exported model's HF config, also what a step was trained with."""
    return Path(step_path) / MODEL / CONFIG_FILE


def analysis_dir(run_dir, name: str) -> Path:
    """`<run_dir>/analysis/<name>`: the outputs of the analysis spec called `name`, a single folder name
    (RunDirError otherwise), so that an analysis writes nowhere else in the run."""
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise RunDirError(f"analysis name {name!r}: expected a folder name (letters, digits, _ . -)")
    return Path(run_dir) / ANALYSIS / name


def run_file(step_path, name: str) -> Path:
    """The file `name` (config.yaml, run.json) of the run that step dir `step_path` belongs to: beside its
    `state/` in a step downloaded from the Hub (docs/hub.md), else at the run's root."""
    step_path = Path(step_path)
    return step_path / name if (step_path / name).is_file() else step_path.parent.parent / name


def dynamics_file(step_path, name: str) -> Path:
    """`<step_path>/learning_dynamics/<name>.safetensors`, name being a split or "weights"."""
    return Path(step_path) / DYNAMICS / f"{name}.safetensors"


def tensor_key(data_type: str, module: str) -> str:
    """The safetensors key of a captured tensor, e.g. `gradients.layers.3.attention.v_proj`."""
    return f"{data_type}.{module}"


def parse_key(key: str) -> tuple[str, str] | None:
    """(data_type, module) of a key made by `tensor_key`; None for other keys (e.g. `input_ids`)."""
    data_type, _, module = key.partition(".")
    return (data_type, module) if data_type in DATA_TYPES and module else None


def module_matches(name: str, suffix: str) -> bool:
    """True when module name `name` ends with `suffix` on a dot boundary
    (`layers.0.attention.v_proj`, `v_proj`)."""
    return name == suffix or name.endswith("." + suffix)


def list_steps(run_dir, require: str = DYNAMICS) -> list[int]:
    """Steps N, ascending, whose `step_<N>/` holds `require` (a sub-path such as learning_dynamics
    or state)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        raise RunDirError(f"{run_dir}: not a run directory (no {CHECKPOINTS}/ folder)")
    steps = sorted(
        int(m.group(1)) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and (p / require).exists()
    )
    if not steps:
        raise RunDirError(f"{root}: no step_<N>/{require} folders")
    return steps


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint named by `<run_dir>/checkpoints/latest`, or None. `latest` may only
    name a `step_<N>` directory of this run (no path, no symlink): anything else is a RunDirError."""
    marker = checkpoints_dir(run_dir) / LATEST
    if not marker.exists() and not marker.is_symlink():
        return None
    if not marker.is_file():
        raise RunDirError(f"{marker}: not a file")
    name = marker.read_text().strip()
    path = marker.parent / name
    if not _STEP.fullmatch(name):
        raise RunDirError(f"{marker}: names {name!r}, which is not a step_<N> of this run")
    if path.is_symlink():
        raise RunDirError(f"{marker}: names {name}, a symlink to {os.readlink(path)}, not a step of this run")
    if not (path / STATE).is_dir():
        raise RunDirError(f"{marker}: names {path.name}, which has no {STATE}/ directory")
    return path


def resolve_resume(run_dir, resume: str) -> Path | None:
    """Map `checkpointing.resume` (auto | never | <path>) to the checkpoint dir to load, or None."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE).is_dir():
        raise RunDirError(f"checkpointing.resume: {path} is not a checkpoint directory (no {STATE}/ inside)")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see either the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path` itself), so that all of it is on disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def publish_step(root: Path, tmp: Path, step: int) -> None:
    """fsync the filled `tmp` dir, rename it to `step_<step>` and point `latest` at it (rank 0 only)."""
    fsync_tree(tmp)
    final = root / step_name(step)
    if final.exists():  # a re-run of a step whose checkpoint was written but never named `latest`
        old = root / f".old_{step_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        shutil.rmtree(old)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_atomic(root / LATEST, step_name(step) + "\n")


def new_step_dir(run_dir, step: int) -> Path:
    """Make an empty temporary dir to build `step_<step>` in (rank 0; other ranks only get its path).

    Anything left there by an earlier attempt at the same step is removed first.
    """
    root = checkpoints_dir(run_dir)
    tmp = root / f".tmp_{step_name(step)}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


# The run's name and the Hub journal (pico.hub, pico.analysis).
HUB_JOURNAL = "hub.json"  # in checkpoints/: the steps on the Hub per "<repo_id>@<branch>" (docs/hub.md)


def run_name(run_dir) -> str:
    """A run's name: its directory's folder name (the analysis' `run` column, the default Hub branch)."""
    return Path(run_dir).resolve().name


DATA_FINGERPRINT = "data_fingerprint.json"


def data_fingerprint_file(run_dir) -> Path:
    """`<run_dir>/data_fingerprint.json`: what data the run trained on (written by pico.data.fingerprint)."""
    return Path(run_dir) / DATA_FINGERPRINT


SPIKES = "spikes"  # dynamics-only checkpoints of loss spikes, laid out as a run directory (pico.spikes)
SPIKE = "spike.json"  # in such a step dir: the loss, its statistics and the batch's rows in the data


def spikes_dir(run_dir) -> Path:
    """`<run_dir>/spikes`: a run directory of its own whose `step_<N>/` hold update N+1 of a loss spike."""
    return Path(run_dir) / SPIKES


RECAPTURE = "recapture.json"  # a re-captured run's models and eval batch (pico.analysis.recapture)


def recapture_file(run_dir) -> Path:
    """`<run_dir>/recapture.json`: which model each step of a re-captured run came from (docs/analysis.md)."""
    return Path(run_dir) / RECAPTURE
