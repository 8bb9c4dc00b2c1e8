"""Evaluation at checkpoints: perplexity, and downstream tasks scored as lm-evaluation-harness scores them."""

from pico.evaluation.paloma import PalomaTask, perplexity
from pico.evaluation.scorer import score_requests
from pico.evaluation.suite import (
    TASK_NAMES,
    TaskSpec,
    evaluate_tasks,
    flat_metrics,
    format_results,
    load_tasks,
)
from pico.evaluation.tasks import ChoiceTask
from pico.evaluation.tokens import Encoder, TaskError, load_encoder

__all__ = [
    "TASK_NAMES",
    "ChoiceTask",
    "Encoder",
    "PalomaTask",
    "TaskError",
    "TaskSpec",
    "evaluate_tasks",
    "flat_metrics",
    "format_results",
    "load_encoder",
    "load_tasks",
    "perplexity",
    "score_requests",
]
