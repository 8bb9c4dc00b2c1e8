"""Run a script whose Hub calls go to the local stand-in: `launch.py <standin_root> <script.py> ARGS`.

The recipe tests launch this instead of the recipe, so that the library itself carries no test hook.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pico.hub.api  # noqa: E402
from tests.hub.standin import LocalHub  # noqa: E402

root = sys.argv.pop(1)
pico.hub.api.connect = lambda: LocalHub(root)
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
