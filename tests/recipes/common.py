"""What the recipe tests share besides the tiny runs (tests/tiny.py): launching a recipe, or importing it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KILL_AT = Path(__file__).with_name("kill_at.py")


def launch(args, nproc=1, env=None, check=True, nnodes=None, kill_at=None, recipe="recipes/pretrain.py"):
    """Run `recipe`: plain python for one process, ./torchrun.sh otherwise; `kill_at="<step>:<phase>"` runs
    it through tests/recipes/kill_at.py, which SIGKILLs rank 0 at that checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    script = [str(KILL_AT), kill_at, "--recipe", recipe] if kill_at else [recipe]
    if nproc == 1 and nnodes is None:
        cmd = [sys.executable, *script, *args]
    else:
        env["NPROC_PER_NODE"] = str(nproc)
        cmd = ["./torchrun.sh", *script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def recipe_module(name):
    """recipes/<name>.py as a module, so that its `main` (or any of its functions) runs in this process."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
