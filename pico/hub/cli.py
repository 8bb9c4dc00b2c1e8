"""`python -m pico.hub upload <run_dir> [--repo-id ID] [--branch NAME]`: upload what is still pending."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pico.errors import exit_on
from pico.hub.api import HubError, check_repo_id
from pico.hub.config import HubConfig, load_hub_config
from pico.hub.upload import DRAIN_TIMEOUT, Uploader
from pico.run_dir import CONFIG, RunDirError, checkpoints_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pico.hub", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload the steps of a run directory that are not on the Hub yet")
    up.add_argument("run_dir")
    up.add_argument("--repo-id", help="default: checkpointing.hub.repo_id of the run's config.yaml")
    up.add_argument("--branch", help="default: checkpointing.hub.branch, else the run directory's name")
    up.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, help="seconds to keep trying")
    return parser


def main(argv=None) -> None:
    """`upload <run_dir>`: upload (or finish uploading) the steps of a run; exit 1 if some remain, 2 on bad
    input (one line)."""
    args = _parser().parse_args(argv)
    config = Path(args.run_dir) / CONFIG
    with exit_on():
        if not checkpoints_dir(args.run_dir).is_dir():
            raise RunDirError(f"{args.run_dir}: not a run directory (no checkpoints/ folder)")
        cfg = load_hub_config(config) if config.is_file() else HubConfig()
        repo_id = args.repo_id or cfg.repo_id
        if repo_id is None:
            raise HubError(f"{config}: no checkpointing.hub.repo_id; pass --repo-id")
        check_repo_id(repo_id)
        uploader = Uploader(
            args.run_dir,
            repo_id,
            branch=args.branch or cfg.branch,
            private=cfg.private,
            upload_state=cfg.upload_state,
        ).start()
        if uploader.error is None and not uploader.pending():
            print(f"hub: nothing to upload to {uploader.target}")
        left = uploader.finish(args.timeout)
    sys.exit(1 if left else 0)
