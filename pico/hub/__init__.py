"""The Hugging Face Hub: upload checkpoint steps while training, resume from them (docs/hub.md).

    api.py      `Hub` (the one adapter over huggingface_hub, made by `connect()`), HubError, pico's ref names
    config.py   `HubConfig` (`checkpointing.hub`), its checks, reading it alone from a config file
    upload.py   `Uploader` (a background thread; the queue is on disk, the journal `checkpoints/hub.json`)
    resume.py   `resume_source` (`checkpointing.resume: hub | hf://...`)
    model.py    `fetch_model` (a step's model, pico's or pico-train's, for PicoDecoder.from_pretrained)
    cli.py      `python -m pico.hub upload <run_dir> [--repo-id ID] [--branch NAME]`

Every Hub request goes through `api.connect()`, looked up in pico.hub.api at each call: tests point that one
name at a local stand-in. Analysing runs on the Hub is pico.analysis.sources.
"""

from pico.hub.api import (
    Commit,
    Hub,
    HubError,
    HubUnavailable,
    check_repo_id,
    default_branch,
    parse_hf_uri,
    ref_name,
    step_tag,
    steps_on_branch,
)
from pico.hub.cli import main
from pico.hub.config import HubConfig, check_hub_config, load_hub_config
from pico.hub.model import fetch_model, model_steps
from pico.hub.resume import resume_source
from pico.hub.upload import (
    DRAIN_ATTEMPTS,
    DRAIN_TIMEOUT,
    MAX_DELAY,
    Uploader,
    published_steps,
    read_journal,
    start_uploader,
    step_files,
)

__all__ = [
    "Commit",
    "DRAIN_ATTEMPTS",
    "DRAIN_TIMEOUT",
    "Hub",
    "HubConfig",
    "HubError",
    "HubUnavailable",
    "MAX_DELAY",
    "Uploader",
    "check_hub_config",
    "check_repo_id",
    "default_branch",
    "fetch_model",
    "load_hub_config",
    "main",
    "model_steps",
    "parse_hf_uri",
    "published_steps",
    "read_journal",
    "ref_name",
    "resume_source",
    "start_uploader",
    "step_files",
    "step_tag",
    "steps_on_branch",
]
