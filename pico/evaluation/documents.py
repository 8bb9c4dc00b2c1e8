"""Task documents from local jsonl/parquet files (a file or a directory of them) or a Hub dataset id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from pico.evaluation.task import TaskError
from pico.hf_http import configure_hf_http

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SUFFIXES = (".jsonl", ".json", ".parquet")


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _read_file(task: str, file: Path) -> list[dict]:
    """Every record of one jsonl (one JSON object a line) or parquet file."""
    if file.suffix == ".parquet":
        try:
            return pq.read_table(file).to_pylist()
        except Exception as e:  # corrupt or truncated parquet
            raise TaskError(f"{task}: {file}: unreadable parquet file ({_one_line(e)})") from e
    records = []
    for row, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{task}: {file} row {row}: not a JSON object ({_one_line(e)})") from e
        if not isinstance(record, dict):
            raise TaskError(f"{task}: {file} row {row}: not a JSON object")
        records.append(record)
    return records


def local_documents(task: str, path: str) -> list[tuple[dict, str]]:
    """(record, "<file> row <i>") of every record of `path`, files in sorted order; errors on empty files."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise TaskError(f"{task}: {path}: no {'/'.join(SUFFIXES)} files in this directory")
    elif root.is_file():
        files = [root]
    else:
        raise TaskError(f"{task}: {path}: no such file or directory")
    documents = []
    for file in files:
        records = _read_file(task, file)
        if not records:
            raise TaskError(f"{task}: {file}: no documents (empty file)")
        documents += [(record, f"{file} row {row}") for row, record in enumerate(records)]
    return documents


def hub_documents(
    task: str, dataset: str, config: str | None, split: str, limit: int | None
) -> list[tuple[dict, str]]:
    """(record, "<id> row <i>") of the first `limit` records of a Hub dataset split (`datasets`)."""
    import datasets

    configure_hf_http()  # timeouts, quiet retries
    where = dataset if config is None else f"{dataset} ({config})"
    try:
        records = datasets.load_dataset(
            dataset, config, split=split if limit is None else f"{split}[:{limit}]"
        )
    except Exception as e:  # offline, unknown id, network or auth errors
        raise TaskError(
            f"{task}: {where}: no such local path, and Hub split {split} does not load ({_one_line(e)})"
        ) from e
    if len(records) == 0:
        raise TaskError(f"{task}: Hub dataset {where} split {split} has no documents")
    return [(record, f"{where} row {row}") for row, record in enumerate(records)]


def hub_configs(task: str, dataset: str) -> list[str]:
    """The config names of a Hub dataset (BLiMP has one per paradigm)."""
    import datasets

    configure_hf_http()
    try:
        return datasets.get_dataset_config_names(dataset)
    except Exception as e:
        raise TaskError(f"{task}: cannot list configs of Hub dataset {dataset} ({_one_line(e)})") from e


def is_hub_id(path: str) -> bool:
    """True for an `org/name` id that is not a local path."""
    return bool(HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def require(task: str, record: dict, where: str, columns: tuple[str, ...]) -> None:
    """Raise a TaskError naming the row unless `record` has every column (not null)."""
    for column in columns:
        if record.get(column) is None:
            raise TaskError(f"{task}: {where}: missing column {column!r} (has {sorted(record)})")
