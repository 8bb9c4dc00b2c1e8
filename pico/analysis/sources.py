"""The analysis' input sources: a pico run directory, a pico-train run, a run on the Hub (docs/hub.md).

`analysis_runs` turns each into a local folder in pico's layout that pico.analysis reads: a pico run as it
is, a pico-train run converted once (pico.analysis.pico_train), a Hub run downloaded (learning dynamics
only) into the huggingface_hub cache and laid out under `runs/hub/<owner>--<name>/<revision>` (pico's by
symlinks, pico-train's converted, each split of each step from the commit that wrote it).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pico.analysis import pico_train
from pico.analysis.spec import AnalysisSpec
from pico.components import COMPONENTS
from pico.hub import api
from pico.hub.api import Commit, Hub, HubError, check_repo_id, ref_name, steps_on_branch
from pico.model.hf import CONFIG_FILE
from pico.run_dir import CONFIG, DATA_FINGERPRINT, DYNAMICS, MANIFEST, model_config_file, step_dir

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


def pico_train_commits(commits: list[Commit]) -> dict[int, dict[str, Commit]]:
    """Step → split (train, val) → the commit titled `Saving Learning Dynamics Data (<split>) -- Step <N>`
    (the newest, if a step was committed twice)."""
    steps = {}
    for commit in commits:  # newest first
        if m := PICO_TRAIN_TITLE.fullmatch(commit.title.strip()):
            steps.setdefault(int(m.group(2)), {}).setdefault(m.group(1), commit)
    return steps


def fetch_run(repo_id: str, revision: str, *, needs_config: bool, steps=None, root=HUB_ROOT) -> Path:
    """Download the learning dynamics of a run on the Hub (pico's or pico-train's format) into the
    huggingface_hub cache and lay them out as a local pico run directory
    `<root>/<owner>--<name>/<revision>`; only `steps` (all when None), only learning-dynamics files,
    plus `config.json` when `needs_config` (compound components read the head counts from it; a pico-train
    run's `training_config.yaml` gives them)."""
    hub = api.connect()
    commits = hub.list_commits(repo_id, revision)
    pico_steps, pico_train_steps = steps_on_branch(commits), pico_train_commits(commits)
    if not pico_steps and not pico_train_steps:
        raise HubError(
            f"{repo_id}@{revision}: not a pico run (no commit titled 'step <N>' or "
            "'Saving Learning Dynamics Data (train|val) -- Step <N>')"
        )
    found = sorted(pico_steps or pico_train_steps)
    wanted = found if steps is None else sorted(set(steps) & set(found))
    run = Path(root) / repo_id.replace("/", "--") / ref_name(revision).replace("/", "--")
    if pico_steps:
        fetched = _fetch_pico(hub, repo_id, pico_steps, wanted, run, needs_config)
    else:
        fetched = _fetch_pico_train(hub, repo_id, revision, pico_train_steps, wanted, run)
    if not fetched:
        raise HubError(
            f"{repo_id}@{revision}: no learning_dynamics/ files at any of its {len(wanted)} step(s)"
        )
    return run


def _fetch_pico(
    hub: Hub, repo_id: str, commits: dict[int, str], wanted, run: Path, needs_config: bool
) -> int:
    """Link each wanted `step <N>` commit's learning_dynamics/, manifest.json (and config.json) into `run`,
    and the last one's config.yaml and data_fingerprint.json at its root (what pico.data.batch_at reads); how
    many steps had learning dynamics."""
    config = [CONFIG_FILE] if needs_config else []
    found = 0
    for step in wanted:
        run_files = [CONFIG, DATA_FINGERPRINT] if step == wanted[-1] else []
        folder = hub.download(repo_id, commits[step], [f"{DYNAMICS}/*", MANIFEST] + config + run_files)
        for name in run_files:
            if (folder / name).is_file():
                _link(folder / name, run / name)
        if not (folder / DYNAMICS).is_dir():
            continue
        found += 1
        _link(folder / DYNAMICS, step_dir(run, step) / DYNAMICS)
        if (folder / MANIFEST).is_file():  # the step's hashes: the analysis verifies each file it reads
            _link(folder / MANIFEST, step_dir(run, step) / MANIFEST)
        if needs_config:
            _link(folder / CONFIG_FILE, model_config_file(step_dir(run, step)))
    return found


def _fetch_pico_train(hub: Hub, repo_id: str, revision: str, commits: dict, wanted, run: Path) -> int:
    """Convert each wanted step of a pico-train branch into `run`, every split from the commit that wrote
    it; how many steps."""
    config = hub.download(repo_id, revision, [pico_train.TRAINING_CONFIG]) / pico_train.TRAINING_CONFIG
    if not config.is_file():
        raise HubError(
            f"{repo_id}@{revision}: no {pico_train.TRAINING_CONFIG} (pico-train commits it at step 0)"
        )
    info = pico_train.read_training_config(config)
    eval_ids = functools.cache(lambda: pico_train.eval_batch(info.eval_data))
    for step in wanted:
        splits = commits[step]  # W_N is in both splits' weights: read it once, from val when there is one
        sources = {
            prefix: _split_files(hub, repo_id, commit, prefix, weights=prefix == "val" or "val" not in splits)
            for prefix, commit in splits.items()
        }
        pico_train.convert_step(
            sources, step_dir(run, step), info, step=step, config=config, eval_ids=eval_ids
        )
    return len(wanted)


def _split_files(hub: Hub, repo_id: str, commit: Commit, prefix: str, weights: bool) -> Path:
    """learning_dynamics/ holding split `prefix`'s files (its weights only if `weights`), downloaded at the
    commit that wrote them. Each must have been changed by that commit: upload_folder never deletes, so the
    tree also holds other steps' files. Exempt: `dataset_info.json`, the column schema (the same at every
    step)."""
    where = f"{repo_id}@{commit.id} ({commit.title.strip()!r})"
    changed = hub.last_commits(repo_id, commit.id, DYNAMICS)
    files = [
        path
        for path in sorted(changed)
        if path.split("/")[1].startswith(f"{prefix}_")
        and (weights or not path.endswith(f"{prefix}_weights.pt"))
    ]
    for path in files:
        if changed[path] != commit.id and not path.endswith("/dataset_info.json"):
            raise HubError(
                f"{where}: {path} was last changed by commit {changed[path] or '(unknown)'}, not by this "
                "one, so it holds another step's data; refusing to read it"
            )
    if not files:
        raise HubError(f"{where}: no {DYNAMICS}/{prefix}_* files")
    return hub.download(repo_id, commit.id, files) / DYNAMICS


def _link(target: Path, link: Path) -> None:
    """Make `link` a symlink to the downloaded `target` (replacing an older link)."""
    if not target.exists():
        raise HubError(f"{target.name}: missing from the downloaded revision ({target.parent})")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
