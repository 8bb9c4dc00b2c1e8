"""Perplexity on a pretokenized eval set: `perplexity` over batches, and the `paloma` task (token-level
perplexity, per source and their macro average, bits per byte), registered as a task of token ids: it needs
no tokenizer, and uses one when given to count the bytes its tokens decode to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pico.data.shards import COLUMN, DataError, RowGroupReader, build_index
from pico.distributed import all_reduce_sum, autocast, reshard
from pico.evaluation.task import TaskError, TaskSpec, register_task
from pico.evaluation.tokens import Encoder

DEFAULT_DATASET = "pico-lm/pretokenized-paloma-tinsy"
SOURCE_COLUMNS = ("source", "subdomain")  # the columns naming a row's source in Paloma's files, in order


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
    """The column naming each row's source: `source`, else `subdomain` (Paloma's own names), else None. It
    must be a string column of every shard; no other column (the free `text`, say) is taken for a source."""
    schemas = [md.schema.to_arrow_schema() for md in index.metadata]
    name = next((n for n in SOURCE_COLUMNS if n in schemas[0].names), None)
    for file, schema in enumerate(schemas if name else []):
        if name not in schema.names:
            raise TaskError(f"paloma: {index.name(file)}: no {name!r} column (the first shard has one)")
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise TaskError(f"paloma: {index.name(file)}: source column {name!r} has type {kind}, not string")
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


def _row_length(index, seq_len: int) -> int:
    """Tokens per row: the first row's count when it is 2..seq_len + 1 (every row must have it; shorter rows
    are shorter windows), else seq_len + 1, so that the reader names the first bad row."""
    try:
        with index.fs.open(index.files[int(index.rg_file[0])], "rb") as handle:
            first = pq.ParquetFile(handle).read_row_group(int(index.rg_id[0]), columns=[COLUMN])[0][0].as_py()
    except Exception:  # an unreadable file: the reader raises the one-line DataError naming it
        first = None
    return len(first) if first is not None and 2 <= len(first) <= seq_len + 1 else seq_len + 1


def _scored_bytes(encoder: Encoder | None, ids: np.ndarray) -> np.ndarray | None:
    """UTF-8 bytes of each row's scored tokens row[1:], decoded by the tokenizer (special tokens such as the
    document separator decode to nothing); None without a tokenizer."""
    if encoder is None:
        return None
    texts = encoder.tokenizer.decode_batch([row[1:].tolist() for row in ids], skip_special_tokens=True)
    return np.array([len(text.encode("utf-8")) for text in texts], dtype=np.float64)  # (N,)


@dataclass
class PalomaTask:
    """Rows of L ≤ seq_len + 1 tokens, each scored as continuation row[1:] given row[:1]; optional sources,
    and the UTF-8 bytes of each row's scored tokens when a tokenizer decoded them."""

    source: str
    requests: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    sources: list[str] | None
    max_length: int
    batch_size: int | None = None
    scored_bytes: np.ndarray | None = field(default=None, repr=False)  # (R,)
    name: str = "paloma"

    def aggregate(self, lls: torch.Tensor) -> dict:
        """perplexity = exp(total NLL / total tokens) over all rows, `loss` that mean in nats, bits per byte;
        with sources, each source's and the mean of their perplexities (Paloma's macro average)."""
        nll = -lls.numpy()  # (R,) float64
        tokens = np.array([len(c) for _, c in self.requests], dtype=np.float64)  # (R,)
        result = self._figures(nll, tokens, np.ones(len(nll), dtype=bool)) | {"n": len(nll)}
        if self.sources is None:
            return result
        names = np.array(self.sources)
        sources = {
            s: self._figures(nll, tokens, names == s) | {"documents": int((names == s).sum())}
            for s in sorted(set(self.sources))
        }
        macro = float(np.mean([s["perplexity"] for s in sources.values()]))
        return result | {"macro_perplexity": macro, "sources": sources}

    def _figures(self, nll: np.ndarray, tokens: np.ndarray, rows: np.ndarray) -> dict:
        """perplexity, loss, bits_per_byte (with bytes) and tokens of the selected rows (R,) bool."""
        total, count = float(nll[rows].sum()), float(tokens[rows].sum())
        figures = {"perplexity": math.exp(total / count), "loss": total / count}
        scored_bytes = 0.0 if self.scored_bytes is None else float(self.scored_bytes[rows].sum())
        if scored_bytes > 0:
            figures["bits_per_byte"] = total / math.log(2) / scored_bytes
        return figures | {"tokens": int(count)}


@register_task("paloma", text=False)
def load_paloma(
    spec: TaskSpec, encoder: Encoder | None, seq_len: int, vocab_size: int | None = None
) -> PalomaTask:
    """The first `spec.limit` rows (all without one) of a pretokenized parquet eval set, with their sources;
    rows are checked like training data (one length L, 2 ≤ L ≤ seq_len + 1, ids below `vocab_size`). With
    an `encoder`, its tokenizer counts the bytes of each row's scored tokens (bits per byte)."""
    path, limit = spec.path or DEFAULT_DATASET, spec.limit
    row_len = None
    try:
        index = build_index(path)
        row_len = _row_length(index, seq_len)
        reader, rows, have = RowGroupReader(index, row_len, vocab_size), [], 0
        wanted = index.num_samples if limit is None else min(limit, index.num_samples)
        for g in range(len(index.rg_rows)):
            if have >= wanted:
                break
            rows.append(reader.read(g)[: wanted - have])
            have += len(rows[-1])
        reader.close()
    except DataError as e:
        # With shorter rows the reader's "seq_len + 1" is the first row's length.
        shorter = f" (rows may be shorter than {seq_len + 1} tokens; all must have the first row's)"
        raise TaskError(f"paloma: {e}{shorter if row_len not in (None, seq_len + 1) else ''}") from e
    ids = np.concatenate(rows).astype(np.int64)  # (N, L)
    column = _source_column(index)
    return PalomaTask(
        path,
        [(row[:1], row[1:]) for row in ids],
        None if column is None else _sources(index, column, len(ids)),
        seq_len,
        spec.batch_size,
        _scored_bytes(encoder, ids),
    )
