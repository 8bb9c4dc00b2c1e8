"""One module per metric: `import pico.metrics.cka` works, and `pico.metrics.cka` stays the function."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ["cka", "pwcca", "per", "condition_number", "gini", "hoyer", "norm"]

CHECK = """
import importlib, inspect, json, sys, types
import pico.metrics
report = {}
for name in NAMES:
    module = sys.modules["pico.metrics." + name]
    fn = getattr(pico.metrics, name)
    report[name] = {
        "module_is_module": isinstance(module, types.ModuleType),
        "package_attr_is_function": inspect.isfunction(fn),
        "same_function": fn is getattr(module, name) is pico.metrics.get_metric(name).fn,
        "function_module": fn.__module__,
        "from_package": inspect.isfunction(importlib.import_module("pico.metrics").__dict__[name]),
    }
print(json.dumps(report))
"""


def run_fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter that imports this worktree's pico; its last stdout line as JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", code]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(report: dict):
    for name in FUNCTIONS:
        assert report[name] == {
            "module_is_module": True,
            "package_attr_is_function": True,
            "same_function": True,
            "function_module": f"pico.metrics.{name}",
            "from_package": True,
        }, name


def test_submodules_first_then_package_functions():
    imports = "\n".join(
        f"import pico.metrics.{n}\nfrom pico.metrics.{n} import {n} as _{n}" for n in FUNCTIONS
    )
    calls = "import torch\nassert pico.metrics.cka(torch.eye(5), torch.eye(5)) == 1.0\n"
    check(run_fresh(imports + "\n" + calls + f"NAMES = {FUNCTIONS!r}\n" + CHECK))


def test_package_functions_first_then_submodules():
    first = f"from pico.metrics import {', '.join(FUNCTIONS)}\n"
    then = "\n".join(f"import pico.metrics.{n}" for n in FUNCTIONS)
    calls = "import torch\nassert pico.metrics.per(torch.eye(4)) == 1.0 and per is pico.metrics.per\n"
    check(run_fresh(first + then + "\n" + calls + f"NAMES = {FUNCTIONS!r}\n" + CHECK))


def test_import_as_binds_the_function():
    code = textwrap.dedent("""
        import json, inspect
        import pico.metrics.hoyer as m
        from pico.metrics.norm import NORMS
        print(json.dumps({"function": inspect.isfunction(m), "norms": list(NORMS)}))
    """)
    assert run_fresh(code) == {"function": True, "norms": ["fro", "nuc", "inf", "spectral", "max"]}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_module_exposes_its_function(name):
    import importlib

    import pico.metrics

    module = importlib.import_module(f"pico.metrics.{name}")
    assert getattr(module, name) is getattr(pico.metrics, name) is pico.metrics.get_metric(name).fn
