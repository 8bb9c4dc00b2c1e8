"""A run bound to its data: a fingerprint of the training shards (names, sizes, row counts, parquet footer
hashes; no data read) and of the eval batch, recorded in the run directory and compared on resume and replay.

`<run_dir>/data_fingerprint.json` holds `{"versions": [...]}`, one entry per stretch of training on the same
data: `{"step", "path", "shards": [{"name", "bytes", "rows", "footer_sha256"}], "eval", "changes"}`. The
first has step 0 and changes null; a run continued knowingly on changed data (allow_changed) appends the new
data with the step it applies from and the changes it accepted.
"""

import hashlib
import json
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor

import fsspec
import torch

from pico.data.shards import DataError, ShardIndex, display_name
from pico.distributed import agree_on_error, is_main
from pico.run_dir import data_fingerprint_file, write_atomic

_SHOWN = 6  # changes named in one message; the rest are counted


def _footer(fs: fsspec.AbstractFileSystem, file: str) -> tuple[int, str]:
    """(file bytes, sha256 of the parquet footer): two small reads at the end of the file."""
    try:
        size = fs.size(file)
        with fs.open(file, "rb") as f:
            f.seek(size - 8)
            n = int.from_bytes(f.read(4), "little")  # footer length, then the magic b"PAR1"
            f.seek(size - 8 - n)
            footer = f.read(n)
    except Exception as e:  # network or filesystem errors of any fsspec backend
        raise DataError(
            f"{display_name(fs, file)}: cannot read the parquet footer ({type(e).__name__}: {e})"
        ) from e
    return size, hashlib.sha256(footer).hexdigest()


def shard_names(index: ShardIndex) -> list[str]:
    """The shards' paths relative to the folder that holds them all (posix), in the stream's order."""
    root = posixpath.commonpath([posixpath.dirname(f) for f in index.files])
    return [posixpath.relpath(f, root) for f in index.files]


def train_fingerprint(index: ShardIndex) -> dict:
    """`{"path", "shards": [{"name", "bytes", "rows", "footer_sha256"}]}` of the indexed training data."""
    with ThreadPoolExecutor(max_workers=min(16, len(index.files))) as pool:
        footers = list(pool.map(lambda f: _footer(index.fs, f), index.files))
    shards = [
        {"name": name, "bytes": size, "rows": md.num_rows, "footer_sha256": sha}
        for name, md, (size, sha) in zip(shard_names(index), index.metadata, footers)
    ]
    return {"path": index.path, "shards": shards}


def eval_fingerprint(path: str, batch: torch.Tensor) -> dict:
    """`{"path", "shape", "sha256"}` of the fixed eval batch (N, T+1): a hash of its int64 token ids."""
    ids = batch.to(torch.int64).contiguous().numpy()  # (N, T+1)
    return {"path": str(path), "shape": list(ids.shape), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def _versions(run_dir) -> list[dict]:
    path = data_fingerprint_file(run_dir)
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["versions"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable data fingerprint ({type(e).__name__}: {e})") from None


def record_fingerprint(
    run_dir, train: dict, *, evals: dict | None = None, step: int = 0, changes=None
) -> None:
    """Append the data of `train_fingerprint` (and `eval_fingerprint`) to the run's data_fingerprint.json as
    the data of updates `step` on; `changes`: what differs from the previous entry, accepted knowingly."""
    entry = {"step": step, **train, "eval": evals, "changes": changes}
    versions = [v for v in _versions(run_dir) if v["step"] < step] + [entry]
    write_atomic(data_fingerprint_file(run_dir), json.dumps({"versions": versions}, indent=1) + "\n")


def _shard_changes(old: list[dict], new: list[dict]) -> list[str]:
    """Per shard name: added, removed, resized (rows or bytes), footer changed."""
    before, after = {s["name"]: s for s in old}, {s["name"]: s for s in new}
    changes = [f"shard {n} removed" for n in before if n not in after]
    changes += [f"shard {n} added" for n in after if n not in before]
    for name in (n for n in before if n in after):
        a, b = before[name], after[name]
        if (a["rows"], a["bytes"]) != (b["rows"], b["bytes"]):
            changes.append(
                f"shard {name} resized ({a['rows']} -> {b['rows']} rows, {a['bytes']} -> {b['bytes']} bytes)"
            )
        elif a["footer_sha256"] != b["footer_sha256"]:
            changes.append(f"shard {name} footer changed (same size, other content)")
    return changes


def data_changes(run_dir, train: dict, *, evals: dict | None = None, step: int = 0) -> str | None:
    """What differs between the data the run recorded for update `step` and these fingerprints, in one line;
    None when nothing does or the run recorded none. The eval batch is compared when both sides have one."""
    versions = [v for v in _versions(run_dir) if v["step"] <= step]
    if not versions:
        return None
    old = versions[-1]
    changes = _shard_changes(old["shards"], train["shards"])
    if evals is not None and old["eval"] is not None and old["eval"] != evals:
        changes.append(f"eval batch changed ({old['eval']['path']} -> {evals['path']})")
    if not changes:
        return None
    more = f"; and {len(changes) - _SHOWN} more" if len(changes) > _SHOWN else ""
    return "; ".join(changes[:_SHOWN]) + more


def check_data(run_dir, train: dict, *, evals: dict | None = None, step: int = 0, allow_changed=False):
    """Raise a one-line DataError naming what changed since the run recorded its data for update `step`; with
    `allow_changed`, record the new data from `step` on instead and return the changes (None: unchanged)."""
    changes = data_changes(run_dir, train, evals=evals, step=step)
    if changes is not None and not allow_changed:
        raise DataError(
            f"{data_fingerprint_file(run_dir)}: the data differ from what the run trained on at step {step}: "
            f"{changes} (data.allow_changed=true continues knowingly)"
        )
    if changes is not None:
        record_fingerprint(run_dir, train, evals=evals, step=step, changes=changes)
    return changes


def bind_data(run_dir, stream, eval_batch=None, *, eval_data=None, resume_from=None, step: int = 0):
    """Bind the run in `run_dir` to the data of `stream` (a TokenStream) and `eval_batch` (read from
    `eval_data`); a collective. A new run (`resume_from` None) records them from step 0. A run resuming at
    `step` compares them with the data it recorded for that step: when they differ, every rank raises the
    same one-line DataError, unless `stream.allow_changed`, and then the new data are recorded from `step` on.
    A run directory without a record takes the one beside `resume_from`'s state (a step fetched from the
    Hub). Returns the changes accepted (on rank 0; None when nothing changed)."""
    error = changes = None
    if is_main():
        if resume_from is not None and not data_fingerprint_file(run_dir).is_file():
            inherited = data_fingerprint_file(resume_from)  # downloaded beside a Hub step's state/
            if inherited.is_file():
                shutil.copyfile(inherited, data_fingerprint_file(run_dir))
        try:
            train = train_fingerprint(stream.index)
            evals = eval_fingerprint(eval_data, eval_batch) if eval_batch is not None else None
            if resume_from is None:
                record_fingerprint(run_dir, train, evals=evals)
            else:
                changes = check_data(
                    run_dir, train, evals=evals, step=step, allow_changed=stream.allow_changed
                )
        except DataError as e:
            error = str(e)
    # NOTE: every rank waits here for rank 0's verdict, so that all of them stop with its line or none does.
    error = agree_on_error(error)
    if error is not None:
        raise DataError(error)
    return changes
