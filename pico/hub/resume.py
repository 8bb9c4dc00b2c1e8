"""Resuming from the Hub: `checkpointing.resume: hub` or `hf://<repo>@<revision>` as a local state/ folder."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pico.hub import api
from pico.hub.api import HubError, default_branch, parse_hf_uri, steps_on_branch
from pico.run_dir import CONFIG, DATA_FINGERPRINT, MANIFEST, RUN_RECORD, STATE


def _require(folder: Path, pattern: str, where: str, what: str) -> None:
    if not any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern) for p in folder.rglob("*")):
        raise HubError(f"{where}: {what}")


def resume_source(resume: str, hub_config, run_dir) -> str:
    """`checkpointing.resume` as `resolve_resume` takes it: `hub` (the latest step of this run's branch) and
    `hf://<repo>@<revision>` become the local folder of that step's downloaded `state/`."""
    if resume == "hub":
        repo_id = hub_config.repo_id
        branch = hub_config.branch or default_branch(run_dir)
        hub = api.connect()
        steps = steps_on_branch(hub.list_commits(repo_id, branch))
        if not steps:
            raise HubError(f"{repo_id}@{branch}: no commit titled 'step <N>', so nothing to resume")
        revision = steps[max(steps)]
    elif resume.startswith("hf://"):
        repo_id, revision = parse_hf_uri(resume)
        hub = api.connect()
    else:
        return resume
    # config.yaml: to check the model; manifest.json: to verify state/ (pico.checkpoint.load_checkpoint);
    # run.json: the recipe that ran it (docs/hub.md); data_fingerprint.json: to check the data (bind_data)
    folder = hub.download(repo_id, revision, [f"{STATE}/*", CONFIG, MANIFEST, RUN_RECORD, DATA_FINGERPRINT])
    _require(folder, f"{STATE}/*", f"{repo_id}@{revision}", "no state/ (uploaded with upload_state: false?)")
    return str(folder)
