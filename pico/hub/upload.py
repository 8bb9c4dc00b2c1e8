"""Uploading a run's checkpoint steps while it trains: the journal `checkpoints/hub.json` and `Uploader`.

Two threads share an Uploader. The main thread (and the checkpoint writer's thread, which publishes steps)
only sends notes — a step was published, or finish — through one queue, and reads the worker's status under
a lock. The worker alone talks to the Hub and writes the journal. The upload queue itself is on disk: the
published `step_<N>/` the journal does not list (docs/hub.md).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

from pico.distributed import is_main
from pico.hub import api
from pico.hub.api import Hub, HubError, HubUnavailable, default_branch, step_tag, steps_on_branch
from pico.manifest import verified_files
from pico.run_dir import (
    CONFIG,
    DATA_FINGERPRINT,
    DYNAMICS,
    EVAL,
    HUB_JOURNAL,
    MANIFEST,
    MODEL,
    RUN_RECORD,
    STATE,
    CheckpointError,
    checkpoints_dir,
    list_steps,
    step_dir,
    step_name,
    write_atomic,
)

DRAIN_TIMEOUT = 3600.0  # seconds the end of training waits for pending uploads
MAX_DELAY = 60.0  # longest pause between two upload attempts
DRAIN_ATTEMPTS = 3  # at the end, consecutive attempts that find the Hub unreachable before giving up
PROGRESS_EVERY = 10.0  # seconds between the progress lines of the end-of-training wait
_PUBLISHED, _FINISH = "published", "finish"  # the notes the worker receives


def read_journal(run_dir, target: str) -> dict[int, str]:
    """Step → commit id of the steps the journal records as on the Hub at `target` (`<repo_id>@<branch>`)."""
    path = checkpoints_dir(run_dir) / HUB_JOURNAL
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text()).get(target, {})
        journal = {int(step): commit for step, commit in entries.items()}
        if not all(isinstance(commit, str) for commit in journal.values()):
            raise TypeError("a commit id is not a string")
    except (OSError, ValueError, AttributeError, TypeError) as e:  # ValueError: bad JSON, a step not a number
        raise HubError(
            f"{path}: not a pico hub journal ({type(e).__name__}: {e}); delete it and the uploader finds the "
            "steps on the Hub again"
        ) from None
    return journal


def _write_journal(run_dir, target: str, uploaded: dict[int, str]) -> None:
    path = checkpoints_dir(run_dir) / HUB_JOURNAL
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[target] = {str(s): uploaded[s] for s in sorted(uploaded)}
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def published_steps(run_dir) -> list[int]:
    """The published steps of a run directory (those with `state/`), ascending; none before the first."""
    if not any(checkpoints_dir(run_dir).glob(f"step_*/{STATE}")):
        return []
    return list_steps(run_dir, require=STATE)


def step_files(run_dir, step: int, upload_state: bool) -> dict[str, Path]:
    """What the commit of step N holds: path in repo → local file (model/ files at the repo root, the run's
    config.yaml, run.json and data_fingerprint.json beside them). Only a complete step whose files match its
    manifest is uploaded (`pico.manifest.verified_files`); otherwise a CheckpointError names the file at
    fault."""
    files = {}
    for name, local in verified_files(step_dir(run_dir, step)).items():
        part = name.split("/")[0]
        if part == MODEL:
            files[name.removeprefix(f"{MODEL}/")] = local
        elif part in (DYNAMICS, EVAL, MANIFEST) or (part == STATE and upload_state):
            files[name] = local
    for name in (CONFIG, RUN_RECORD, DATA_FINGERPRINT):  # the run's config, recipe and data records
        if (Path(run_dir) / name).is_file():
            files[name] = Path(run_dir) / name
    return files


def _stale(files: list[str], keep: dict[str, Path]) -> list[str]:
    """Files at the branch head that describe another step and are not overwritten by this one."""
    ours = (f"{DYNAMICS}/", f"{STATE}/")
    return [f for f in files if f not in keep and (f.startswith(ours) or f in (EVAL, MANIFEST))]


class Uploader:
    """Uploads the run's published steps in a background thread; a disabled one (no repo, rank > 0) is a
    no-op. Pending steps are the published `step_<N>/` not yet in the journal, so nothing queued is lost
    when the process dies, and a step is never committed twice (the branch's commits are checked first).
    After a failed attempt the worker waits `backoff` s, doubling up to MAX_DELAY, whatever is published."""

    def __init__(
        self,
        run_dir,
        repo_id: str | None,
        *,
        branch: str | None = None,
        private: bool = True,
        upload_state: bool = True,
        backoff: float = 1.0,
        echo=print,
    ):
        self.run_dir, self.repo_id = Path(run_dir), repo_id
        self.branch = branch or default_branch(self.run_dir)
        self.private, self.upload_state, self.backoff, self.echo = private, upload_state, backoff, echo
        self._notes = queue.SimpleQueue()  # main thread and writer thread → worker: _PUBLISHED, _FINISH
        self._lock = threading.Lock()  # guards _status: the worker writes it, the main thread reads it
        self._status = {"error": None, "busy": None, "connected": False}
        self._worker: threading.Thread | None = None
        self._remote: dict[int, str] | None = None  # the worker's: step → commit on the branch (once known)
        self._tags: set[str] = set()  # the worker's: the repo's tags, once connected
        self._refused: set[int] = set()  # the worker's: steps that are incomplete or damaged (not uploaded)

    @property
    def target(self) -> str:
        """`<repo_id>@<branch>`."""
        return f"{self.repo_id}@{self.branch}"

    @property
    def enabled(self) -> bool:
        """True on rank 0 of a run with `checkpointing.hub.repo_id` set."""
        return self.repo_id is not None and is_main()

    @property
    def error(self) -> Exception | None:
        """The error of the last attempt, None after a success."""
        with self._lock:  # NOTE: the worker may be writing it
            return self._status["error"]

    def _report(self, **status) -> None:
        with self._lock:  # NOTE: the main thread reads these for finish()'s lines and the CLI
            self._status.update(status)

    def pending(self) -> list[int]:
        """Published steps of the run directory not yet on the Hub, ascending. Either thread may ask: the
        journal is replaced atomically, so a reader sees it before or after an upload, never half-written."""
        done = read_journal(self.run_dir, self.target)
        return [s for s in published_steps(self.run_dir) if s not in done]

    def start(self) -> Uploader:
        """Check the repo (creating it and the branch), then start the worker. Permission or bad-repo errors
        raise HubError now, before step 0; an unreachable Hub only warns and the worker keeps trying."""
        if not self.enabled:
            return self
        self.pending()  # a journal that cannot be read is refused now, not by the worker mid-run
        hub = api.connect()
        try:
            self._connect(hub)
        except HubUnavailable as e:
            self._report(error=e)
            self.echo(f"hub: warning: {e}; training goes on and uploads wait for the network")
        self._worker = threading.Thread(target=self._work, args=(hub,), name="pico-hub-upload", daemon=True)
        self._worker.start()
        return self

    def enqueue(self, step: int) -> None:
        """Step N is published (`step_<N>/` renamed into place): tell the worker. Never blocks; any thread."""
        if self.enabled:
            self._notes.put(_PUBLISHED)

    def finish(self, timeout: float = DRAIN_TIMEOUT) -> list[int]:
        """Wait for the pending uploads (a progress line every 10 s, at most `timeout` s; DRAIN_ATTEMPTS
        attempts in a row that find the Hub unreachable end the wait); print what is left with the command
        that retries it. Returns those steps."""
        if not self.enabled or self._worker is None:
            return []
        self._notes.put(_FINISH)
        deadline = time.monotonic() + timeout
        while self._worker.is_alive() and (remaining := deadline - time.monotonic()) > 0:
            # NOTE: joined in slices, to print progress while the worker drains and to stop at the deadline
            self._worker.join(timeout=min(PROGRESS_EVERY, remaining))
            if self._worker.is_alive():
                with self._lock:  # NOTE: the worker updates the step it is on
                    busy = self._status["busy"]
                count = len(self.pending())
                self.echo(f"hub: {count} step(s) left to upload to {self.target} (step {busy} now)")
        left = self.pending()
        with self._lock:  # NOTE: the worker may still run, past the deadline
            error, connected = self._status["error"], self._status["connected"]
        if left:
            why = f" ({error})" if error else ""
            self.echo(
                f"hub: steps {left} are not on {self.target} yet{why}; retry with: "
                f"python -m pico.hub upload {self.run_dir} --repo-id {self.repo_id} --branch {self.branch}"
            )
        elif connected:
            self.echo(f"hub: every step is on {self.target}")
        return left

    def _connect(self, hub: Hub) -> None:
        """Create repo and branch if needed and learn which steps are on the branch already."""
        hub.create_repo(self.repo_id, self.private)
        hub.create_branch(self.repo_id, self.branch)
        self._remote = steps_on_branch(hub.list_commits(self.repo_id, self.branch))
        self._tags = set(hub.list_tags(self.repo_id))
        self._report(connected=True)

    def _upload(self, hub: Hub, step: int) -> None:
        """Commit step N (unless the branch has it), tag it, and record it in the journal."""
        if self._remote is None:
            self._connect(hub)
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
        """The worker: upload pending steps oldest first; end when finish() was called and none is left."""
        delay, failures, finishing = self.backoff, 0, False
        while True:
            finishing |= _FINISH in self._receive(0)  # the notes so far: the disk below shows their steps
            todo = [step for step in self.pending() if step not in self._refused]
            if not todo:
                if finishing:
                    return
                finishing |= _FINISH in self._receive(None)
                continue
            self._report(busy=todo[0])
            try:
                self._upload(hub, todo[0])
            except CheckpointError as e:  # incomplete or damaged: never uploaded, and the others go on
                self._refused.add(todo[0])
                self._report(error=e, busy=None)
                self.echo(f"hub: {step_name(todo[0])} is not uploaded: {e}")
            except Exception as e:  # an upload never stops training: HubError(s), or a local file gone
                self._remote = None  # reconnect: the failed commit may have landed
                self._report(error=e, busy=None)
                failures += 1
                if finishing and isinstance(e, HubUnavailable) and failures >= DRAIN_ATTEMPTS:
                    return  # draining with the Hub unreachable: report now rather than wait an hour
                finishing |= self._back_off(delay)
                delay = min(2 * delay, MAX_DELAY)
            else:
                delay, failures = self.backoff, 0
                self._report(error=None, busy=None)

    def _receive(self, timeout: float | None) -> set[str]:
        """The notes sent to the worker: wait up to `timeout` s (None: as long as it takes, 0: not at all)
        for the first, then take all the others queued, so that none wakes the worker again."""
        notes = set()
        try:
            # NOTE: blocks for at most `timeout`; the idle worker (None) until a step is published or finish()
            notes.add(self._notes.get(block=timeout != 0, timeout=timeout or None))
            while True:
                notes.add(self._notes.get_nowait())
        except queue.Empty:  # the queue is empty: every note sent so far is taken
            pass
        return notes

    def _back_off(self, delay: float) -> bool:
        """Wait `delay` s after a failed attempt; True when finish() was called meanwhile, which ends the
        wait. A step published meanwhile does not: it waits on disk for the next attempt."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if _FINISH in self._receive(left):  # NOTE: a timed wait: this is the backoff
                return True
        return False


def start_uploader(run_dir, hub_config) -> Uploader:
    """The uploader of `checkpointing.hub`, started (a no-op one when repo_id is unset or on rank > 0)."""
    c = hub_config
    return Uploader(
        run_dir, c.repo_id, branch=c.branch, private=c.private, upload_state=c.upload_state
    ).start()
