"""Run a recipe (recipes/pretrain.py unless `--recipe PATH`), SIGKILLing rank 0 at a checkpoint:
`kill_at.py <step>:<writing|done|background|pruning> [--recipe PATH] ARGS...`.

`writing`: once step_<step>'s files are all written, before it is renamed and named `latest` (the worst
moment); `done`: right after `latest` names it; `background`: while step_<step> is being written in the
background, once training has applied update step+2 (a run from scratch; update step+1 is logged by then),
before it is renamed; `pruning`: while retention deletes step_<step>'s state/ (renamed away, one file
deleted). The crash-safety tests launch this instead of the recipe, so that the library itself
carries no test hook.
"""

import os
import runpy
import shutil
import signal
import sys
import threading
from pathlib import Path

import pico.run_dir
import pico.training

step, phase = sys.argv.pop(1).split(":")
recipe = Path(__file__).resolve().parents[2] / "recipes" / "pretrain.py"
if sys.argv[1:2] == ["--recipe"]:
    recipe = Path(sys.argv.pop(2)).resolve()
    sys.argv.pop(1)
publish, apply_update, rmtree = pico.run_dir.publish_step, pico.training.apply_update, shutil.rmtree
updates = threading.Semaphore(0)  # released once per update the training loop applies


def apply_and_count(*args, **kwargs):
    """pico.training.apply_update, counted."""
    result = apply_update(*args, **kwargs)
    updates.release()
    return result


def publish_then_maybe_die(root, tmp, at):
    """pico.run_dir.publish_step with a SIGKILL before or after it at the chosen step."""
    if at == int(step) and phase == "background":
        # updates 1..step+2: the loop logs update step+1 before it applies step+2, and it blocks on this
        # write only at the next save (the caller's save_every leaves room for two more updates)
        for _ in range(at + 2):
            updates.acquire(timeout=120)
    if at == int(step) and phase in ("writing", "background"):
        os.kill(os.getpid(), signal.SIGKILL)
    publish(root, tmp, at)
    if at == int(step) and phase == "done":
        os.kill(os.getpid(), signal.SIGKILL)


def rmtree_or_die(path, *args, **kwargs):
    """shutil.rmtree, but a SIGKILL halfway through deleting step_<step>'s state/ (run_dir.drop_state)."""
    path = Path(path)
    if phase == "pruning" and path.name == pico.run_dir.DROPPED_STATE and path.parent.name == f"step_{step}":
        next(p for p in path.rglob("*") if p.is_file()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    rmtree(path, *args, **kwargs)


pico.run_dir.publish_step = publish_then_maybe_die
shutil.rmtree = rmtree_or_die
pico.training.apply_update = apply_and_count
sys.argv[0] = str(recipe)
sys.path.insert(0, str(recipe.parent))  # as `python recipe.py` does: the recipe imports its neighbours
runpy.run_path(sys.argv[0], run_name="__main__")
