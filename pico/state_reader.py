"""Reading a step's `state/` (torch.distributed.checkpoint) without running code from it.

DCP reads `.metadata` with `pickle.load` and non-tensor items with `torch.load(weights_only=False)`, so a
crafted checkpoint runs code on resume. pico reads `.metadata` with an unpickler that admits exactly the
classes DCP's metadata is made of (`ALLOWED`), and non-tensor items (only checkpoints written before
`train_state.json` have them) with `torch.load(weights_only=True)`. Every read of `state/` goes through
`StateReader` and `SafeLoadPlanner` (tests/test_safe_loading.py greps pico/ and recipes/ for any other).
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import pickle
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element

from pico.run_dir import CheckpointError

METADATA = ".metadata"

# (module, name) -> object: what DCP pickles into `.metadata` (found by unpickling the metadata of pico runs
# on 1 and 2 ranks, DDP and FSDP2, with and without optimizer state). Any torch dtype may appear as well.
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
}
ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
ALLOWED[("torch", "Size")] = torch.Size
ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> torch.strided
ALLOWED[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id
ALLOWED[("pathlib._local", "PosixPath")] = pathlib.PosixPath  # the same, pickled by Python >= 3.13


_BUILT = (
    tuple(  # the classes whose instances the metadata sets the state of (pickle's BUILD): its dataclasses
        obj for obj in ALLOWED.values() if dataclasses.is_dataclass(obj)
    )
)


class _MetadataUnpickler(pickle._Unpickler):
    """An unpickler that resolves only the globals of `ALLOWED` (and torch dtypes) and sets the state only of
    instances of DCP's metadata classes: never of a class, a function or a shared object such as an enum
    member. The pure-Python unpickler, so that BUILD can be checked; metadata files are small."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        """The allowed global `module.name`; any other is a CheckpointError."""
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path}: refused: it pickles {module}.{name}, which DCP metadata never holds "
            "(a crafted or foreign checkpoint; pico does not run code from checkpoints)"
        )

    def persistent_load(self, pid):
        """Refuse: DCP metadata holds no persistent ids."""
        raise CheckpointError(
            f"{self.path}: refused: it holds a persistent id, which DCP metadata never holds"
        )

    def load_build(self):
        """pickle's BUILD, for instances of DCP's metadata classes only."""
        target = self.stack[-2]
        if type(target) not in _BUILT:
            raise CheckpointError(
                f"{self.path}: refused: it sets the state of a {type(target).__name__}, which DCP metadata "
                "never does"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_metadata(state_dir: Path, rank: int | None = None) -> dcp_metadata.Metadata:
    """The DCP `Metadata` of `state_dir/.metadata` (`__<rank>.metadata` for `rank`), unpickled with the
    allow-list; a missing, damaged or foreign file is a CheckpointError naming it."""
    path = Path(state_dir) / (METADATA if rank is None else f"__{rank}{METADATA}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or garbage pickle: any unpickling error
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def storage_files(state_dir: Path, metadata: dcp_metadata.Metadata) -> dict[str, int]:
    """{file name: the bytes its entries need} of the files `metadata` stores data in; a name that is not a
    plain file name in `state_dir` (a path, `..`) is a CheckpointError."""
    sizes = {}
    for info in metadata.storage_data.values():
        name = info.relative_path
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"{Path(state_dir) / METADATA}: names {name!r}, which is not a file of {state_dir}"
            )
        sizes[name] = max(sizes.get(name, 0), info.offset + info.length)
    return sizes


def check_train_state(state_dir: Path) -> None:
    """Raise CheckpointError naming the file when DCP dir `state_dir` has no readable `.metadata` (allow-list
    unpickling), or a file it lists is missing or shorter than the metadata says (a deleted or truncated
    shard)."""
    state_dir = Path(state_dir)
    for name, size in sorted(storage_files(state_dir, read_metadata(state_dir)).items()):
        shard = state_dir / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{shard}: truncated ({shard.stat().st_size} of {size} bytes)")


class StateReader(FileSystemReader):
    """DCP's FileSystemReader, reading `.metadata` with the allow-list unpickler (tensors it reads with
    `torch.load(weights_only=True)` already)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        """The checkpoint's metadata, as DCP's `read_metadata` returns it."""
        metadata = read_metadata(Path(self.path), kwargs.get("rank"))
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor items with `torch.load(weights_only=True)`, which
    admits only tensors, primitive types and containers."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        """Load one non-tensor item into the state dict (as DefaultLoadPlanner does, without running code)."""
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
