"""Tiny generated parquet shards with recognisable rows: global row g holds g·L, g·L + 1, ..., g·L + L − 1."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROW_LEN = 9  # seq_len 8


def write_rows(path: Path, rows: list[list[int]], row_group_size: int = 8) -> Path:
    """Write `rows` (lists of ints, any lengths) as an `input_ids` list<int32> parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}),
        path,
        row_group_size=row_group_size,
    )
    return path


def make_shards(root: Path, rows_per_file=(40, 24, 56), row_group_size: int = 8) -> Path:
    """Shards `part-i.parquet` in `root` holding consecutive rows 0, 1, 2, ... (N = sum(rows_per_file))."""
    start = 0
    for i, n in enumerate(rows_per_file):
        ids = (np.arange(start, start + n)[:, None] * ROW_LEN + np.arange(ROW_LEN)).tolist()
        write_rows(root / f"part-{i}.parquet", ids, row_group_size)
        start += n
    return root


def row_ids(ids) -> list[int]:
    """Global row numbers of a batch of rows (first token // ROW_LEN)."""
    return (ids[:, 0] // ROW_LEN).tolist()


@pytest.fixture
def shards(tmp_path) -> Path:
    """120 rows in 3 files, row groups of 8 rows."""
    return make_shards(tmp_path / "shards")
