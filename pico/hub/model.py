"""The model of one step of a run on the Hub, downloaded for `PicoDecoder.from_pretrained` (docs/hub.md).

    folder = fetch_model("pico-lm/pico-decoder-tiny", "pico-decoder-tiny-1", step=1000)
    model = PicoDecoder.from_pretrained(folder)

A step's model is the tree of the commit that saved it: pico-train's `Saving HF Model -- Step <N>` (its
branch's root is overwritten at every step, and the final step's learning-dynamics commit can come before
its model's), or pico's `step <N>`. Only the model's JSON and safetensors files are downloaded, never the
remote code (`*.py`) that pico-train ships beside them.
"""

from __future__ import annotations

import re
from pathlib import Path

from pico.hub import api
from pico.hub.api import Commit, HubError, steps_on_branch
from pico.model.hf import CONFIG_FILE, WEIGHTS_FILE

MODEL_TITLE = re.compile(r"Saving HF Model -- Step (\d+)")  # pico-train's model commits
MODEL_FILES = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    f"{WEIGHTS_FILE}.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def model_steps(commits: list[Commit]) -> dict[int, str]:
    """Step → commit id of each step's model: pico-train's `Saving HF Model -- Step <N>` commits, else
    pico's `step <N>` (the newest, if a step was committed twice)."""
    steps = {}
    for commit in commits:  # newest first
        if (m := MODEL_TITLE.fullmatch(commit.title.strip())) and int(m.group(1)) not in steps:
            steps[int(m.group(1))] = commit.id
    return steps or steps_on_branch(commits)


def fetch_model(repo_id: str, revision: str = "main", step: int | None = None) -> Path:
    """The local folder (huggingface_hub cache) of the model at `step` of branch `revision` (None: its
    newest step, or the revision itself when it has no step commits): config.json, safetensors, tokenizer."""
    hub = api.connect()
    steps = model_steps(hub.list_commits(repo_id, revision))
    if step is None:
        commit = steps[max(steps)] if steps else revision
    elif step in steps:
        commit = steps[step]
    else:
        have = ", ".join(map(str, sorted(steps)[:20])) + (" ..." if len(steps) > 20 else "")
        raise HubError(f"{repo_id}@{revision}: no model commit of step {step} (steps: {have or 'none'})")
    folder = hub.download(repo_id, commit, MODEL_FILES)
    if not (folder / CONFIG_FILE).is_file():
        raise HubError(f"{repo_id}@{commit}: no {CONFIG_FILE} at the repository root, so no model")
    return folder
