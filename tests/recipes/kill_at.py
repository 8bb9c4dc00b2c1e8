"""Run a recipe, SIGKILLing rank 0 at a checkpoint: `kill_at.py <step>:<writing|done> [RECIPE.py] ARGS...`
(RECIPE.py defaults to recipes/pretrain.py).

`writing`: once step_<step>'s files are all written, before it is renamed and named `latest` (the worst
moment); `done`: right after `latest` names it. The crash-safety tests launch this instead of the recipe,
so that the library itself carries no test hook.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import pico.run_dir

step, phase = sys.argv.pop(1).split(":")
publish = pico.run_dir.publish_step


def publish_then_maybe_die(root, tmp, at):
    """pico.run_dir.publish_step with a SIGKILL before or after it at the chosen step."""
    if at == int(step) and phase == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(root, tmp, at)
    if at == int(step) and phase == "done":
        os.kill(os.getpid(), signal.SIGKILL)


pico.run_dir.publish_step = publish_then_maybe_die
recipe = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1].endswith(".py") else "recipes/pretrain.py"
sys.argv[0] = str(Path(__file__).resolve().parents[2] / recipe)
sys.path.insert(0, str(Path(sys.argv[0]).parent))  # as `python RECIPE.py` does: its sibling modules import
runpy.run_path(sys.argv[0], run_name="__main__")
