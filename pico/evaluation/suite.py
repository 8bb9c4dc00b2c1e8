"""The task suite: configure (TaskSpec), load and validate before training (load_tasks), run them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from pico.evaluation.paloma import PalomaTask, load_paloma
from pico.evaluation.scorer import score_requests
from pico.evaluation.tasks import TASKS, ChoiceTask, load_choice_task
from pico.evaluation.tokens import TaskError, load_encoder

TASK_NAMES = ("paloma", *TASKS)


@dataclass
class TaskSpec:
    """One configured task: its name, a local file/directory or Hub id (default: the task's Hub dataset),
    the first `limit` documents (BLiMP: per paradigm) and the rows per forward (default: by token budget)."""

    name: str
    path: str | None = None
    limit: int | None = None
    batch_size: int | None = None


def load_tasks(
    specs: list[TaskSpec],
    tokenizer: Tokenizer | str | Path | None,
    seq_len: int,
    vocab_size: int | None = None,
) -> list[PalomaTask | ChoiceTask]:
    """Read, validate and tokenize every task's documents; a problem raises a one-line TaskError (ValueError).

    `tokenizer` is a `tokenizers.Tokenizer`, a tokenizer.json or a model dir with one (paloma needs none);
    `seq_len` is the longest input the model takes (paloma's rows hold seq_len + 1 tokens); with
    `vocab_size`, a token id the model has no embedding for is an error naming the task.
    """
    names = [spec.name for spec in specs]
    for spec in specs:
        if spec.name not in TASK_NAMES:
            raise TaskError(f"unknown task {spec.name!r} (known: {', '.join(TASK_NAMES)})")
        if names.count(spec.name) > 1:
            raise TaskError(f"{spec.name}: task listed more than once")
        for key in ("limit", "batch_size"):
            if getattr(spec, key) is not None and getattr(spec, key) < 1:
                raise TaskError(f"{spec.name}: {key} must be ≥ 1, got {getattr(spec, key)}")
    encoder = None
    if any(name != "paloma" for name in names):
        if tokenizer is None:
            raise TaskError(
                f"{', '.join(n for n in names if n != 'paloma')}: need a tokenizer (tokenizer.json)"
            )
        encoder = load_encoder(tokenizer)
    tasks = [
        load_paloma(spec.path, seq_len, spec.limit, spec.batch_size, vocab_size)
        if spec.name == "paloma"
        else load_choice_task(spec.name, spec.path, spec.limit, spec.batch_size, encoder, seq_len)
        for spec in specs
    ]
    for task in tasks:
        top = max((int(ids.max()) for pair in task.requests for ids in pair if len(ids)), default=-1)
        if vocab_size is not None and top >= vocab_size:
            raise TaskError(f"{task.name}: token id {top} is outside the model's vocabulary of {vocab_size}")
    return tasks


def evaluate_tasks(
    model: torch.nn.Module,
    tasks: list[PalomaTask | ChoiceTask],
    device: torch.device,
    precision: str = "fp32",
    catch: bool = False,
) -> dict[str, dict]:
    """{task: metrics} of every loaded task; a collective under torch.distributed, same dict on all ranks.

    With `catch`, a task that raises is recorded as {"error": message} and the others still run (training
    goes on past a failed evaluation); the failure must be the same on every rank, as errors of the
    documents or the model are.
    """
    results = {}
    for task in tasks:
        try:
            lls = score_requests(model, task.requests, device, task.max_length, task.batch_size, precision)
            results[task.name] = task.aggregate(lls)
        except Exception as e:
            if not catch:
                raise
            results[task.name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Scalars for tensorboard: eval/<task>/<metric> and eval/<task>/<subset or field>/<metric>, no counts."""

    def numbers(prefix: str, metrics: dict) -> dict[str, float]:
        return {
            f"{prefix}/{k}": float(v)
            for k, v in metrics.items()
            if k not in ("n", "tokens") and isinstance(v, (int, float))
        }

    flat = {}
    for task, metrics in results.items():
        flat.update(numbers(f"eval/{task}", metrics))
        for group in ("subsets", "fields"):
            for name, sub in metrics.get(group, {}).items():
                flat.update(numbers(f"eval/{task}/{name}", sub))
    return flat


def format_results(results: dict[str, dict]) -> list[str]:
    """One console line per task: its headline metrics and document count."""
    lines = []
    for task, metrics in results.items():
        if "error" in metrics:  # a task that failed at this checkpoint
            lines.append(f"{task:<15} | failed: {metrics['error']}")
            continue
        shown = [f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("n", "tokens", "subsets", "fields")]
        lines.append(f"{task:<15} | {' | '.join(shown)} | n {metrics['n']}")
    return lines
