"""Pretokenized token streams, dataset preparation and the offline demo corpus."""

from pico.data.shards import DataError, build_index, find_tokenizer, resolve_url
from pico.data.stream import TokenStream, iter_eval_batches, read_batch, split_rows

_LAZY = {
    "prepare_dataset": "pico.data.prepare",
    "load_stats": "pico.data.prepare",
    "ensure_demo_corpus": "pico.data.demo",
    "Replay": "pico.data.replay",
    "batch_at": "pico.data.replay",
    "when_seen": "pico.data.replay",
}


def __getattr__(name: str):
    """Import the names of `_LAZY` on first use (keeps `python -m` runs clean; pico.data.replay reads
    configs, so it imports pico.config)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pico.data' has no attribute {name!r}")


__all__ = [
    "DataError",
    "Replay",
    "TokenStream",
    "batch_at",
    "build_index",
    "ensure_demo_corpus",
    "find_tokenizer",
    "iter_eval_batches",
    "load_stats",
    "prepare_dataset",
    "read_batch",
    "resolve_url",
    "split_rows",
    "when_seen",
]
