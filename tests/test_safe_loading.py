"""Resuming never runs code from a checkpoint (issue 21.1; docs/checkpoints.md, "What pico loads").

No unrestricted unpickling in pico/ or recipes/ (a grep, on the AST); DCP metadata is read with an allow-list
that is exactly what pico's runs write; crafted metadata and crafted state objects are refused, also by the
recipe resuming locally or from the Hub stand-in (exit 2, one line), and their payload never runs.
"""

import ast
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex

import pico.hub.api
import pico.state_reader
from pico.checkpoint import CheckpointError, CheckpointStep, CheckpointWriter, load_train_state
from pico.distributed import parallelize
from pico.model import PicoDecoder
from pico.model.hf import load_pretrained
from pico.run_dir import step_dir
from pico.state_reader import ALLOWED, read_metadata
from tests.checkpoint_writes import CONFIG, update
from tests.distributed import run_distributed_test
from tests.finished_run import args, finished_run, rehash
from tests.hub.standin import LocalHub
from tests.recipes.common import ROOT, recipe_module

SOURCES = sorted([*ROOT.glob("pico/**/*.py"), *ROOT.glob("recipes/**/*.py")])
READER = ROOT / "pico" / "state_reader.py"  # the one module that may unpickle (with its allow-list)
PICKLERS = ("pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle")


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, path: Path) -> list[str]:
    """`<line>: <call>` of every way `source` could run code while reading a file: pickle-family loads,
    torch.load without weights_only=True, DCP reads without pico's reader and planner, DCP's own reader,
    unsafe YAML, numpy/pandas pickles, torch's safe-globals widening, trust_remote_code, and (outside
    pico/state_reader.py) any Unpickler."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and path != READER:
            found += [
                f"{node.lineno}: class {node.name}" for b in node.bases if "Unpickler" in ast.unparse(b)
            ]
        if not isinstance(node, ast.Call):
            continue
        func, kw = ast.unparse(node.func), {k.arg: k.value for k in node.keywords}
        head, _, last = func.rpartition(".")
        bad = (
            (head in PICKLERS and last in ("load", "loads", "Unpickler"))
            or (func == "torch.load" and not _true(kw.get("weights_only")))
            or ("weights_only" in kw and not _true(kw["weights_only"]))
            or (
                func in ("dcp.load", "torch.distributed.checkpoint.load")
                and not {"storage_reader", "planner"} <= set(kw)
            )
            or (last == "FileSystemReader" and path != READER)
            or (head and last == "read_metadata" and path != READER)  # a DCP reader's own (pickle.load)
            or (last in ("unsafe_load", "full_load") or (func == "yaml.load"))
            or (last == "load" and head in ("np", "numpy") and _true(kw.get("allow_pickle")))
            or last in ("read_pickle", "add_safe_globals", "safe_globals")
            or _true(kw.get("trust_remote_code"))
            or ("Unpickler" in func and path != READER)
        )
        if bad:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_unrestricted_unpickling_on_any_path_that_reads_a_run_dir_hub_download_or_model_dir():
    # The detector finds what it must (so that the empty answer below means something) ...
    sample = (
        "pickle.load(f)\nx = pickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "dcp.load(sd, checkpoint_id=p)\nFileSystemReader(p).read_metadata()\nyaml.load(t)\n"
        "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
        "class U(pickle.Unpickler): pass\n"
    )
    assert {int(f.split(":")[0]) for f in unsafe_loads(sample, Path("x.py"))} == set(range(1, 11))
    assert unsafe_loads("torch.load(p, weights_only=True)\nyaml.safe_load(t)\n", Path("x.py")) == []
    # ... and pico and the recipes have none.
    assert len(SOURCES) > 50
    found = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text(), p) for p in SOURCES}
    assert {path: lines for path, lines in found.items() if lines} == {}


class Payload:
    """Unpickling this runs `touch <marker>` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_payload_is_live_for_an_unrestricted_unpickler(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))  # what DCP's own reader would do
    assert (tmp_path / "ran").exists()


def _record(paths) -> set[tuple[str, str]]:
    """The globals that the metadata files at `paths` pickle, read with pico's allow-list unpickler."""
    seen = set()

    class Recording(pico.state_reader._MetadataUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    for path in paths:
        with open(path, "rb") as f:
            Recording(f, path).load()
    return seen


def _write_steps(run_dir: Path, strategy: str) -> None:
    """Steps 0 (no optimizer state yet) and 1 of a tiny model, written by CheckpointWriter."""
    torch.manual_seed(0)
    model = PicoDecoder(CONFIG)
    if strategy != "single":
        model = parallelize(model, strategy=strategy, world_size=2, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = CheckpointWriter(run_dir / strategy)
    for step in range(2):
        writer.complete_write()
        writer.save(CheckpointStep(step, {"step": step}), model, optimizer)
        update(model, optimizer, step)
    writer.complete_write()


def test_the_allow_list_is_what_dcp_metadata_of_pico_runs_is_made_of(tmp_path):
    _write_steps(tmp_path, "single")
    for strategy in ("ddp", "fsdp"):
        run_distributed_test(_write_steps, world_size=2, args=(tmp_path, strategy))
    files = sorted(tmp_path.glob("*/checkpoints/step_*/state/.metadata"))
    assert len(files) == 6
    seen = _record(files)
    dcp_classes = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata")
    } | {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
    }
    assert seen == dcp_classes | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch", "float32"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
    }
    # The rest of the allow-list: non-tensor items of checkpoints written before train_state.json, and
    # PosixPath as Python >= 3.13 pickles it. Torch dtypes other than float32 are admitted by kind.
    assert set(ALLOWED) - seen == {
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("pathlib._local", "PosixPath"),
    }


def _handmade(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


CRAFTED = {  # name → (the pickle, what the refusal says after "<file>: refused: ")
    "os.system": (
        lambda m: pickle.dumps(Payload(m)),
        "it pickles posix.system, which DCP metadata never holds",
    ),
    "eval": (
        lambda m: _handmade(b"cbuiltins\neval\n" + pickle.dumps(f"open('{m}', 'w')", 0)[:-1] + b"\x85R"),
        "it pickles builtins.eval",
    ),
    "inside real metadata": (None, "it pickles posix.system"),
    "sets a class's state": (
        lambda m: _handmade(b"ctorch.distributed.checkpoint.metadata\nMetadata\n}b"),
        "it sets the state of a type, which DCP metadata never does",
    ),
    "persistent id": (lambda m: _handmade(b"Pmarker\n"), "it holds a persistent id"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_metadata_is_refused_before_its_payload_runs(tmp_path, case):
    _write_steps(tmp_path, "single")
    state = step_dir(tmp_path / "single", 1) / "state"
    marker = tmp_path / "ran"
    craft, why = CRAFTED[case]
    if craft is None:  # an attacker keeps the real structure and hides the payload in one field
        metadata = read_metadata(state)
        metadata.storage_meta = Payload(marker)
        data = pickle.dumps(metadata)
    else:
        data = craft(marker)
    (state / ".metadata").write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        read_metadata(state)
    assert str(error.value).startswith(f"{state / '.metadata'}: refused: {why}")
    assert "\n" not in str(error.value) and not marker.exists()


def _legacy_state(state: Path, weights: dict, marker: Path) -> None:
    """Replace DCP dir `state` by one as pico wrote before train_state.json (the rest of the train state in
    DCP), whose `extra.step` is a crafted object."""
    shutil.rmtree(state)
    extra = {"step": Payload(marker), "rng": {"torch": torch.get_rng_state()}}
    dcp.save({"model": weights, "extra": extra}, checkpoint_id=state)


def _crafted_tensor(state: Path, marker: Path) -> None:
    """Point DCP's entry of one weight at a crafted torch.save blob appended to its shard."""
    metadata = read_metadata(state)
    key = next(k for k in metadata.storage_data if k.fqn == "model.embedding_proj.weight")
    info = metadata.storage_data[key]
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    shard = state / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buffer.getvalue())
    metadata.storage_data[MetadataIndex(key.fqn, key.offset, key.index)] = type(info)(
        info.relative_path, offset, len(buffer.getvalue())
    )
    with open(state / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


@pytest.mark.parametrize("craft", ["legacy bytes item", "tensor item"])
def test_crafted_state_objects_are_refused_before_their_payload_runs(tmp_path, craft):
    _write_steps(tmp_path, "single")
    step = step_dir(tmp_path / "single", 1)
    marker = tmp_path / "ran"
    model = PicoDecoder(CONFIG)
    if craft == "legacy bytes item":
        _legacy_state(step / "state", model.state_dict(), marker)
        # DCP's default planner would run it: the payload is live
        template = {
            "model": model.state_dict(),
            "extra": {"step": None, "rng": {"torch": torch.get_rng_state()}},
        }
        dcp.load(template, checkpoint_id=step / "state", planner=DefaultLoadPlanner())
        assert marker.exists()
        marker.unlink()
    else:
        _crafted_tensor(step / "state", marker)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError) as error:
        load_train_state(step / "state", model, optimizer)
    assert str(error.value) == (
        f"{step / 'state'}: refused by torch.load(weights_only=True): Trying to load unsupported GLOBAL "
        "posix.system whose module posix is blocked. (a damaged, crafted or foreign checkpoint; pico does "
        "not run code from checkpoints)"
    )
    assert "\n" not in str(error.value) and not marker.exists()


# The recipe, resuming: locally and from the Hub stand-in.


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(data, a finished run with steps 0 and 3)."""
    return finished_run(tmp_path_factory.mktemp("finished"))


def craft_step(step: Path, craft: str, marker: Path) -> None:
    """Craft step dir `step` (`metadata` or `state object`) and re-hash its manifest."""
    if craft == "metadata":
        metadata = read_metadata(step / "state")
        metadata.storage_meta = Payload(marker)
        (step / "state" / ".metadata").write_bytes(pickle.dumps(metadata))
    else:
        _, weights = load_pretrained(step / "model")
        _legacy_state(step / "state", weights, marker)
    rehash(step)


WHY = {
    "metadata": "/state/.metadata: refused: it pickles posix.system, which DCP metadata never holds",
    "state object": "/state: refused by torch.load(weights_only=True): Trying to load unsupported GLOBAL",
}


@pytest.mark.parametrize("source", ["local", "hub"])
@pytest.mark.parametrize("craft", ["metadata", "state object"])
def test_the_recipe_refuses_a_crafted_checkpoint_with_exit_2_and_runs_nothing(
    finished, tmp_path, capsys, monkeypatch, source, craft
):
    data, run = finished
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    step = step_dir(evil, 3)
    craft_step(step, craft, marker)
    if source == "local":  # branching a new run from it
        overrides, where = [f"checkpointing.resume={step}"], str(step)
    else:  # someone else's repo, resumed by `checkpointing.resume=hf://...`
        hub = LocalHub(tmp_path / "standin")
        hub.set_faults()
        files = {p.relative_to(step).as_posix(): p.read_bytes() for p in step.rglob("*") if p.is_file()}
        files = {n: b for n, b in files.items() if n.startswith("state/") or n == "manifest.json"}
        commit = hub.add_commit(
            "evil/run", "main", "step 3", {**files, "config.yaml": (evil / "config.yaml").read_bytes()}
        )
        monkeypatch.setattr(pico.hub.api, "connect", lambda: hub)
        overrides, where = (
            ["checkpointing.resume=hf://evil/run@main"],
            str(tmp_path / "standin" / "cache" / "evil--run" / commit),
        )
    with pytest.raises(SystemExit) as exit_:
        recipe_module("pretrain").main(args(data, tmp_path / "victim", "training.max_steps=6", *overrides))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run error: {where}{WHY[craft]}"), err
    assert not marker.exists()
