"""torchrun.sh launches through the interpreter that has torch, with no `torchrun` on PATH."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}"), "w") as f:
    f.write(os.environ["WORLD_SIZE"])
"""


@pytest.mark.parametrize("python", ["python3 on PATH", "PYTHON set"])
def test_launches_without_torchrun_on_path(tmp_path, python):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPROC_PER_NODE": "2"}
    if python == "PYTHON set":  # python3 on PATH is whatever the system has (here: no torch)
        env.update(PATH="/usr/bin:/bin", PYTHON=sys.executable)
    else:  # python3 on PATH has torch, but its scripts (torchrun) are not on PATH. A wrapper, not a
        # symlink: a venv's python linked elsewhere loses its pyvenv.cfg and starts the base interpreter.
        (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / "python3").chmod(0o755)
        env.update(PATH=f"{bin_dir}:/usr/bin:/bin")
        env.pop("PYTHON", None)
    assert shutil.which("torchrun", path=env["PATH"]) is None
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        ["bash", str(ROOT / "torchrun.sh"), str(script), str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]
