"""Runs written by pico-train, converted to pico's layout so that pico.analysis reads them (docs/hub.md).

pico-train writes `<run>/training_config.yaml` once and, per checkpoint step N,
`checkpoints/step_<N>/learning_dynamics/{train,val}_{activations,weights,gradients}.pt` (each a dict module
name → tensor, all with W_N) and `train_data/` (the train batch, a `datasets.save_to_disk` folder). Its final
step has `val_*` only; there is never a `val_data/`. `convert_step` writes one step as pico's
`learning_dynamics/{train,eval,weights}.safetensors` (`val` is pico's `eval`), exactly where the meanings
agree and labelled where they do not:

- module names lose Lightning's wrapper prefix (`_forward_module.`, `_forward_module.module.` on >1 device);
- q_proj/k_proj rows (and their activations' columns) go from pico-train's interleaved RoPE order to pico's;
- gradients are divided by K, the learning-dynamics sub-batches per rank: pico-train sums K sub-batch-mean
  gradients (averaged over ranks), so this is the batch mean when every sub-batch of every rank has the same
  rows, and the mean of sub-batch means otherwise, which the file's `gradients` metadata then says;
- a one-device run's activations are dropped (`refused.activations` says why): pico-train's hook stores them
  transposed and re-cut there;
- positions come from `learning_dynamics.sequence_idx`; the eval split's input_ids are rebuilt from
  `learning_dynamics.eval_data` when that dataset is on this machine.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

import pico
from pico.analysis.checkpoints import BATCH_MEAN
from pico.errors import AnalysisError
from pico.model.hf import save_safetensors
from pico.model.pico_train import interleaved_to_half
from pico.run_dir import (
    CHECKPOINTS,
    DYNAMICS,
    dynamics_file,
    model_config_file,
    module_matches,
    run_name,
    step_dir,
    tensor_key,
)

SPLITS = {"train": "train", "val": "eval"}  # pico-train prefix → pico split
KINDS = ("activations", "weights", "gradients")
LAYOUT = ".pico_layout"  # in a pico-train run: its steps in pico's layout
TRAINING_CONFIG = "training_config.yaml"
CONVERTER = "2"  # the conversion's version: a step converted by another version is converted again
SCRAMBLED = (
    "pico-train on one device (training.fabric.num_devices x num_nodes = 1) stores each sub-batch's "
    "activations transposed and re-cut, not the modules' outputs"
)
_STEP = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class RunInfo:
    """What converting a pico-train run needs from its training_config.yaml."""

    model: dict  # the `model:` section
    world_size: int  # training.fabric.num_devices × num_nodes
    batch_size: int  # checkpointing.learning_dynamics.batch_size, over all ranks
    sequence_idx: int  # the position whose activations were stored
    eval_data: str | None  # the dataset whose `val` split is the eval batch

    @property
    def prefix(self) -> str:
        """What Lightning's wrapper puts before module names: the module itself, or DeepSpeed's engine."""
        return "_forward_module." if self.world_size == 1 else "_forward_module.module."

    @property
    def positions(self) -> str:
        """The `positions` metadata: `last` for sequence_idx -1, else the index."""
        return "last" if self.sequence_idx == -1 else str(self.sequence_idx)


def _get(tree, key: str, path: Path, kind: type | tuple):
    """The value at dotted `key` of the YAML `tree` read from `path`, which must be a `kind`."""
    value = tree
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise AnalysisError(f"{path}: no {key!r} (pico-train writes every config field)")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AnalysisError(f"{path}: {key} is {value!r}, not what pico-train writes there")
    return value


def read_training_config(path: Path) -> RunInfo:
    """The RunInfo of pico-train's `training_config.yaml` at `path`; a missing or bad key names itself."""
    if not path.is_file():
        raise AnalysisError(
            f"{path}: missing (pico-train writes it at its first checkpoint; it gives the world size, the "
            "learning-dynamics batch size and position, and the model)"
        )
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AnalysisError(f"{path}: not YAML ({e})".splitlines()[0]) from None
    ld = "checkpointing.learning_dynamics"
    info = RunInfo(
        model=_get(tree, "model", path, dict),
        world_size=_get(tree, "training.fabric.num_devices", path, int)
        * _get(tree, "training.fabric.num_nodes", path, int),
        batch_size=_get(tree, f"{ld}.batch_size", path, int),
        sequence_idx=_get(tree, f"{ld}.sequence_idx", path, int),
        eval_data=_get(tree, f"{ld}.eval_data", path, (str, type(None))),
    )
    if info.world_size < 1 or info.batch_size < info.world_size:
        raise AnalysisError(
            f"{path}: {ld}.batch_size {info.batch_size} over {info.world_size} device(s) is not a batch"
        )
    hf_config(info.model, path)
    return info


def hf_config(model: dict, where) -> dict:
    """The HF config keys pico's components read, from pico-train's model section."""
    try:
        heads = int(model["attention_n_heads"])
        return {
            "hidden_size": model["d_model"],
            "num_hidden_layers": model["n_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": int(model.get("attention_n_kv_heads") or heads),
            "intermediate_size": model.get("activation_hidden_dim"),
            "vocab_size": model.get("vocab_size"),
        }
    except KeyError as e:
        raise AnalysisError(f"{where}: the model section has no {e.args[0]!r}") from None


def gradients_meaning(n: int, info: RunInfo) -> tuple[int, str]:
    """(K, what stored / K is) for a split of n rows: pico-train's DataLoader takes batch_size // W rows a
    sub-batch from each rank's ceil(n / W) rows (DistributedSampler pads by repeating rows)."""
    per_rank, b = -(-n // info.world_size), info.batch_size // info.world_size
    rows = [min(b, per_rank - start) for start in range(0, per_rank, b)]
    padded = per_rank * info.world_size - n
    if not padded and len(set(rows)) == 1:
        return len(rows), BATCH_MEAN
    ranks = f" on each of {info.world_size} ranks" if info.world_size > 1 else ""
    pad = f", {padded} row{'s' * (padded > 1)} repeated to pad" if padded else ""
    sub = f"{len(rows)} sub-batch{'es' * (len(rows) > 1)} of {', '.join(map(str, rows))} rows"
    return len(rows), f"mean of sub-batch means (pico-train: {sub}{ranks}{pad})"


def eval_batch(eval_data: str | None) -> torch.Tensor | None:
    """pico-train's eval batch, every row of the `val` split of `eval_data`, when that dataset is on this
    machine (a local path, or a Hub dataset in the huggingface_hub cache); None otherwise. Never downloads."""
    if eval_data is None:
        return None
    source = Path(eval_data).expanduser()
    if not source.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            source = snapshot_download(eval_data, repo_type="dataset", local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError):
            return None
    from datasets import load_dataset

    try:
        return torch.tensor(load_dataset(str(source), split="val")["input_ids"], dtype=torch.int32)
    except Exception as e:  # datasets raises many types for data it cannot read
        raise AnalysisError(
            f"{source}: no val split of input_ids rows ({type(e).__name__}: {e})".splitlines()[0]
        ) from None


def load_pt(path: Path) -> dict[str, torch.Tensor]:
    """A pico-train `.pt` dict, read with `torch.load(weights_only=True)`; non-tensor entries are refused."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise AnalysisError(
            f"{path}: holds objects torch.load(weights_only=True) refuses to unpickle ({first})"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise AnalysisError(f"{path}: not a readable torch.save file ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a dict of module name → tensor, got {type(data).__name__}")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise AnalysisError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return data


def _pico_tensors(path: Path, kind: str, info: RunInfo) -> dict[str, torch.Tensor]:
    """One `.pt` file's tensors by pico module name, in pico's q/k row order; shapes checked."""
    tensors = {}
    for name, t in load_pt(path).items():
        if not name.startswith(info.prefix):
            raise AnalysisError(
                f"{path}: module {name!r} lacks the {info.prefix!r} that pico-train puts before names on "
                f"{info.world_size} device(s) ({TRAINING_CONFIG})"
            )
        name = name[len(info.prefix) :]
        if t.dim() != 2:
            shape = "(N, out_features)" if kind == "activations" else "(out_features, in_features)"
            raise AnalysisError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}")
        tensors[name] = _rope_order(name, kind, t, info.model).contiguous()
    return tensors


def _rope_order(name: str, kind: str, t: torch.Tensor, model: dict) -> torch.Tensor:
    """q_proj/k_proj rows (activations: columns) from pico-train's interleaved RoPE pairs to pico's halves."""
    kv_heads = model.get("attention_n_kv_heads") or model["attention_n_heads"]
    for suffix, heads in (("attention.q_proj", model["attention_n_heads"]), ("attention.k_proj", kv_heads)):
        if module_matches(name, suffix):
            if kind == "activations":  # (N, heads·D): the same permutation of the columns
                return interleaved_to_half(t.T.contiguous(), heads).T
            return interleaved_to_half(t.contiguous(), heads)
    return t


def _input_ids(folder: Path) -> torch.Tensor | None:
    """The batch's input_ids (N, T+1) from a `datasets.save_to_disk` folder, or None without one."""
    if not folder.is_dir():
        return None
    from datasets import load_from_disk

    try:
        return torch.tensor(load_from_disk(str(folder))["input_ids"], dtype=torch.int32)
    except Exception as e:  # datasets raises many types for a broken folder
        raise AnalysisError(
            f"{folder}: cannot read input_ids ({type(e).__name__}: {e})".splitlines()[0]
        ) from None


def _split(folder: Path, prefix: str, info: RunInfo, eval_ids) -> tuple[dict, dict, dict] | None:
    """(tensors, weights, metadata) of pico's file for split `prefix`, from pico-train's files in `folder`;
    None when the step has no such split."""
    data = {k: _pico_tensors(p, k, info) for k in KINDS if (p := folder / f"{prefix}_{k}.pt").is_file()}
    if not data:
        return None
    acts, grads = data.get("activations", {}), data.get("gradients", {})
    rows = {t.shape[0] for t in acts.values()}  # activations are trimmed to the batch's rows
    if len(rows) > 1 or (grads and not rows):
        raise AnalysisError(
            f"{folder}/{prefix}_activations.pt: rows {sorted(rows)}; expected one batch's rows"
        )
    n = next(iter(rows), None)
    ids = _input_ids(folder / f"{prefix}_data") if prefix == "train" else eval_ids()
    if ids is not None and n is not None and len(ids) != n:
        source = f"{folder}/{prefix}_data" if prefix == "train" else f"the val split of {info.eval_data} here"
        raise AnalysisError(
            f"{source} has {len(ids)} rows, the step's {prefix} activations {n}: not the batch the run "
            "captured"
        )
    metadata, tensors = {"split": SPLITS[prefix], "positions": info.positions}, {}
    if grads:
        k, metadata["gradients"] = gradients_meaning(n, info)
        tensors |= {tensor_key("gradients", m): g / k for m, g in grads.items()}
    if info.world_size == 1:
        metadata["refused.activations"] = SCRAMBLED
    else:
        tensors |= {tensor_key("activations", m): a for m, a in acts.items()}
    if ids is not None:
        tensors["input_ids"] = ids
    return tensors, data.get("weights", {}), metadata


def _up_to_date(out_step: Path, inputs: set[Path]) -> bool:
    """Whether `out_step` was converted by this CONVERTER after every input last changed."""
    done = dynamics_file(out_step, "weights")
    if not done.is_file():
        return False
    with safe_open(done, framework="pt") as f:
        converter = (f.metadata() or {}).get("converter")
    return converter == CONVERTER and all(p.stat().st_mtime <= done.stat().st_mtime for p in inputs)


def convert_step(
    sources: dict[str, Path], out_step: Path, info: RunInfo, *, step: int, config: Path, eval_ids=lambda: None
) -> None:
    """Write `out_step/learning_dynamics/{train,eval,weights}.safetensors` and `model/config.json` from
    pico-train's files of each split (`sources`: prefix → the folder holding them); skipped when up to date.
    `eval_ids()` gives the rebuilt eval batch (or None); `config` is the training_config.yaml read."""
    inputs = {config} | {p for folder in sources.values() for p in folder.rglob("*") if p.is_file()}
    if _up_to_date(out_step, inputs):
        return
    splits = {p: s for p, folder in sources.items() if (s := _split(folder, p, info, eval_ids)) is not None}
    weights = next((splits[p][1] for p in ("val", "train") if p in splits and splits[p][1]), None)
    if weights is None:
        raise AnalysisError(
            f"{', '.join(sorted(map(str, set(sources.values()))))}: no train_ or val_weights.pt"
        )
    files = {SPLITS[p]: (tensors, metadata) for p, (tensors, _, metadata) in splits.items()}
    files["weights"] = ({tensor_key("weights", m): w for m, w in weights.items()}, {"split": "weights"})
    folder = out_step / DYNAMICS
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):  # a split this step no longer has must not stay behind
        old.unlink()
    common = {"step": str(step), "world_size": str(info.world_size), "source": "pico-train"}
    common |= {"converter": CONVERTER, "pico_version": pico.__version__}
    for name, (tensors, metadata) in files.items():  # weights last: it marks the step converted
        dtypes = sorted(
            {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
        )
        metadata = common | metadata | {"dtype": ", ".join(dtypes)}
        save_safetensors(tensors, dynamics_file(out_step, name), metadata=metadata)
    model_config_file(out_step).parent.mkdir(parents=True, exist_ok=True)
    model_config_file(out_step).write_text(json.dumps(hf_config(info.model, config), indent=2))


def _steps(run_dir: Path) -> dict[int, Path]:
    """Step → step dir of the pico-train checkpoints holding learning-dynamics .pt files."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return {}
    return {
        int(m.group(1)): p
        for p in root.iterdir()
        if (m := _STEP.fullmatch(p.name)) and any((p / DYNAMICS).glob("*.pt"))
    }


def is_pico_train_run(run_dir) -> bool:
    """True when `run_dir` holds pico-train's learning-dynamics .pt files (and none of pico's)."""
    run_dir = Path(run_dir)
    steps = _steps(run_dir)
    return bool(steps) and not any(dynamics_file(p, "weights").is_file() for p in steps.values())


def as_pico_run(run_dir) -> Path:
    """The pico-layout copy of pico-train run `run_dir`: `<run_dir>/.pico_layout/<name>` (same folder name,
    so the analysis' run column is the run's name), converted where missing or out of date."""
    run_dir = Path(run_dir)
    steps = _steps(run_dir)
    if not steps:
        raise AnalysisError(f"{run_dir}: no checkpoints/step_<N>/{DYNAMICS}/*.pt files of pico-train")
    config = run_dir / TRAINING_CONFIG
    info = read_training_config(config)
    eval_ids = functools.cache(lambda: eval_batch(info.eval_data))
    out = run_dir / LAYOUT / run_name(run_dir)
    for step, path in sorted(steps.items()):
        folder = path / DYNAMICS
        convert_step(
            {p: folder for p in SPLITS},
            step_dir(out, step),
            info,
            step=step,
            config=config,
            eval_ids=eval_ids,
        )
    return out
