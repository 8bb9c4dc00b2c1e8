"""The Hugging Face Hub: upload checkpoint steps while training, resume from them, fetch runs for analysis.

Every Hub call goes through `Hub`, one thin adapter over `huggingface_hub.HfApi` and `snapshot_download`
(`connect()` makes one; the token comes from HF_TOKEN or `hf auth login`). docs/hub.md describes the repo
layout (one commit `step <N>` and one tag `<branch>/step_<N>` per checkpoint step), the journal
`checkpoints/hub.json`, and what happens when the network is down.

    python -m pico.hub upload <run_dir> [--repo-id ID] [--branch NAME]   # upload what is still pending
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pico.distributed import is_main
from pico.errors import PicoError
from pico.model.hf import CONFIG_FILE
from pico.run_dir import (
    CONFIG,
    DYNAMICS,
    EVAL,
    MODEL,
    STATE,
    checkpoints_dir,
    list_steps,
    model_config_file,
    step_dir,
    step_name,
    write_atomic,
)

JOURNAL = "hub.json"  # in <run_dir>/checkpoints/: the steps on the Hub, per "<repo_id>@<branch>"
DRAIN_TIMEOUT = 3600.0  # seconds the end of training waits for pending uploads
MAX_DELAY = 60.0  # longest pause between two upload attempts
DRAIN_ATTEMPTS = 3  # at the end, consecutive attempts that find the Hub unreachable before giving up
STEP_TITLE = re.compile(r"step (\d+)")  # pico's commit titles
PICO_TRAIN_TITLE = re.compile(r"Saving Learning Dynamics Data \((train|val)\) -- Step (\d+)")
_ILLEGAL_REF = re.compile(r"[^A-Za-z0-9._/-]+")


class HubError(PicoError, ValueError):
    """A Hub request that cannot succeed as asked: no permission, unknown repo or revision, bad content."""

    kind = "hub error"


class HubUnavailable(HubError):
    """The Hub could not be reached or did not answer (network down, timeout, 5xx, 429): worth retrying."""


def ref_name(name: str) -> str:
    """The nearest legal git branch/tag name to `name` (illegal characters become `-`)."""
    name = re.sub(r"/+", "/", _ILLEGAL_REF.sub("-", name)).replace("..", ".")
    name = name.strip("/.-")
    return name[: -len(".lock")] if name.endswith(".lock") else name


def step_tag(branch: str, step: int) -> str:
    """The tag of step N on `branch`: `<branch>/step_<N>`."""
    return f"{branch}/{step_name(step)}"


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError unless `repo_id` is a valid Hub repo id (`namespace/name` or `name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(str(e).splitlines()[0]) from None


def parse_hf_uri(uri: str) -> tuple[str, str]:
    """`hf://<repo_id>[@<revision>]` → (repo_id, revision), the revision defaulting to `main`."""
    repo_id, _, revision = uri.removeprefix("hf://").partition("@")
    check_repo_id(repo_id)
    return repo_id, revision or "main"


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _translate(e: Exception, where: str) -> HubError:
    """huggingface_hub's exception as a one-line HubError (permanent) or HubUnavailable (retry)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{where}: repository not found, or no permission to access it ({first})")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{where}: no such revision ({first})")
    if isinstance(e, HfHubHTTPError):
        status = _status(e)
        if status in (401, 403):
            return HubError(f"{where}: not allowed (HTTP {status}; is HF_TOKEN set with write access?)")
        if status is None or status == 429 or status >= 500:
            return HubUnavailable(f"{where}: the Hub did not answer (HTTP {status}: {first})")
        return HubError(f"{where}: HTTP {status}: {first}")
    if isinstance(e, HFValidationError):
        return HubError(f"{where}: {first}")
    # No HTTP response at all: a connection error, a timeout, or offline mode (OSError subclasses, or the
    # TransportError of httpx, which huggingface_hub >= 1.0 uses).
    if isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__):
        return HubUnavailable(f"{where}: Hub unreachable ({type(e).__name__}: {first})")
    raise e


@dataclass(frozen=True)
class Commit:
    """One commit of a branch: its id and title."""

    id: str
    title: str


class Hub:
    """The one adapter over huggingface_hub: exactly the calls pico makes, errors as HubError(s)."""

    def __init__(self):
        from huggingface_hub import HfApi

        self.api = HfApi()  # token: HF_TOKEN or the stored login; never passed, never printed

    def _call(self, where: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # huggingface_hub raises many types; _translate keeps what it knows
            raise _translate(e, where) from None

    def create_repo(self, repo_id: str, private: bool) -> None:
        """Create model repo `repo_id` unless it exists."""
        self._call(repo_id, self.api.create_repo, repo_id, private=private, exist_ok=True)

    def create_branch(self, repo_id: str, branch: str) -> None:
        """Create `branch` (from main) unless it exists."""
        self._call(f"{repo_id}@{branch}", self.api.create_branch, repo_id, branch=branch, exist_ok=True)

    def list_tags(self, repo_id: str) -> dict[str, str]:
        """Tag name → commit id."""
        refs = self._call(repo_id, self.api.list_repo_refs, repo_id)
        return {t.name: t.target_commit for t in refs.tags}

    def list_commits(self, repo_id: str, revision: str) -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        commits = self._call(f"{repo_id}@{revision}", self.api.list_repo_commits, repo_id, revision=revision)
        return [Commit(c.commit_id, c.title) for c in commits]

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        """Paths of the files at `revision`."""
        return self._call(f"{repo_id}@{revision}", self.api.list_repo_files, repo_id, revision=revision)

    def create_commit(
        self, repo_id: str, branch: str, message: str, add: dict[str, Path], delete: list[str]
    ) -> str:
        """One commit on `branch` adding `add` (path in repo → local file) and deleting `delete`; its id."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops = [CommitOperationAdd(path, str(local)) for path, local in add.items()]
        ops += [CommitOperationDelete(path) for path in delete]
        info = self._call(
            f"{repo_id}@{branch}",
            self.api.create_commit,
            repo_id,
            ops,
            commit_message=message,
            revision=branch,
        )
        return info.oid

    def create_tag(self, repo_id: str, tag: str, revision: str) -> None:
        """Tag commit `revision` as `tag` (an existing tag is left as it is)."""
        self._call(
            f"{repo_id}@{tag}", self.api.create_tag, repo_id, tag=tag, revision=revision, exist_ok=True
        )

    def download(self, repo_id: str, revision: str, allow_patterns: list[str]) -> Path:
        """The files of `revision` matching `allow_patterns`, in the huggingface_hub cache; their folder."""
        from huggingface_hub import snapshot_download

        where = f"{repo_id}@{revision}"
        return Path(
            self._call(where, snapshot_download, repo_id, revision=revision, allow_patterns=allow_patterns)
        )


def connect() -> Hub:
    """The Hub adapter every pico function uses (tests replace this with a local stand-in)."""
    return Hub()


def steps_on_branch(commits: list[Commit]) -> dict[int, str]:
    """Step → commit id of pico's `step <N>` commits (the newest, if a step was committed twice)."""
    steps = {}
    for commit in commits:  # newest first
        if (m := STEP_TITLE.fullmatch(commit.title.strip())) and int(m.group(1)) not in steps:
            steps[int(m.group(1))] = commit.id
    return steps


# ---------------------------------------------------------------------------------------------------------
# Uploading


def _journal_path(run_dir) -> Path:
    return checkpoints_dir(run_dir) / JOURNAL


def read_journal(run_dir, target: str) -> dict[int, str]:
    """Step → commit id of the steps the journal records as on the Hub at `target` (`<repo_id>@<branch>`)."""
    path = _journal_path(run_dir)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text()).get(target, {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise HubError(f"{path}: not a pico hub journal ({e})") from None
    return {int(step): commit for step, commit in entries.items()}


def _write_journal(run_dir, target: str, uploaded: dict[int, str]) -> None:
    path = _journal_path(run_dir)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[target] = {str(s): uploaded[s] for s in sorted(uploaded)}
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def step_files(run_dir, step: int, upload_state: bool) -> dict[str, Path]:
    """What the commit of step N holds: path in repo → local file (model/ files at the repo root)."""
    path = step_dir(run_dir, step)
    files = {
        p.relative_to(path / MODEL).as_posix(): p for p in sorted((path / MODEL).rglob("*")) if p.is_file()
    }
    parts = [DYNAMICS] + ([STATE] if upload_state else [])
    for part in parts:
        files.update(
            {p.relative_to(path).as_posix(): p for p in sorted((path / part).rglob("*")) if p.is_file()}
        )
    for name, local in ((EVAL, path / EVAL), (CONFIG, Path(run_dir) / CONFIG)):
        if local.is_file():
            files[name] = local
    return files


def _stale(files: list[str], keep: dict[str, Path]) -> list[str]:
    """Files at the branch head that describe another step and are not overwritten by this one."""
    ours = (f"{DYNAMICS}/", f"{STATE}/")
    return [f for f in files if f not in keep and (f.startswith(ours) or f == EVAL)]


class Uploader:
    """Uploads the run's published steps in a background thread; a disabled one (no repo, rank > 0) is a
    no-op. Pending steps are the published `step_<N>/` not yet in the journal, so nothing queued is lost
    when the process dies, and a step is never committed twice (the branch's commits are checked first)."""

    def __init__(
        self,
        run_dir,
        repo_id: str | None,
        branch: str | None = None,
        private: bool = True,
        upload_state: bool = True,
        backoff: float = 1.0,
        echo=print,
    ):
        self.run_dir, self.repo_id, self.private, self.upload_state = (
            Path(run_dir),
            repo_id,
            private,
            upload_state,
        )
        self.branch = branch or ref_name(self.run_dir.resolve().name)
        self.backoff, self.echo, self.error = backoff, echo, None
        self._wake, self._stopping, self._thread = threading.Event(), False, None
        self._remote: dict[int, str] | None = None  # step → commit on the branch, known once connected
        self._tags: set[str] = set()
        self._busy: int | None = None

    @property
    def target(self) -> str:
        """`<repo_id>@<branch>`."""
        return f"{self.repo_id}@{self.branch}"

    @property
    def enabled(self) -> bool:
        """True on rank 0 of a run with `checkpointing.hub.repo_id` set."""
        return self.repo_id is not None and is_main()

    def pending(self) -> list[int]:
        """Published steps of the run directory not yet on the Hub, ascending."""
        try:
            local = list_steps(self.run_dir, require=STATE)
        except ValueError:  # no checkpoint yet
            return []
        done = read_journal(self.run_dir, self.target)
        return [s for s in local if s not in done]

    def start(self) -> Uploader:
        """Check the repo (creating it and the branch), then start the worker. Permission or bad-repo errors
        raise HubError now, before step 0; an unreachable Hub only warns and the worker keeps trying."""
        if not self.enabled:
            return self
        hub = connect()
        try:
            self._connect(hub)
        except HubUnavailable as e:
            self.error = e
            self.echo(f"hub: warning: {e}; training goes on and uploads wait for the network")
        self._thread = threading.Thread(target=self._work, args=(hub,), name="pico-hub-upload", daemon=True)
        self._thread.start()
        return self

    def enqueue(self, step: int) -> None:
        """Step N is published (`step_<N>/` renamed into place): wake the worker. Never blocks."""
        if self.enabled:
            self._wake.set()

    def finish(self, timeout: float = DRAIN_TIMEOUT) -> list[int]:
        """Wait for the pending uploads (a progress line every 10 s, at most `timeout` s; DRAIN_ATTEMPTS
        attempts in a row that find the Hub unreachable end the wait); print what is left with the command
        that retries it. Returns those steps."""
        if not self.enabled or self._thread is None:
            return []
        self._stopping = True
        self._wake.set()
        deadline, shown = time.monotonic() + timeout, time.monotonic()
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if self._thread.is_alive() and time.monotonic() - shown >= 10:
                shown, left = time.monotonic(), self.pending()
                self.echo(f"hub: {len(left)} step(s) left to upload to {self.target} (step {self._busy} now)")
        left = self.pending()
        if left:
            why = f" ({self.error})" if self.error else ""
            self.echo(
                f"hub: steps {left} are not on {self.target} yet{why}; retry with: "
                f"python -m pico.hub upload {self.run_dir} --repo-id {self.repo_id} --branch {self.branch}"
            )
        elif self._remote is not None:
            self.echo(f"hub: every step is on {self.target}")
        return left

    def _connect(self, hub: Hub) -> None:
        """Create repo and branch if needed and learn which steps are on the branch already."""
        hub.create_repo(self.repo_id, self.private)
        hub.create_branch(self.repo_id, self.branch)
        self._remote = steps_on_branch(hub.list_commits(self.repo_id, self.branch))
        self._tags = set(hub.list_tags(self.repo_id))

    def _upload(self, hub: Hub, step: int) -> None:
        """Commit step N (unless the branch has it), tag it, and record it in the journal."""
        commit = self._remote.get(step)
        if commit is None:
            files = step_files(self.run_dir, step, self.upload_state)
            stale = _stale(hub.list_files(self.repo_id, self.branch), files)
            commit = hub.create_commit(self.repo_id, self.branch, f"step {step}", files, stale)
            self._remote[step] = commit
        tag = step_tag(self.branch, step)
        if tag not in self._tags:
            hub.create_tag(self.repo_id, tag, commit)
            self._tags.add(tag)
        uploaded = read_journal(self.run_dir, self.target)
        uploaded[step] = commit
        _write_journal(self.run_dir, self.target, uploaded)

    def _work(self, hub: Hub) -> None:
        """Upload pending steps oldest first, retrying with exponential backoff (capped at MAX_DELAY s)."""
        delay, failures = self.backoff, 0
        while True:
            todo = self.pending()
            if not todo:
                if self._stopping:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                if self._remote is None:
                    self._connect(hub)
                self._busy = todo[0]
                self._upload(hub, todo[0])
                delay, failures, self.error = self.backoff, 0, None
            except Exception as e:  # an upload never stops training; HubError, or a local file gone
                self.error, self._remote = e, None  # reconnect: the failed commit may have landed
                failures += 1
                if self._stopping and isinstance(e, HubUnavailable) and failures >= DRAIN_ATTEMPTS:
                    return  # draining with the Hub unreachable: report now rather than wait an hour
                self._wake.wait(delay)
                delay = min(2 * delay, MAX_DELAY)
            finally:
                self._busy = None


def start_uploader(run_dir, hub_config) -> Uploader:
    """The uploader of `checkpointing.hub`, started (a no-op one when repo_id is unset or on rank > 0)."""
    c = hub_config
    return Uploader(run_dir, c.repo_id, c.branch, c.private, c.upload_state).start()


# ---------------------------------------------------------------------------------------------------------
# Resuming and analysing


def _require(folder: Path, pattern: str, where: str, what: str) -> None:
    if not any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern) for p in folder.rglob("*")):
        raise HubError(f"{where}: {what}")


def resume_source(resume: str, hub_config, run_dir) -> str:
    """`checkpointing.resume` as `resolve_resume` takes it: `hub` (the latest step of this run's branch) and
    `hf://<repo>@<revision>` become the local folder of that step's downloaded `state/`."""
    if resume == "hub":
        repo_id = hub_config.repo_id
        branch = hub_config.branch or ref_name(Path(run_dir).resolve().name)
        hub = connect()
        steps = steps_on_branch(hub.list_commits(repo_id, branch))
        if not steps:
            raise HubError(f"{repo_id}@{branch}: no commit titled 'step <N>', so nothing to resume")
        revision = steps[max(steps)]
    elif resume.startswith("hf://"):
        repo_id, revision = parse_hf_uri(resume)
        hub = connect()
    else:
        return resume
    folder = hub.download(repo_id, revision, [f"{STATE}/*", CONFIG])  # config.yaml: to check the model
    _require(folder, f"{STATE}/*", f"{repo_id}@{revision}", "no state/ (uploaded with upload_state: false?)")
    return str(folder)


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


def fetch_run(repo_id: str, revision: str, needs_config: bool, steps=None, root="runs/hub") -> Path:
    """Download the learning dynamics of a run on the Hub (pico's or pico-train's format) into the
    huggingface_hub cache and lay them out as a local pico run directory
    `<root>/<owner>--<name>/<revision>`; only `steps` (all when None), only learning-dynamics files,
    plus `config.json` when `needs_config` (compound components read the head counts from it)."""
    from pico.analysis import pico_train

    hub = connect()
    layout, commits = _discover(hub, repo_id, revision)
    wanted = sorted(commits if steps is None else set(steps) & set(commits))
    run = Path(root) / repo_id.replace("/", "--") / ref_name(revision).replace("/", "--")
    patterns = [f"{DYNAMICS}/*"] + ([CONFIG_FILE] if needs_config else [])
    if layout == "pico-train":
        patterns = [f"{DYNAMICS}/*.pt", f"{DYNAMICS}/*_data/*"] + ([CONFIG_FILE] if needs_config else [])
    found = 0
    for step in wanted:
        where = f"{repo_id}@{commits[step]} ({step_name(step)})"
        folder = hub.download(repo_id, commits[step], patterns)
        if not (folder / DYNAMICS).is_dir():
            continue
        found += 1
        out = step_dir(run, step)
        if layout == "pico-train":
            config = folder / CONFIG_FILE
            model = pico_train.hf_config(json.loads(config.read_text())) if config.is_file() else None
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
    if not target.exists():
        raise HubError(f"{target.name}: missing from the downloaded revision ({target.parent})")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def analysis_runs(runs, hub_repos, revision, spec) -> tuple[list[Path], list[Path]]:
    """(folders in pico's layout to read, folders whose analysis/ receives the outputs) for local `runs`
    (pico or pico-train layout) and Hub repos (at `revision`, default main), as `recipes/analyze.py` takes
    them."""
    from pico.analysis import pico_train
    from pico.components import COMPONENTS

    comps = list(spec.components or ()) + [c for m in spec.metrics for c in (m.components or ())]
    needs_config = any(c.name in COMPONENTS for c in comps)
    read, write = [], []
    for run in map(Path, runs):
        read.append(pico_train.as_pico_run(run) if pico_train.is_pico_train_run(run) else run)
        write.append(run)
    for repo_id in hub_repos or ():
        check_repo_id(repo_id)
        run = fetch_run(repo_id, revision or "main", needs_config, _steps(spec))
        read.append(run)
        write.append(run)
    return read, write


def _steps(spec) -> set[int] | None:
    """The steps a spec reads (None: all, or the last one, which `target_step: last` needs)."""
    targets = [spec.target_step] + [m.target_step for m in spec.metrics if m.target_step is not None]
    if spec.steps == "all" or "last" in targets:
        return None
    return set(spec.steps) | {t for t in targets if isinstance(t, int)}


# ---------------------------------------------------------------------------------------------------------
# python -m pico.hub upload <run_dir>


def main(argv=None) -> None:
    """`upload <run_dir>`: upload (or finish uploading) the steps of a run; exit 1 if some remain."""
    from pico.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m pico.hub", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload the steps of a run directory that are not on the Hub yet")
    up.add_argument("run_dir")
    up.add_argument("--repo-id", help="default: checkpointing.hub.repo_id of the run's config.yaml")
    up.add_argument("--branch", help="default: checkpointing.hub.branch, else the run directory's name")
    up.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, help="seconds to keep trying")
    args = parser.parse_args(argv)
    try:
        config = Path(args.run_dir) / CONFIG
        cfg = load_config(config).checkpointing.hub if config.is_file() else None
        repo_id = args.repo_id or (cfg.repo_id if cfg else None)
        if repo_id is None:
            raise HubError(f"{config}: no checkpointing.hub.repo_id; pass --repo-id")
        check_repo_id(repo_id)
        uploader = Uploader(
            args.run_dir,
            repo_id,
            args.branch or (cfg.branch if cfg else None),
            cfg.private if cfg else True,
            cfg.upload_state if cfg else True,
        ).start()
        if uploader.error is None and not uploader.pending():
            print(f"hub: nothing to upload to {uploader.target}")
        left = uploader.finish(args.timeout)
    except (HubError, ConfigError, ValueError) as e:
        print(f"hub error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
