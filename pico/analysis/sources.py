"""The analysis' input sources: a pico run directory, a pico-train run, a run on the Hub (docs/hub.md).

`analysis_runs` turns each into a local folder in pico's layout that pico.analysis reads: a pico run as it
is, a pico-train run converted once (pico.analysis.pico_train), a Hub run downloaded (learning dynamics
only) into the huggingface_hub cache and laid out by symlinks under `runs/hub/<owner>--<name>/<revision>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pico.analysis import pico_train
from pico.analysis.spec import AnalysisSpec
from pico.components import COMPONENTS
from pico.hub import api
from pico.hub.api import Hub, HubError, check_repo_id, ref_name, steps_on_branch
from pico.model.hf import CONFIG_FILE
from pico.run_dir import DYNAMICS, model_config_file, step_dir, step_name

PICO_TRAIN_TITLE = re.compile(r"Saving Learning Dynamics Data \((train|val)\) -- Step (\d+)")
HUB_ROOT = "runs/hub"  # where Hub runs are laid out, relative to the working directory


def analysis_runs(
    spec: AnalysisSpec, *, runs=(), hub_repos=(), revision: str | None = None
) -> tuple[list[Path], list[Path]]:
    """(folders in pico's layout to read, folders whose analysis/ receives the outputs) for local `runs`
    (pico or pico-train layout) and Hub repos (at `revision`, default main), as `recipes/analyze.py` takes
    them."""
    comps = list(spec.components or ()) + [c for m in spec.metrics for c in (m.components or ())]
    needs_config = any(c.name in COMPONENTS for c in comps)
    read, write = [], []
    for run in map(Path, runs):
        read.append(pico_train.as_pico_run(run) if pico_train.is_pico_train_run(run) else run)
        write.append(run)
    for repo_id in hub_repos:
        check_repo_id(repo_id)
        run = fetch_run(repo_id, revision or "main", needs_config=needs_config, steps=_steps(spec))
        read.append(run)
        write.append(run)
    return read, write


def _steps(spec: AnalysisSpec) -> set[int] | None:
    """The steps a spec reads (None: all, or the last one, which `target_step: last` needs)."""
    targets = [spec.target_step] + [m.target_step for m in spec.metrics if m.target_step is not None]
    if spec.steps == "all" or "last" in targets:
        return None
    return set(spec.steps) | {t for t in targets if isinstance(t, int)}


def _discover(hub: Hub, repo_id: str, revision: str) -> tuple[str, dict[int, str]]:
    """("pico" | "pico-train", step → commit id) of the run on `revision`."""
    commits = hub.list_commits(repo_id, revision)
    steps = steps_on_branch(commits)
    if steps:
        return "pico", steps
    for commit in commits:
        if (m := PICO_TRAIN_TITLE.fullmatch(commit.title.strip())) and int(m.group(2)) not in steps:
            steps[int(m.group(2))] = commit.id  # the newest commit of the step holds both splits
    if not steps:
        raise HubError(
            f"{repo_id}@{revision}: not a pico run (no commit titled 'step <N>' or "
            "'Saving Learning Dynamics Data (train|val) -- Step <N>')"
        )
    return "pico-train", steps


def fetch_run(repo_id: str, revision: str, *, needs_config: bool, steps=None, root=HUB_ROOT) -> Path:
    """Download the learning dynamics of a run on the Hub (pico's or pico-train's format) into the
    huggingface_hub cache and lay them out as a local pico run directory
    `<root>/<owner>--<name>/<revision>`; only `steps` (all when None), only learning-dynamics files,
    plus `config.json` when `needs_config` (compound components read the head counts from it)."""
    hub = api.connect()
    layout, commits = _discover(hub, repo_id, revision)
    wanted = sorted(commits if steps is None else set(steps) & set(commits))
    run = Path(root) / repo_id.replace("/", "--") / ref_name(revision).replace("/", "--")
    config = [CONFIG_FILE] if needs_config else []
    dynamics = [f"{DYNAMICS}/*.pt", f"{DYNAMICS}/*_data/*"] if layout == "pico-train" else [f"{DYNAMICS}/*"]
    found = 0
    for step in wanted:
        folder = hub.download(repo_id, commits[step], dynamics + config)
        if not (folder / DYNAMICS).is_dir():
            continue
        found += 1
        out = step_dir(run, step)
        if layout == "pico-train":
            where = f"{repo_id}@{commits[step]} ({step_name(step)})"
            hf = folder / CONFIG_FILE
            model = pico_train.hf_config(json.loads(hf.read_text())) if hf.is_file() else None
            pico_train.convert_step(folder / DYNAMICS, out, model, where)
        else:
            _link(folder / DYNAMICS, out / DYNAMICS)
            if needs_config:
                _link(folder / CONFIG_FILE, model_config_file(out))
    if not found:
        raise HubError(
            f"{repo_id}@{revision}: no learning_dynamics/ files at any of its {len(wanted)} step(s)"
        )
    return run


def _link(target: Path, link: Path) -> None:
    """Make `link` a symlink to the downloaded `target` (replacing an older link)."""
    if not target.exists():
        raise HubError(f"{target.name}: missing from the downloaded revision ({target.parent})")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
