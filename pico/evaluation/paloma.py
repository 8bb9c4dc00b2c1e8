"""Perplexity on a pretokenized eval set: `perplexity` over batches, and the `paloma` task (per source),
registered as a task of token ids (it needs no tokenizer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pico.data.shards import DataError, RowGroupReader, build_index
from pico.distributed import all_reduce_sum, autocast, reshard
from pico.evaluation.task import TaskError, TaskSpec, register_task
from pico.evaluation.tokens import Encoder

DEFAULT_DATASET = "pico-lm/pretokenized-paloma-tinsy"
SOURCE_COLUMNS = ("source", "domain", "subdomain")  # preferred names when several string columns exist


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches, device: torch.device, precision: str = "fp32") -> dict:
    """Token-level perplexity over `batches` of (inputs, labels), each rank feeding its own shard.

    Every rank must receive the same number of batches (FSDP gathers weights in each forward).
    Returns {"loss": mean nats/token, "perplexity": exp(loss), "tokens": tokens scored over all ranks}.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, token count)
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast(precision, device, model):
            logits = model(inputs)  # (B, T, V)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").double()
        totals[1] += labels.numel()
    reshard(model)
    all_reduce_sum(totals)
    if totals[1] == 0:
        raise TaskError("perplexity: no eval batches reached the model")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals[1].item())}


def _source_column(index) -> str | None:
    """The string column naming each row's source in every shard (preferring SOURCE_COLUMNS), else None."""
    schemas = [md.schema.to_arrow_schema() for md in index.metadata]
    names = [f.name for f in schemas[0] if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not names:
        return None
    name = next((n for n in SOURCE_COLUMNS if n in names), names[0])
    for file, schema in enumerate(schemas):
        if name not in schema.names:
            raise TaskError(
                f"paloma: {index.name(file)}: no source column {name!r} (the first shard has one)"
            )
    return name


def _sources(index, name: str, rows: int) -> list[str]:
    """The source of each of the first `rows` rows, in file order; a null source raises naming its row."""
    sources = []
    for file in range(len(index.files)):
        if len(sources) >= rows:
            break
        with index.fs.open(index.files[file], "rb") as handle:
            column = pq.read_table(handle, columns=[name]).column(0).to_pylist()
        for row, value in enumerate(column):
            if value is None:
                raise TaskError(f"paloma: {index.name(file)} row {row}: null {name!r}")
        sources += column
    return sources[:rows]


@dataclass
class PalomaTask:
    """Rows of seq_len + 1 tokens, each scored as continuation row[1:] given row[:1]; optional sources."""

    source: str
    requests: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    sources: list[str] | None
    max_length: int
    batch_size: int | None = None
    name: str = "paloma"

    def aggregate(self, lls: torch.Tensor) -> dict:
        """loss/perplexity over all tokens; with sources, per source and their macro average (Paloma)."""
        tokens = np.array([len(c) for _, c in self.requests], dtype=np.float64)  # (R,)
        nll = -lls.numpy()  # (R,)

        def summary(rows) -> dict:
            loss = float(nll[rows].sum() / tokens[rows].sum())
            return {
                "loss": loss,
                "perplexity": math.exp(loss),
                "tokens": int(tokens[rows].sum()),
                "n": len(rows),
            }

        result = summary(np.arange(len(nll)))
        if self.sources is None:
            return result
        names = np.array(self.sources)
        subsets = {s: summary(np.flatnonzero(names == s)) for s in sorted(set(self.sources))}
        result["loss"] = float(np.mean([s["loss"] for s in subsets.values()]))
        result["perplexity"] = float(np.mean([s["perplexity"] for s in subsets.values()]))
        return {**result, "subsets": subsets}


@register_task("paloma", text=False)
def load_paloma(
    spec: TaskSpec, encoder: Encoder | None, seq_len: int, vocab_size: int | None = None
) -> PalomaTask:
    """The first `spec.limit` rows (all without one) of a pretokenized parquet eval set, with their sources;
    rows are checked like training data (length seq_len + 1, ids below `vocab_size`). `encoder`: unused."""
    path, limit = spec.path or DEFAULT_DATASET, spec.limit
    try:
        index = build_index(path)
        reader, rows, have = RowGroupReader(index, seq_len + 1, vocab_size), [], 0
        wanted = index.num_samples if limit is None else min(limit, index.num_samples)
        for g in range(len(index.rg_rows)):
            if have >= wanted:
                break
            rows.append(reader.read(g)[: wanted - have])
            have += len(rows[-1])
        reader.close()
    except DataError as e:
        raise TaskError(f"paloma: {e}") from e
    ids = np.concatenate(rows).astype(np.int64)  # (N, seq_len + 1)
    column = _source_column(index)
    sources = None if column is None else _sources(index, column, len(ids))
    return PalomaTask(path, [(row[:1], row[1:]) for row in ids], sources, seq_len, spec.batch_size)
