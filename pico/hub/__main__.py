"""`python -m pico.hub upload <run_dir>` (pico/hub/cli.py)."""

from pico.hub.cli import main

main()
