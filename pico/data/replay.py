"""Replaying a run's data from its run directory: the global batch of any update (`batch_at`) and where a
data row was trained on (`when_seen`), in the order the run's stream used, checked against its fingerprint."""

import json
from pathlib import Path

import numpy as np
import torch

from pico.config import load_config, load_tree
from pico.data.fingerprint import data_changes, shard_names, train_fingerprint
from pico.data.shards import DataError
from pico.data.stream import TokenStream
from pico.run_dir import CONFIG, data_fingerprint_file

_SECTIONS = ("model", "data", "training")  # what the order and the run's length depend on


def run_config(run_dir):
    """The model, data and training sections of the run's config.yaml as a validated Config (other sections,
    a fork's own included, keep their defaults); a missing config.yaml is a DataError."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no {CONFIG})")
    tree = load_tree(path)  # as overrides (JSON is YAML), so these sections are validated as the run's were
    overrides = [f"{s}.{k}={json.dumps(v)}" for s in _SECTIONS for k, v in (tree.get(s) or {}).items()]
    return load_config(None, overrides)


class Replay:
    """A run's training data in the run's order: the data its config.yaml names (or `data_path`, e.g. a copy
    on another machine), checked against the run's data fingerprint unless `allow_changed`."""

    def __init__(self, run_dir, *, data_path: str | None = None, allow_changed: bool = False):
        self.run_dir, self.allow_changed = Path(run_dir), allow_changed
        self.config = cfg = run_config(run_dir)
        d = cfg.data
        # One process reading the whole global batch as one micro-batch: the order does not depend on either.
        self.stream = TokenStream(
            data_path or d.path,
            d.seq_len,
            d.batch_size,
            d.batch_size,
            vocab_size=cfg.model_config().vocab_size,
            shuffle_seed=d.shuffle_seed,
            wrap=d.wrap,
            prefetch=0,
        )
        self._train = (
            train_fingerprint(self.stream.index) if data_fingerprint_file(run_dir).is_file() else None
        )
        self._checked: set[int] = set()

    def batch(self, step: int) -> torch.Tensor:
        """The global batch (batch_size, seq_len + 1) int64 of the update W_step -> W_step+1."""
        self._check(step)
        return self.stream.global_batch(step)

    def when_seen(self, shard: str | int, row: int) -> list[tuple[int, int]]:
        """(step, row of batch_at(step)) of every update that trained on row `row` (0-based) of shard `shard`
        (its name relative to the shards' folder, its path, or its number), up to training.max_steps."""
        index = self.stream.index
        file = self._shard(shard)
        rows = int(index.metadata[file].num_rows)
        if not 0 <= row < rows:
            raise DataError(f"{index.name(file)}: no row {row} (the shard has {rows})")
        groups = np.flatnonzero(index.rg_file == file)  # (groups of the file,) in file order
        g = int(groups[np.searchsorted(index.rg_file_row[groups], row, side="right") - 1])
        seen = self.stream.batches_holding(g, row - int(index.rg_file_row[g]), self.config.training.max_steps)
        for step, _ in seen:
            self._check(step)
        return seen

    def close(self) -> None:
        """Close the open shard file."""
        self.stream.close()

    def __enter__(self) -> "Replay":  # noqa: PYI034 (typing.Self needs Python 3.11; pico supports 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _shard(self, shard: str | int) -> int:
        """The file number of a shard given by number, name or path."""
        files, names = self.stream.index.files, shard_names(self.stream.index)
        if isinstance(shard, int) and 0 <= shard < len(files):
            return shard
        for i, (file, name) in enumerate(zip(files, names)):
            if str(shard) in (name, file, self.stream.index.name(i)):
                return i
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise DataError(f"{self.stream.path}: no shard {shard!r} (shards 0..{len(files) - 1}: {shown})")

    def _check(self, step: int) -> None:
        """Refuse a negative step, and data that differ from what the run recorded for `step`."""
        if step < 0:
            raise DataError(f"{self.run_dir}: step {step}: steps count updates from 0")
        if self._train is None or self.allow_changed or step in self._checked:
            return
        changes = data_changes(self.run_dir, self._train, step=step)
        if changes is not None:
            raise DataError(
                f"{self.stream.path}: the data differ from what {self.run_dir} trained on at step {step}: "
                f"{changes} (allow_changed=True or --allow-changed reads them anyway)"
            )
        self._checked.add(step)


def batch_at(
    run_dir, step: int, *, data_path: str | None = None, allow_changed: bool = False
) -> torch.Tensor:
    """The global batch (batch_size, seq_len + 1) int64 of the update W_step -> W_step+1 of the run in
    `run_dir`: the `input_ids` its `step_<step>` train split stores, for any step, read without the other
    batches' rows; a DataError when the data are missing or differ from the run's fingerprint."""
    with Replay(run_dir, data_path=data_path, allow_changed=allow_changed) as replay:
        return replay.batch(step)


def when_seen(run_dir, shard: str | int, row: int, *, data_path: str | None = None) -> list[tuple[int, int]]:
    """(step, row) of every update of the run that trained on row `row` of shard `shard`: one per epoch that
    reached it, so that `batch_at(run_dir, step)[row]` is that data row."""
    with Replay(run_dir, data_path=data_path) as replay:
        return replay.when_seen(shard, row)
