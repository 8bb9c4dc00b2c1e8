"""The manifest of a checkpoint step: every file's size and xxh3-128 hash, taken while the file is written.

`step_<N>/manifest.json` is `{"hash": "xxh3_128", "files": {"<path in the step>": {"size": <bytes>,
"xxh3_128": "<32 hex digits>"}}}` (docs/checkpoints.md, "Manifest"). Writing: the files pico writes itself
are hashed from the bytes it writes (`write_bytes`, `write_safetensors`); DCP's shards and metadata through
`HashingWriter`, whose streams hash what DCP writes into them: DCP writes each file front to back and only
asks `tell()`, and a stream that is asked to seek refuses, so a digest is never of other bytes than the
file's. Reading: readers check the files they read (`verify_files`); `step_faults` lists every problem of a
step (`python -m pico.checkpoint verify`), `verified_files` gives a sound step's files (the Hub uploader).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from pico.model.hf import CONFIG_FILE, WEIGHTS_FILE
from pico.run_dir import DROPPED_STATE, MANIFEST, MODEL, STATE, CheckpointError
from pico.state_reader import check_train_state

HASH = "xxh3_128"
_CHUNK = 1 << 23  # bytes read at a time when verifying


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and xxh3-128 hash (hex)."""

    size: int
    hash: str


def write_bytes(path: Path, data: bytes) -> FileDigest:
    """Write `data` to `path` (making its folder) and return the digest of the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return FileDigest(len(data), xxhash.xxh3_128_hexdigest(data))


# safetensors' names of the dtypes pico writes
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FileDigest:
    """Write CPU `tensors` (contiguous) as a safetensors file with `metadata`, hashing the bytes as they are
    written and copying no tensor (safetensors' own writers take a file name, or return the file as one
    more copy in memory). The format's three parts: the header's length (u64, little-endian), the JSON
    header (name: dtype, shape, data offsets; `__metadata__`), padded with spaces to 8 bytes, the data."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        stream = _HashingStream(f)
        stream.write(len(head).to_bytes(8, "little"))
        stream.write(head)
        for t in tensors.values():
            stream.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes
        return stream.digest()


def hash_file(path: Path) -> FileDigest:
    """The digest of the file at `path`, read in chunks."""
    h, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())


class _HashingStream(io.RawIOBase):
    """A file just opened for writing (buffered, blocking: its `write` takes all it is given) that hashes
    every byte written through it; it cannot seek, so its position is the number of bytes written."""

    def __init__(self, raw):
        self.raw, self.hash = raw, xxhash.xxh3_128()

    def writable(self) -> bool:
        """Always: a stream to write."""
        return True

    def write(self, b) -> int:  # NOTE: called per record DCP writes (thousands per step): kept minimal
        """Hash `b`, then write all of it."""
        self.hash.update(b)
        return self.raw.write(b)

    def tell(self) -> int:
        """The file's position: the bytes written so far."""
        return self.raw.tell()

    def flush(self) -> None:
        """Flush the file's buffer."""
        self.raw.flush()

    def fileno(self) -> int:
        """The file's descriptor (DCP fsyncs it)."""
        return self.raw.fileno()

    def digest(self) -> FileDigest:
        """The digest of what was written (call before the file is closed)."""
        return FileDigest(self.raw.tell(), self.hash.hexdigest())


class _HashingFileSystem(FileSystem):
    """DCP's FileSystem whose write streams hash what is written; `digests`: {final path: digest}."""

    def __init__(self):
        self.digests: dict[Path, FileDigest] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        """DCP's stream of `path`: one that hashes what is written when `mode` writes."""
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
            self.digests[Path(path)] = stream.digest()  # DCP closed `stream`, not `raw`

    def rename(self, path, new_path) -> None:
        """Rename the file, and its digest with it."""
        super().rename(path, new_path)  # DCP writes `.metadata.tmp`, then renames it
        self.digests[Path(new_path)] = self.digests.pop(Path(path))

    def rm_file(self, path) -> None:
        """Remove the file and its digest."""
        super().rm_file(path)
        self.digests.pop(Path(path), None)


class HashingWriter(FileSystemWriter):
    """DCP's FileSystemWriter that hashes its files as it writes them; `digests()` once the save is done."""

    def __init__(self, path):
        super().__init__(path)
        self.fs = _HashingFileSystem()

    def digests(self) -> dict[Path, FileDigest]:
        """{path: digest} of the files this rank wrote."""
        return dict(self.fs.digests)


def write_manifest(step_path: Path, digests: dict[str, FileDigest]) -> None:
    """Write `step_path/manifest.json` listing `digests` ({path in the step: digest})."""
    files = {name: {"size": d.size, HASH: d.hash} for name, d in sorted(digests.items())}
    write_bytes(
        Path(step_path) / MANIFEST, (json.dumps({"hash": HASH, "files": files}, indent=1) + "\n").encode()
    )


def read_manifest(step_path: Path) -> dict[str, FileDigest] | None:
    """{path in the step: digest} of `step_path/manifest.json`; None for a step written before manifests
    existed (no manifest.json). A damaged one is a CheckpointError naming it."""
    path = Path(step_path) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("hash") != HASH:
            raise ValueError(f"hash {data.get('hash')!r} is not {HASH!r}")
        files = {name: FileDigest(entry["size"], entry[HASH]) for name, entry in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a pico manifest ({type(e).__name__}: {e})") from None
    for name, d in files.items():
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or not parts or name == MANIFEST:
            raise CheckpointError(f"{path}: lists {name!r}, which is not a file of the step")
        if type(d.size) is not int or not isinstance(d.hash, str):
            raise CheckpointError(f"{path}: the entry of {name} is not {{size: int, {HASH}: str}}")
    return files


def run_root(step_path: Path) -> Path:
    """What symlinks in a step may point into: `<run_dir>` for `<run_dir>/checkpoints/step_<N>`, and the
    repo's folder (with its blobs) for a Hub download `<cache>/<repo>/snapshots/<commit>`."""
    return Path(step_path).parent.parent


def _within(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _walk(step_path: Path, parts: list[str]) -> Iterator[Path]:
    """The files (and symlinks) under `parts` of `step_path`, not following symlinks to directories, nor
    into a `state/` that retention is deleting (`pico.run_dir.drop_state`)."""
    for part in parts:
        top = step_path / part
        if top.is_dir() and not top.is_symlink():
            for folder, dirs, files in os.walk(top):
                if Path(folder) == step_path and DROPPED_STATE in dirs:
                    dirs.remove(DROPPED_STATE)
                links = [d for d in dirs if (Path(folder) / d).is_symlink()]
                yield from (Path(folder) / name for name in sorted(files + links))
        elif top.exists() or top.is_symlink():
            yield top


def _link_fault(path: Path, root: Path | None) -> str | None:
    """Why pico does not follow symlink `path`: to a directory, or (with `root`) out of `root`; else None."""
    if path.is_symlink() and path.is_dir():
        return f"{path}: a symlink to a directory ({path.resolve()}), which pico never writes"
    if path.is_symlink() and root is not None and not _within(path, root):
        return f"{path}: a symlink to {path.resolve()}, outside {root}"
    return None


def _selected(names, parts: list[str]) -> list[str]:
    """The names (paths in a step) that lie under `parts` ("." is the whole step)."""
    return sorted(n for n in names if any(p == "." or n == p or n.startswith(p + "/") for p in parts))


def _check(step_path: Path, manifest: dict, parts: list[str], root: Path | None) -> tuple[list[str], dict]:
    """(one line per problem, {name: file} of the listed files found) of `step_path`'s files under `parts`."""
    problems, found = [], {}
    for path in _walk(step_path, parts):
        name = path.relative_to(step_path).as_posix()
        if fault := _link_fault(path, root):
            problems.append(fault)
        elif name in manifest:
            found[name] = path
        elif name != MANIFEST:
            problems.append(f"{path}: not listed in {step_path / MANIFEST}")
    pruned = STATE not in parts and not (step_path / STATE).exists()  # retention deleted all of state/
    for name in _selected(manifest, parts):
        path = step_path / name
        if pruned and name.startswith(STATE + "/"):
            continue
        if name in found:
            problems += [problem] if (problem := _compare(path, manifest[name])) else []
        elif not any(p.startswith(f"{path}: ") for p in problems):
            problems.append(f"{path}: missing")
    return problems, found


def _compare(path: Path, expected: FileDigest) -> str | None:
    """How file `path` differs from its manifest entry, or None."""
    try:
        actual = hash_file(path)
    except OSError as e:
        return f"{path}: unreadable ({e.strerror})"
    if actual.size < expected.size:
        return f"{path}: truncated ({actual.size} of {expected.size} bytes)"
    if actual.size != expected.size:
        return f"{path}: {actual.size} bytes, {MANIFEST} says {expected.size}"
    if actual.hash != expected.hash:
        return f"{path}: content differs from {MANIFEST} ({HASH} {actual.hash}, expected {expected.hash})"
    return None


def _raise_first(problems: list[str]) -> None:
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def faults(step_path: Path, parts: list[str] | None = None, root: Path | None = None) -> list[str]:
    """One line per problem of `step_path`'s files under `parts` (paths in the step; default: all) against
    its manifest, naming the file: listed but missing, truncated, of another size or content, present but
    not listed, a symlink to a directory, or (with `root`) a symlink out of `root`. [] when all is well or
    there is no manifest."""
    manifest = read_manifest(step_path)
    return [] if manifest is None else _check(Path(step_path), manifest, parts or ["."], root)[0]


def verify_files(
    step_path: Path, parts: list[str] | None = None, root: Path | None = None
) -> dict[str, Path] | None:
    """{name: file} of `step_path`'s files under `parts` (default: all), each checked against the manifest
    (`faults`); the first problem is a CheckpointError naming the file. None for a step with no manifest."""
    manifest = read_manifest(step_path)
    if manifest is None:
        return None
    problems, found = _check(Path(step_path), manifest, parts or ["."], root)
    _raise_first(problems)
    return found


def step_faults(step_path: Path) -> list[str]:
    """One line per problem of step dir `step_path`, naming the file; [] when it is complete and sound.

    With a manifest: `faults` over all its files (symlinks out of the run included). Without one (a step
    written before manifests): what can be checked without it: no symlink to a directory or out of the run,
    every file the state's metadata lists at full size, model/ holding config.json and model.safetensors,
    every safetensors file as long as its header says. Both read state/.metadata with the allow-list.
    A step with no state/ at all (checkpointing.keep_state_last deleted it) is sound without it; its
    manifest still lists the state/ files as they were written.
    """
    step_path, root = Path(step_path), run_root(step_path)
    manifest = read_manifest(step_path)
    if manifest is not None:
        problems = _check(step_path, manifest, ["."], root)[0]
    else:
        problems = [fault for path in _walk(step_path, ["."]) if (fault := _link_fault(path, root))]
        model = step_path / MODEL
        if model.is_dir():
            problems += [
                f"{model / n}: missing" for n in (CONFIG_FILE, WEIGHTS_FILE) if not (model / n).is_file()
            ]
        tensors = [p for p in _walk(step_path, ["."]) if p.name.endswith(".safetensors") and p.is_file()]
        problems += [problem for path in tensors if (problem := _safetensors_fault(path))]
    if not problems and (step_path / STATE).exists():
        try:
            check_train_state(step_path / STATE)
        except CheckpointError as e:
            problems.append(str(e))
    return problems


def verified_files(step_path: Path) -> dict[str, Path]:
    """{path in the step: file} of every file of a complete, sound step dir (`step_faults`), manifest.json
    included; otherwise a CheckpointError naming the first file at fault."""
    step_path = Path(step_path)
    _raise_first(step_faults(step_path))
    return {path.relative_to(step_path).as_posix(): path for path in sorted(_walk(step_path, ["."]))}


def _safetensors_fault(path: Path) -> str | None:
    """Why safetensors file `path` is not as long as its header says (truncated, not safetensors), or None."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length <= path.stat().st_size else None
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"{path}: not a safetensors file ({type(e).__name__})"
    size = path.stat().st_size
    return None if size == 8 + length + end else f"{path}: {size} bytes, its header says {8 + length + end}"
