"""Parquet shards of token rows: path resolution (local or fsspec/Hub), the footer index,
validated row-group reads."""

import glob
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tokenizers import Tokenizer

from pico.errors import PicoError
from pico.hf_http import configure_hf_http

COLUMN = "input_ids"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DataError(PicoError, ValueError):
    """Bad or missing training data; the message names the path (and file row, 0-based) at fault."""

    kind = "data error"


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def resolve_url(path: str) -> str:
    """Map a data path to an fsspec URL: URLs pass through, `org/name` Hub ids become `hf://datasets/org/name`."""
    path = str(path)
    if "://" in path:
        return path
    local = os.path.expanduser(os.path.expandvars(path))
    if _HUB_ID.fullmatch(path) and not os.path.exists(local):
        return f"hf://datasets/{path}"
    return local


def list_shards(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and sorted parquet files of a directory (recursive), glob, single file or Hub id."""
    url = resolve_url(path)
    where = f"{path} ({url})" if url != str(path) and "://" in url else str(path)
    if url.startswith("hf://"):
        configure_hf_http()  # timeouts, quiet retries
    fs, root = fsspec.core.url_to_fs(url)
    try:
        if glob.has_magic(root):
            files = fs.glob(root)
        elif fs.isdir(root):
            files = fs.glob(root.rstrip("/") + "/**/*.parquet")
        else:
            files = [root] if fs.isfile(root) else []
    except Exception as e:  # network, auth, or filesystem errors of any fsspec backend
        raise DataError(f"{where}: cannot list files ({_one_line(e)})") from e
    if not files:
        hint = demo_hint(root) if isinstance(fs, LocalFileSystem) else ""
        raise DataError(f"{where}: no parquet files match this path{hint}")
    return fs, sorted(files)


def default_root() -> Path:
    """pico's cache: `$PICO_CACHE`, else `~/.cache/pico` (where pico.data.demo builds the demo corpus)."""
    return Path(os.path.expanduser(os.environ.get("PICO_CACHE") or "~/.cache/pico"))


def demo_hint(path: str) -> str:
    """For a missing `<root>/demo/{train,eval}` (where pico.data.demo writes): how to build it there."""
    path = Path(path)
    if path.parent.name != "demo" or path.name not in ("train", "eval"):
        return ""
    root = path.parent.parent
    flag = "" if root == default_root() else f" --root {root}"
    return f"; build the demo corpus there with `python -m pico.data.demo{flag}`"


def display_name(fs: fsspec.AbstractFileSystem, file: str) -> str:
    """A file name for messages: plain path for local files, full URL otherwise."""
    return file if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(file)


def find_tokenizer(path: str) -> Path | None:
    """The local `tokenizer.json` next to the shards of `path` (or in their parent directory), else None;
    a DataError naming it when it is not a tokenizer that `tokenizers` reads (checked before step 0)."""
    try:
        fs, files = list_shards(path)
    except DataError:
        return None
    if not isinstance(fs, LocalFileSystem):
        return None
    folder = Path(files[0]).parent
    for candidate in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if candidate.is_file():
            try:
                Tokenizer.from_file(str(candidate))
            except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read
                raise DataError(f"{candidate}: not a tokenizers file ({' '.join(str(e).split())})") from None
            return candidate
    return None


@dataclass
class ShardIndex:
    """Row groups of all shards in global order, built from parquet footers only."""

    path: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    metadata: list[pq.FileMetaData]
    rg_file: np.ndarray  # (G,) file index of each row group
    rg_id: np.ndarray  # (G,) row group number inside its file
    rg_rows: np.ndarray  # (G,) rows in each row group
    rg_start: np.ndarray  # (G,) global row of each row group's first row
    rg_file_row: np.ndarray  # (G,) file-local row of each row group's first row

    @property
    def num_samples(self) -> int:
        """Total rows over all shards."""
        return int(self.rg_rows.sum())

    def name(self, file: int) -> str:
        """Display name of file number `file`."""
        return display_name(self.fs, self.files[file])


def _footer(fs: fsspec.AbstractFileSystem, file: str) -> pq.FileMetaData:
    name = display_name(fs, file)
    try:
        with fs.open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            metadata, schema = pf.metadata, pf.schema_arrow
    except Exception as e:
        raise DataError(f"{name}: unreadable parquet file ({_one_line(e)})") from e
    if COLUMN not in schema.names:
        raise DataError(f"{name}: no '{COLUMN}' column (columns: {schema.names})")
    kind = schema.field(COLUMN).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and pa.types.is_integer(kind.value_type)):
        raise DataError(f"{name}: column '{COLUMN}' has type {kind}, expected a list of integers")
    if metadata.num_rows == 0:
        raise DataError(f"{name}: file has no rows")
    return metadata


def build_index(path: str) -> ShardIndex:
    """Read every shard's footer (16 at a time, which matters for remote files) and index its row groups."""
    fs, files = list_shards(path)
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        metadata = list(pool.map(lambda f: _footer(fs, f), files))
    groups = []  # (file, row group, rows, file-local first row) of every non-empty row group
    for i, md in enumerate(metadata):
        first = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n:
                groups.append((i, g, n, first))
            first += n
    rg_file, rg_id, rg_rows, rg_file_row = np.asarray(groups, dtype=np.int64).T
    return ShardIndex(
        path=str(path),
        fs=fs,
        files=files,
        metadata=metadata,
        rg_file=rg_file,
        rg_id=rg_id,
        rg_rows=rg_rows,
        rg_start=np.cumsum(rg_rows) - rg_rows,
        rg_file_row=rg_file_row,
    )


class RowGroupReader:
    """Reads and validates one row group at a time, caching the last one; counts row groups read."""

    def __init__(self, index: ShardIndex, row_len: int, vocab_size: int | None = None):
        self.index, self.row_len, self.vocab_size = index, row_len, vocab_size
        self.row_groups_read = 0
        self._cached: tuple[int, np.ndarray] | None = None
        self._open: tuple[int, object, pq.ParquetFile] | None = None  # (file, handle, ParquetFile)

    def read(self, g: int) -> np.ndarray:
        """Rows of row group `g` (global number) as an integer array (rows, row_len)."""
        if self._cached is not None and self._cached[0] == g:
            return self._cached[1]
        file, first_row = int(self.index.rg_file[g]), int(self.index.rg_file_row[g])
        try:
            table = self._parquet(file).read_row_group(
                int(self.index.rg_id[g]), columns=[COLUMN], use_threads=False
            )
        except Exception as e:  # corrupt pages, truncated files, network errors
            raise DataError(
                f"{self.index.name(file)}: cannot read rows "
                f"{first_row}..{first_row + int(self.index.rg_rows[g]) - 1} "
                f"({_one_line(e)})"
            ) from e
        rows = self._validate(table.column(0).combine_chunks(), file, first_row)
        self.row_groups_read += 1
        self._cached = (g, rows)
        return rows

    def close(self) -> None:
        """Close the open file handle and drop the cache."""
        if self._open is not None:
            self._open[1].close()
        self._open, self._cached = None, None

    def _parquet(self, file: int) -> pq.ParquetFile:
        if self._open is None or self._open[0] != file:
            self.close()
            handle = self.index.fs.open(self.index.files[file], "rb")
            self._open = (file, handle, pq.ParquetFile(handle, metadata=self.index.metadata[file]))
        return self._open[2]

    def _validate(self, column: pa.Array, file: int, first_row: int) -> np.ndarray:
        """The rows as an array (rows, row_len), or a DataError `<file> row <r>: ...` for the first
        bad row."""

        def error(row: int, problem: str) -> DataError:
            return DataError(f"{self.index.name(file)} row {first_row + row}: {problem}")

        if column.null_count:
            raise error(
                int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]), "the row is null"
            )
        lengths = pc.list_value_length(column).to_numpy()
        bad = np.flatnonzero(lengths != self.row_len)
        if bad.size:
            n = int(lengths[bad[0]])
            problem = f"{n} tokens, expected seq_len + 1 = {self.row_len}"
            if len(lengths) > 1 and n > 1 and (lengths == n).all():  # a seq_len mismatch, not one bad row
                problem += f" (so do all {len(lengths)} rows of its row group: data for seq_len {n - 1}?)"
            raise error(int(bad[0]), problem)
        values = column.flatten()
        if values.null_count:
            r, c = divmod(
                int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]), self.row_len
            )
            raise error(r, f"null token at position {c}")
        rows = values.to_numpy().reshape(-1, self.row_len)  # (rows, seq_len + 1)
        out = rows < 0 if self.vocab_size is None else (rows < 0) | (rows >= self.vocab_size)
        if out.any():
            r, c = np.argwhere(out)[0]
            limit = "non-negative" if self.vocab_size is None else f"in [0, vocab_size={self.vocab_size})"
            raise error(int(r), f"token id {int(rows[r, c])} at position {int(c)}, expected {limit}")
        return rows
