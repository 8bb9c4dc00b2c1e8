"""A local stand-in for the Hugging Face Hub — NOT the Hub: it implements exactly the calls of `pico.hub.Hub`
on a directory (repos, branches, commits with titles, tags, files per revision), so that uploading, resuming
and analysis are tested without a network. The live test (test_live.py) runs the same round trip on the Hub.

Faults are set in `<root>/faults.json`, read at every call, so that they reach a recipe run in a subprocess:
`offline` (every call raises HubUnavailable), `forbidden` (repo ids whose calls raise HubError),
`fail` ({call: n}: the next n such calls raise HubUnavailable), `kill_after_commit` (a step: SIGKILL the
process once that step's commit has landed, before the call returns). Every call is appended to
`<root>/calls.jsonl` with its wall-clock time, downloads with the files they returned.
"""

import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from pico.hub import Commit, HubError, HubUnavailable


class LocalHub:
    """The stand-in: the methods of pico.hub.Hub, on `root`."""

    def __init__(self, root):
        self.root = Path(root)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _faults(self) -> dict:
        path = self.root / "faults.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _log(self, call: str, **info) -> None:
        with open(self.root / "calls.jsonl", "a") as f:
            f.write(json.dumps({"call": call, "time": time.time(), **info}) + "\n")

    def _enter(self, call: str, repo_id: str, **info) -> None:
        self._log(call, repo=repo_id, **info)
        faults = self._faults()
        if faults.get("offline"):
            raise HubUnavailable(f"{repo_id}: Hub unreachable (stand-in offline)")
        if repo_id in faults.get("forbidden", []):
            raise HubError(f"{repo_id}: not allowed (HTTP 403; is HF_TOKEN set with write access?)")
        left = faults.get("fail", {}).get(call, 0)
        if left:
            faults["fail"][call] = left - 1
            (self.root / "faults.json").write_text(json.dumps(faults))
            raise HubUnavailable(f"{repo_id}: the Hub did not answer (stand-in failure, {left - 1} more)")

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id.replace("/", "--")

    def _load(self, repo_id: str) -> dict:
        path = self._repo_dir(repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(f"{repo_id}: repository not found, or no permission to access it")
        return json.loads(path.read_text())

    def _save(self, repo_id: str, repo: dict) -> None:  # atomic: a commit lands whole or not at all
        path = self._repo_dir(repo_id) / "repo.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo))
        os.replace(tmp, path)

    def _resolve(self, repo: dict, repo_id: str, revision: str) -> str:
        for refs in (repo["branches"], repo["tags"]):
            if revision in refs:
                return refs[revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(f"{repo_id}@{revision}: no such revision")

    def _new_commit(self, repo: dict, parent: str | None, title: str, files: dict) -> str:
        commit = uuid.uuid4().hex + "00000000"
        repo["commits"][commit] = {"parent": parent, "title": title, "files": files}
        return commit

    # --- the calls of pico.hub.Hub -----------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool) -> None:
        self._enter("create_repo", repo_id, private=private)
        if (self._repo_dir(repo_id) / "repo.json").is_file():
            return
        (self._repo_dir(repo_id) / "blobs").mkdir(parents=True)
        repo = {"private": private, "branches": {}, "tags": {}, "commits": {}}
        blob = self._blob(repo_id, b"*.safetensors filter=lfs\n")
        repo["branches"]["main"] = self._new_commit(repo, None, "initial commit", {".gitattributes": blob})
        self._save(repo_id, repo)

    def create_branch(self, repo_id: str, branch: str) -> None:
        self._enter("create_branch", repo_id, branch=branch)
        repo = self._load(repo_id)
        repo["branches"].setdefault(branch, repo["branches"]["main"])
        self._save(repo_id, repo)

    def list_tags(self, repo_id: str) -> dict[str, str]:
        self._enter("list_tags", repo_id)
        return dict(self._load(repo_id)["tags"])

    def list_commits(self, repo_id: str, revision: str) -> list[Commit]:
        self._enter("list_commits", repo_id, revision=revision)
        repo = self._load(repo_id)
        commit, out = self._resolve(repo, repo_id, revision), []
        while commit is not None:
            out.append(Commit(commit, repo["commits"][commit]["title"]))
            commit = repo["commits"][commit]["parent"]
        return out

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        self._enter("list_files", repo_id, revision=revision)
        repo = self._load(repo_id)
        return sorted(repo["commits"][self._resolve(repo, repo_id, revision)]["files"])

    def last_commits(self, repo_id: str, revision: str, folder: str) -> dict[str, str]:
        self._enter("last_commits", repo_id, revision=revision, folder=folder)
        repo = self._load(repo_id)
        start, commits = self._resolve(repo, repo_id, revision), repo["commits"]
        out = {}
        for path, blob in commits[start]["files"].items():
            if not path.startswith(folder.rstrip("/") + "/"):
                continue
            commit = start  # walk back while the parent holds the same blob: git's "last changed by"
            while commits[commit]["parent"] and commits[commits[commit]["parent"]]["files"].get(path) == blob:
                commit = commits[commit]["parent"]
            out[path] = commit
        return out

    def _blob(self, repo_id: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self._repo_dir(repo_id) / "blobs" / sha).write_bytes(data)
        return sha

    def create_commit(self, repo_id: str, branch: str, message: str, add: dict, delete: list) -> str:
        self._enter("create_commit", repo_id, branch=branch, message=message, add=sorted(add), delete=delete)
        repo = self._load(repo_id)
        parent = self._resolve(repo, repo_id, branch)
        files = dict(repo["commits"][parent]["files"])
        for path in delete:
            files.pop(path, None)
        for path, local in add.items():
            files[path] = self._blob(repo_id, Path(local).read_bytes())
        repo["branches"][branch] = commit = self._new_commit(repo, parent, message, files)
        self._save(repo_id, repo)
        if message == f"step {self._faults().get('kill_after_commit')}":
            os.kill(os.getpid(), signal.SIGKILL)
        return commit

    def create_tag(self, repo_id: str, tag: str, revision: str) -> None:
        self._enter("create_tag", repo_id, tag=tag, revision=revision)
        repo = self._load(repo_id)
        repo["tags"].setdefault(tag, self._resolve(repo, repo_id, revision))
        self._save(repo_id, repo)

    def download(self, repo_id: str, revision: str, allow_patterns: list[str]):
        self._enter("download", repo_id, revision=revision, allow_patterns=allow_patterns)
        repo = self._load(repo_id)
        commit = self._resolve(repo, repo_id, revision)
        files = repo["commits"][commit]["files"]
        chosen = sorted(filter_repo_objects(list(files), allow_patterns=allow_patterns))
        folder = self.root / "cache" / repo_id.replace("/", "--") / commit
        for path in chosen:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._repo_dir(repo_id) / "blobs" / files[path], folder / path)
        folder.mkdir(parents=True, exist_ok=True)
        self._log("downloaded", repo=repo_id, revision=revision, files=chosen)
        return folder

    # --- for the tests' assertions -----------------------------------------------------------------------
    def calls(self, name: str | None = None) -> list[dict]:
        """The logged calls (of one name)."""
        path = self.root / "calls.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [c for c in map(json.loads, lines) if name is None or c["call"] == name]

    def set_faults(self, **faults) -> None:
        """Replace the faults every later call sees."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "faults.json").write_text(json.dumps(faults))

    def repo(self, repo_id: str) -> dict:
        """The stored repo: branches, tags, commits."""
        return self._load(repo_id)

    def delete_tag(self, repo_id: str, tag: str) -> None:
        """Remove `tag`."""
        repo = self._load(repo_id)
        del repo["tags"][tag]
        self._save(repo_id, repo)

    def add_commit(self, repo_id: str, branch: str, title: str, files: dict[str, bytes]) -> str:
        """Commit `files` (path → bytes) on `branch` with `title` directly, as another writer would."""
        self.create_repo(repo_id, private=False)
        self.create_branch(repo_id, branch)
        repo = self._load(repo_id)
        parent = repo["branches"][branch]
        tree = dict(repo["commits"][parent]["files"])
        tree.update({path: self._blob(repo_id, data) for path, data in files.items()})
        repo["branches"][branch] = commit = self._new_commit(repo, parent, title, tree)
        self._save(repo_id, repo)
        return commit
