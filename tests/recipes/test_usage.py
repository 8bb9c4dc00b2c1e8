"""The recipes' usage: the commands their --help shows run as typed, --help answers before torch is imported,
and recipes/demo.sh answers --help without building anything."""

import shlex
import subprocess
import sys

import pytest

from tests.recipes.common import ROOT

FORKS = ["pretrain", "relora", "maml"]


def run(command: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """`command` in bash in the repository, with a `python` and a `python3` on PATH that are this
    interpreter (wrappers: a venv's python linked elsewhere would start the base interpreter)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    env = {"PATH": path, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("recipe", FORKS)
def test_the_commands_in_help_run_as_typed(recipe, tmp_path):
    script = f"recipes/{recipe}.py"
    shown = run(f"python {script} --help", tmp_path)
    assert shown.returncode == 0, shown.stderr
    commands = [  # each line naming the recipe, from where its command starts up to the script
        line[: line.index(script)].rsplit("`", 1)[-1].strip() + f" {script}"
        for line in shown.stdout.splitlines()
        if script in line and not line.startswith("usage:")
    ]
    assert {c.split()[0] for c in commands} == {"python", "./torchrun.sh"}, shown.stdout
    for command in commands:
        proc = run(f"{command} --help", tmp_path, NPROC_PER_NODE="1")
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-2000:])


@pytest.mark.parametrize("recipe", FORKS)
def test_help_answers_before_torch_is_imported(recipe, tmp_path):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['recipes/{recipe}.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path('recipes/{recipe}.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    proc = run(f"python -c {shlex.quote(probe)}", tmp_path)
    assert proc.stdout.splitlines()[-1] == "exit 0 False", proc.stdout + proc.stderr


def test_demo_sh_answers_help_without_building_anything(tmp_path):
    proc = run("bash recipes/demo.sh --help", tmp_path, PICO_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0 and proc.stderr == ""
    assert "bash recipes/demo.sh [section.key=value ...]" in proc.stdout
    assert not (tmp_path / "cache").exists() and "==" not in proc.stdout  # no step of the job began
