"""Evaluation at checkpoints: perplexity, and downstream tasks scored as lm-evaluation-harness scores them.

Every task implements one interface (`Task`) and is found by name in one registry (`TASKS`,
`register_task`): paloma (token ids) and the multiple-choice text tasks alike.
"""

from pico.evaluation.choice import CHOICE_TASKS, ChoiceTask
from pico.evaluation.paloma import PalomaTask, perplexity
from pico.evaluation.scorer import score_requests
from pico.evaluation.suite import evaluate_tasks, flat_metrics, format_results, load_tasks
from pico.evaluation.task import TASKS, Task, TaskError, TaskSpec, check_specs, register_task
from pico.evaluation.tokens import Encoder, load_encoder

__all__ = [
    "CHOICE_TASKS",
    "TASKS",
    "ChoiceTask",
    "Encoder",
    "PalomaTask",
    "Task",
    "TaskError",
    "TaskSpec",
    "check_specs",
    "evaluate_tasks",
    "flat_metrics",
    "format_results",
    "load_encoder",
    "load_tasks",
    "perplexity",
    "register_task",
    "score_requests",
]
