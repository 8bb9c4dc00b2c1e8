"""The one adapter over huggingface_hub (`Hub`, made by `connect()`), its errors, and pico's Hub names.

Every Hub request of pico goes through `Hub`; the token comes from HF_TOKEN or `hf auth login`. Callers call
`api.connect()` through this module, so that tests replace it with a local stand-in (tests/hub/standin.py).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from pico.errors import PicoError
from pico.hf_http import configure_hf_http, deadline
from pico.run_dir import run_name, step_name

STEP_TITLE = re.compile(r"step (\d+)")  # pico's commit titles
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


def default_branch(run_dir) -> str:
    """The branch of a run whose `checkpointing.hub.branch` is unset: its run name as a legal ref name."""
    return ref_name(run_name(run_dir))


def step_tag(branch: str, step: int) -> str:
    """The tag of step N on `branch`: `<branch>/step_<N>`."""
    return f"{branch}/{step_name(step)}"


def check_repo_id(repo_id: str) -> None:
    """Raise HubError unless `repo_id` is a valid Hub repo id (`namespace/name` or `name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(str(e).splitlines()[0]) from None


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

        configure_hf_http()  # every request times out (a silent server never stalls a run); quiet retries
        self.api = HfApi()  # token: HF_TOKEN or the stored login; never passed, never printed

    def _call(self, where: str, fn, *args, check: bool = False, **kwargs):
        """`fn(*args, **kwargs)`, its errors as HubError(s); a `check` (what start-up asks) gives up in time:
        within three read timeouts (pico.hf_http.deadline)."""
        try:
            with deadline() if check else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except Exception as e:  # huggingface_hub raises many types; _translate keeps what it knows
            raise _translate(e, where) from None

    def create_repo(self, repo_id: str, private: bool) -> None:
        """Create model repo `repo_id` unless it exists."""
        self._call(repo_id, self.api.create_repo, repo_id, private=private, exist_ok=True, check=True)

    def create_branch(self, repo_id: str, branch: str) -> None:
        """Create `branch` (from main) unless it exists."""
        where = f"{repo_id}@{branch}"
        self._call(where, self.api.create_branch, repo_id, branch=branch, exist_ok=True, check=True)

    def list_tags(self, repo_id: str) -> dict[str, str]:
        """Tag name → commit id."""
        refs = self._call(repo_id, self.api.list_repo_refs, repo_id, check=True)
        return {t.name: t.target_commit for t in refs.tags}

    def list_commits(self, repo_id: str, revision: str) -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        where = f"{repo_id}@{revision}"
        commits = self._call(where, self.api.list_repo_commits, repo_id, revision=revision, check=True)
        return [Commit(c.commit_id, c.title) for c in commits]

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        """Paths of the files at `revision`."""
        return self._call(f"{repo_id}@{revision}", self.api.list_repo_files, repo_id, revision=revision)

    def last_commits(self, repo_id: str, revision: str, folder: str) -> dict[str, str]:
        """Path → id of the commit that last changed it, for every file under `folder` at `revision`."""
        from huggingface_hub.hf_api import RepoFile

        def tree():
            listing = self.api.list_repo_tree(repo_id, folder, recursive=True, expand=True, revision=revision)
            return [entry for entry in listing if isinstance(entry, RepoFile)]

        files = self._call(f"{repo_id}@{revision}:{folder}", tree)
        return {f.path: f.last_commit.oid if f.last_commit else "" for f in files}

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
