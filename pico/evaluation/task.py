"""The one interface every evaluation task implements (`Task`), its configuration (`TaskSpec`), the one
registry of task names (`register_task`, `TASKS`) and their validation (`check_specs`), as
lm-evaluation-harness has one Task interface and one registry. Bad input raises `TaskError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from pico.errors import PicoError

if TYPE_CHECKING:
    from pico.evaluation.tokens import Encoder


class TaskError(PicoError, ValueError):
    """A task cannot be loaded or scored; the one-line message names the task, the file and the row."""

    kind = "evaluation error"


@dataclass
class TaskSpec:
    """One configured task: its name, a local file/directory or Hub id (default: the task's Hub dataset),
    the first `limit` documents (BLiMP: per paradigm) and the rows per forward (default: by token budget)."""

    name: str
    path: str | None = None
    limit: int | None = None
    batch_size: int | None = None


class Task(Protocol):
    """A loaded task: requests scored by log-likelihood (`pico.evaluation.score_requests`), and its metrics.

    A request is (context ids, continuation ids), 1 ≤ len(continuation) ≤ `max_length`; the model sees at
    most `max_length` + 1 tokens of it, `batch_size` rows per forward (None: by token budget).
    """

    name: str
    requests: list[tuple[np.ndarray, np.ndarray]]
    max_length: int
    batch_size: int | None

    def aggregate(self, lls: torch.Tensor) -> dict:
        """The metrics (and `n`, the documents scored) from each request's log-likelihood (R,), in order."""
        ...


# load(spec, encoder, seq_len, vocab_size) -> Task: reads, validates and tokenizes the documents (a TaskError
# names the file and row), checking token ids against `vocab_size` when given; `encoder` is None for a task
# of token ids.
Loader = Callable[[TaskSpec, "Encoder | None", int, "int | None"], Task]


@dataclass(frozen=True)
class RegisteredTask:
    """A registered task: its loader, and whether its documents are text (it needs a tokenizer)."""

    load: Loader
    text: bool


TASKS: dict[str, RegisteredTask] = {}


def register_task(name: str, *, text: bool = True):
    """Decorator registering `load(spec, encoder, seq_len, vocab_size) -> Task` as task `name`; `text=False`
    for documents of token ids, which need no tokenizer (the loader gets encoder None)."""

    def decorator(load: Loader) -> Loader:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered (by {TASKS[name].load.__module__})")
        TASKS[name] = RegisteredTask(load, text)
        return load

    return decorator


def check_specs(specs: list[TaskSpec], keys: list[str] | None = None) -> None:
    """Raise a TaskError unless every task is registered and listed once, with limit and batch_size ≥ 1.

    `keys` name where each spec came from (a config key, an option), to start the message; default: the
    task names.
    """
    keys = keys or [spec.name for spec in specs]
    first: dict[str, str] = {}  # task name -> the key that listed it first
    for key, spec in zip(keys, specs, strict=True):
        if spec.name not in TASKS:
            raise TaskError(f"{key}: unknown task {spec.name!r} (known: {', '.join(TASKS)})")
        if spec.name in first:
            also = "" if first[spec.name] == key else f" (also {first[spec.name]})"
            raise TaskError(f"{key}: task {spec.name!r} is listed twice{also}")
        first[spec.name] = key
        for field in ("limit", "batch_size"):
            value = getattr(spec, field)
            if value is not None and value < 1:
                raise TaskError(f"{key}: {field} must be ≥ 1, got {value}")
