"""`checkpointing.hub`: the Hub settings of a run, their checks, and reading them alone from a config file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pico.config_loader import ConfigError, build, load_tree, section
from pico.hub.api import HubError, check_repo_id, parse_hf_uri, ref_name

SECTION = "checkpointing.hub"


@dataclass
class HubConfig:
    """Upload every checkpoint step to a Hugging Face Hub repo while training (docs/hub.md); off while
    `repo_id` is unset. The token comes from HF_TOKEN or `hf auth login`, never from the config."""

    changeable_on_resume: ClassVar = ("repo_id", "branch", "private", "upload_state")  # pico.config

    repo_id: str | None = None
    branch: str | None = None  # default: the run directory's name
    private: bool = True
    upload_state: bool = True  # the DCP state/, so that a run can resume from the Hub


def check_hub_config(hub: HubConfig, resume: str = "auto") -> None:
    """`checkpointing.hub` and a Hub `checkpointing.resume` are well-formed (the Hub itself is asked at
    start-up); raise ConfigError naming the key."""
    try:
        if hub.repo_id is not None:
            check_repo_id(hub.repo_id)
    except HubError as e:
        raise ConfigError(f"{SECTION}.repo_id: {e}") from None
    try:
        if resume.startswith("hf://"):
            parse_hf_uri(resume)
    except HubError as e:
        raise ConfigError(f"checkpointing.resume: {e}") from None
    if hub.branch is not None and ref_name(hub.branch) != hub.branch:
        raise ConfigError(
            f"{SECTION}.branch: {hub.branch!r} is not a legal branch name (nearest: {ref_name(hub.branch)!r})"
        )
    if resume == "hub" and hub.repo_id is None:
        raise ConfigError(f"checkpointing.resume: 'hub' needs {SECTION}.repo_id")


def load_hub_config(path: str | Path) -> HubConfig:
    """The checked `checkpointing.hub` section of YAML config `path`; no other section is read, so any run's
    config.yaml (a fork's included) gives it. Raises ConfigError."""
    hub = build(HubConfig, section(load_tree(path), SECTION), SECTION)
    check_hub_config(hub)
    return hub
