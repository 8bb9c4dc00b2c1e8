"""paloma against perplexity(), the same results on 1 and 2 ranks (DDP, FSDP2), and evaluation.max_batches
meaning the same rows at any world size. Paloma's figures: test_paloma.py."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pico.config import EvaluationConfig
from pico.distributed import parallelize
from pico.evaluation import (
    TASKS,
    TaskSpec,
    evaluate_tasks,
    flat_metrics,
    load_tasks,
    perplexity,
    register_task,
    score_requests,
)
from pico.model import from_pretrained
from tests.distributed import run_distributed_test
from tests.evaluation.conftest import SEQ_LEN

PALOMA_LEN = SEQ_LEN  # rows of SEQ_LEN + 1 tokens
SOURCES = [
    "c4_en",
    "wikitext",
    "c4_en",
    "m2d2",
    "wikitext",
    "c4_en",
    "c4_en",
    "m2d2",
    "c4_en",
    "wikitext",
    "m2d2",
]


def write_paloma(folder, vocab_size: int, sources: bool) -> tuple[str, np.ndarray]:
    """Two shards of random token rows (fewer distinct ids for some sources), `source` column if asked."""
    rng, kinds = np.random.default_rng(0), sorted(set(SOURCES))
    ids = np.stack(
        [rng.integers(0, vocab_size >> 2 * kinds.index(s), PALOMA_LEN + 1) for s in SOURCES]
    )  # (N, T + 1)
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate((slice(0, 6), slice(6, None))):
        columns = {"input_ids": ids[rows].tolist()} | ({"source": SOURCES[rows]} if sources else {})
        pq.write_table(pa.table(columns), folder / f"part-{part}.parquet", row_group_size=4)
    return str(folder), ids


def reference_perplexity(model, ids: np.ndarray) -> dict:
    """perplexity() over the given rows, one row per batch."""
    rows = torch.from_numpy(ids)
    return perplexity(
        model, [(rows[i : i + 1, :-1], rows[i : i + 1, 1:]) for i in range(len(rows))], torch.device("cpu")
    )


def test_paloma_without_sources_is_todays_perplexity(workspace, tmp_path):
    model = from_pretrained(workspace["model_dir"])
    path, ids = write_paloma(tmp_path / "plain", model.config.vocab_size, sources=False)
    result = evaluate_tasks(
        model, load_tasks([TaskSpec("paloma", path)], None, PALOMA_LEN), torch.device("cpu")
    )
    expected = reference_perplexity(model, ids)
    assert result["paloma"]["tokens"] == expected["tokens"] == len(SOURCES) * PALOMA_LEN
    assert result["paloma"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert result["paloma"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert "sources" not in result["paloma"] and result["paloma"]["n"] == len(SOURCES)


def test_paloma_limit_takes_the_first_rows_in_file_order(workspace, tmp_path):
    model = from_pretrained(workspace["model_dir"])
    path, ids = write_paloma(tmp_path / "limit", model.config.vocab_size, sources=True)
    (task,) = load_tasks([TaskSpec("paloma", path, limit=7)], None, PALOMA_LEN)
    assert task.sources == SOURCES[:7]
    assert np.array_equal(np.stack([np.concatenate(r) for r in task.requests]), ids[:7])


def _capped(model_dir: str, paloma: str, world_size: int, expected: dict):
    """The recipe's path: the config's task specs, loaded and scored on this rank's share of the batches."""
    import torch.distributed as dist

    specs = EvaluationConfig(data=paloma, batch_size=3, max_batches=2).task_specs()
    model = parallelize(
        from_pretrained(model_dir), strategy="ddp", world_size=world_size, device=torch.device("cpu")
    )
    results = evaluate_tasks(model, load_tasks(specs, None, SEQ_LEN), torch.device("cpu"))
    assert dist.get_world_size() == world_size and results == expected


def test_max_batches_caps_the_same_rows_at_any_world_size(workspace, tmp_path):
    """evaluation.max_batches: 2 of batch_size 3 is the first 6 rows (of 11), on 1, 2 and 4 processes."""
    model = from_pretrained(workspace["model_dir"])
    path, ids = write_paloma(tmp_path / "capped", model.config.vocab_size, sources=False)
    specs = EvaluationConfig(data=path, batch_size=3, max_batches=2).task_specs()
    expected = evaluate_tasks(model, load_tasks(specs, None, SEQ_LEN), torch.device("cpu"))
    assert expected["paloma"]["n"] == 6 < len(ids)
    assert expected["paloma"]["loss"] == pytest.approx(reference_perplexity(model, ids[:6])["loss"], rel=1e-6)
    for world_size in (2, 4):
        run_distributed_test(
            _capped, world_size, args=(str(workspace["model_dir"]), path, world_size, expected)
        )


def specs(workspace, paloma: str) -> list[TaskSpec]:
    """Every task, batch sizes chosen so the ranks get unequal numbers of batches (dummy forwards)."""
    files = workspace["files"]
    names = ["blimp", "hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]
    return [TaskSpec(n, str(files[n]), batch_size=5) for n in names] + [
        TaskSpec("paloma", paloma, batch_size=4)
    ]


def _on_two_ranks(strategy: str, model_dir: str, task_specs: list[TaskSpec], expected: dict):
    import torch.distributed as dist

    tasks = load_tasks(task_specs, model_dir, SEQ_LEN)
    model = parallelize(
        from_pretrained(model_dir), strategy=strategy, world_size=2, device=torch.device("cpu")
    )
    results = evaluate_tasks(model, tasks, torch.device("cpu"))
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    assert gathered[0] == gathered[1], "ranks returned different results"
    assert flat_metrics(results) == pytest.approx(flat_metrics(expected), rel=1e-9, abs=1e-12)
    assert [r["n"] for r in results.values()] == [r["n"] for r in expected.values()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(workspace, tmp_path, strategy):
    model = from_pretrained(workspace["model_dir"])
    path, _ = write_paloma(tmp_path / "paloma", model.config.vocab_size, sources=True)
    task_specs = specs(workspace, path)
    expected = evaluate_tasks(
        model, load_tasks(task_specs, workspace["model_dir"], SEQ_LEN), torch.device("cpu")
    )
    assert len(expected) == 7 and math.isfinite(expected["paloma"]["perplexity"])
    run_distributed_test(_on_two_ranks, args=(strategy, str(workspace["model_dir"]), task_specs, expected))


class Copies:
    """A task of token ids outside pico: each document a row whose second half continues its first half."""

    def __init__(self, spec, seq_len):
        rows = np.random.default_rng(0).integers(0, 64, (spec.limit or 5, seq_len + 1))
        self.name, self.max_length, self.batch_size = spec.name, seq_len, spec.batch_size
        self.requests = [(row[: seq_len // 2], row[seq_len // 2 :]) for row in rows]

    def aggregate(self, lls):
        return {"mean_ll": float(lls.mean()), "n": len(self.requests)}


def test_a_registered_task_runs_like_the_built_in_ones(workspace):
    """The Task interface and the registry are the whole contract: a task registered from outside pico is
    validated, loaded without a tokenizer and scored by the one scorer, as paloma is."""
    register_task("copies", text=False)(lambda spec, encoder, seq_len, vocab_size: Copies(spec, seq_len))
    try:
        model = from_pretrained(workspace["model_dir"])
        (task,) = load_tasks([TaskSpec("copies", limit=6, batch_size=4)], None, SEQ_LEN)
        result = evaluate_tasks(model, [task], torch.device("cpu"))["copies"]
        lls = score_requests(model, task.requests, torch.device("cpu"), SEQ_LEN)
        assert result == {"mean_ll": float(lls.mean()), "n": 6} and lls.shape == (6,)
        with pytest.raises(ValueError, match="'copies' is already registered"):
            register_task("copies")(Copies)
    finally:
        del TASKS["copies"]
