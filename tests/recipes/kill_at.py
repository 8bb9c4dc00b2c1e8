"""Run recipes/pretrain.py, SIGKILLing rank 0 at a checkpoint: `kill_at.py <step>:<writing|done> ARGS...`.

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
sys.argv[0] = str(Path(__file__).resolve().parents[2] / "recipes" / "pretrain.py")
runpy.run_path(sys.argv[0], run_name="__main__")
