"""The task suite: load and validate every configured task before training (load_tasks), run them
(evaluate_tasks), and show their results (flat_metrics, format_results)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from pico.evaluation.scorer import score_requests
from pico.evaluation.task import TASKS, Task, TaskError, TaskSpec, check_specs
from pico.evaluation.tokens import load_encoder


def load_tasks(
    specs: list[TaskSpec],
    tokenizer: Tokenizer | str | Path | None,
    seq_len: int,
    *,
    vocab_size: int | None = None,
    keys: list[str] | None = None,
) -> list[Task]:
    """Check the specs (`check_specs`, `keys` naming where each came from), then read, validate and tokenize
    every task's documents with its registered loader; a problem raises a one-line TaskError (ValueError).

    `tokenizer` is a `tokenizers.Tokenizer`, a tokenizer.json or a model dir with one; text tasks need it,
    tasks of token ids get it too when given (paloma decodes its scored tokens for bits per byte). `seq_len`
    is the longest input the model takes; with `vocab_size`, a token id the model has no embedding for is an
    error naming the task.
    """
    check_specs(specs, keys)
    text = [spec.name for spec in specs if TASKS[spec.name].text]
    if text and tokenizer is None:
        raise TaskError(f"{', '.join(text)}: need a tokenizer (tokenizer.json)")
    encoder = None if tokenizer is None else load_encoder(tokenizer)
    return [TASKS[spec.name].load(spec, encoder, seq_len, vocab_size) for spec in specs]


def evaluate_tasks(
    model: torch.nn.Module,
    tasks: list[Task],
    device: torch.device,
    *,
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


COUNTS = ("n", "tokens", "documents")  # counts of what was scored, not metrics
GROUPS = ("subsets", "fields", "sources")  # per-subset breakdowns: BLiMP paradigms and fields, Paloma sources


def _numbers(metrics: dict) -> dict[str, float]:
    """The metrics that are numbers (a stderr of None, counts and breakdowns left out)."""
    return {k: v for k, v in metrics.items() if k not in COUNTS and isinstance(v, (int, float))}


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Scalars for tensorboard: eval/<task>/<metric> and eval/<task>/<subset, field or source>/<metric>, no
    counts."""
    flat = {}
    for task, metrics in results.items():
        flat.update({f"eval/{task}/{k}": float(v) for k, v in _numbers(metrics).items()})
        for group in GROUPS:
            for name, sub in metrics.get(group, {}).items():
                flat.update({f"eval/{task}/{name}/{k}": float(v) for k, v in _numbers(sub).items()})
    return flat


def format_results(results: dict[str, dict]) -> list[str]:
    """One console line per task: its headline metrics (± their stderr) and document count."""
    lines = []
    for task, metrics in results.items():
        if "error" in metrics:  # a task that failed at this checkpoint
            lines.append(f"{task:<15} | failed: {metrics['error']}")
            continue
        numbers = _numbers(metrics)
        shown = [
            f"{k} {v:.4f}" + (f" ± {numbers[k + '_stderr']:.4f}" if k + "_stderr" in numbers else "")
            for k, v in numbers.items()
            if not k.endswith("_stderr")
        ]
        lines.append(f"{task:<15} | {' | '.join(shown)} | n {metrics['n']}")
    return lines
