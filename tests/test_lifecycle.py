"""die_with_parent() on real processes: kill -9 the torchrun launcher, its workers go too."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NPROC_PER_NODE": "2"}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

# argv: out dir, "arm" or "no-arm". Writes its pid, then appends to a heartbeat file every 20 ms forever.
WORKER = """
import os, sys, time
from pico.lifecycle import die_with_parent
if sys.argv[2] == "arm":
    assert die_with_parent()
out, rank = sys.argv[1], os.environ.get("RANK", "0")
with open(f"{out}/pid{rank}.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(f"{out}/pid{rank}.tmp", f"{out}/pid{rank}")
while True:
    with open(f"{out}/beat{rank}", "a") as f:
        f.write(".")
    time.sleep(0.02)
"""

# A parent that starts ORPHAN and waits; ORPHAN waits until that parent is dead, then calls die_with_parent().
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
time.sleep(600)
"""
ORPHAN = """
import os, sys, time
from pico import lifecycle
out = sys.argv[1]
with open(f"{out}/pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(f"{out}/pid.tmp", f"{out}/pid")
while os.getppid() == lifecycle._parent:
    time.sleep(0.01)
lifecycle.die_with_parent()
time.sleep(0.5)
open(f"{out}/survived", "w").close()
"""


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(condition, timeout: float) -> bool:
    """Poll `condition` every 50 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("arm", [True, False], ids=["die_with_parent", "control"])
def test_workers_exit_when_the_launcher_is_killed(tmp_path, arm):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "torchrun.sh"), str(script), str(tmp_path), "arm" if arm else "no-arm"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = []
    try:
        beats = [tmp_path / f"beat{r}" for r in range(2)]
        assert wait_for(lambda: all(b.exists() for b in beats), 120), "workers did not start"
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        assert all(map(running, pids))
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: torchrun's agent, the workers' parent
        launcher.wait()
        if arm:
            assert wait_for(lambda: not any(map(running, pids)), 5), "workers outlived their launcher"
            sizes = [b.stat().st_size for b in beats]
            time.sleep(0.3)
            assert [b.stat().st_size for b in beats] == sizes  # nothing writes any more
        else:  # without it, torchrun's workers are orphans that keep writing
            time.sleep(2)
            assert all(map(running, pids))
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_parent_dead_before_the_call(tmp_path):
    (tmp_path / "parent.py").write_text(PARENT)
    (tmp_path / "orphan.py").write_text(ORPHAN)
    parent = subprocess.Popen(
        [sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "orphan.py"), str(tmp_path)], env=ENV
    )
    pid = None
    try:
        assert wait_for(lambda: (tmp_path / "pid").exists(), 60), "orphan did not start"
        pid = int((tmp_path / "pid").read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: not running(pid), 5), "an orphan survived die_with_parent()"
        assert not (tmp_path / "survived").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid is not None and running(pid):
            os.kill(pid, signal.SIGKILL)
