"""Runs written by pico-train, presented in pico's layout so that pico.analysis reads them unchanged.

pico-train writes `<run>/checkpoints/step_<N>/learning_dynamics/`
`{train,val}_{activations,weights,gradients}.pt` (each a dict: module name → tensor), `{train,val}_data/` (a
`datasets.save_to_disk` folder holding the batch) and `<run>/training_config.yaml`. `as_pico_run` converts
each step once into `<run>/.pico_layout/<run name>/checkpoints/step_<N>/` (`learning_dynamics/`
`{train,eval,weights}.safetensors`, `model/config.json`); `val` becomes pico's `eval` split and the
wrapper's module-name prefix is stripped (docs/hub.md).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import pico
from pico.errors import AnalysisError
from pico.run_dir import CHECKPOINTS, DYNAMICS, MODEL, dynamics_file, step_dir, tensor_key

SPLITS = {"train": "train", "val": "eval"}  # pico-train prefix → pico split
KINDS = ("activations", "weights", "gradients")
LAYOUT = ".pico_layout"  # in a pico-train run: its steps in pico's layout
TRAINING_CONFIG = "training_config.yaml"
_STEP = re.compile(r"step_(\d+)")
_LAYER = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


def _pt_files(step_path: Path) -> list[Path]:
    return [step_path / DYNAMICS / f"{p}_{k}.pt" for p in SPLITS for k in KINDS]


def _steps(run_dir: Path) -> dict[int, Path]:
    """Step → step dir of the pico-train checkpoints holding learning-dynamics .pt files."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return {}
    return {
        int(m.group(1)): p
        for p in root.iterdir()
        if (m := _STEP.fullmatch(p.name)) and any(f.is_file() for f in _pt_files(p))
    }


def is_pico_train_run(run_dir) -> bool:
    """True when `run_dir` holds pico-train's learning-dynamics .pt files (and none of pico's)."""
    run_dir = Path(run_dir)
    steps = _steps(run_dir)
    return bool(steps) and not any(dynamics_file(p, "weights").is_file() for p in steps.values())


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
    return strip_prefix(data, path)


def strip_prefix(tensors: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """Module names without the wrapper's common prefix (`_forward_module.layers.0.attention.v_proj` →
    `layers.0.attention.v_proj`)."""
    prefixes = {name[: m.start(1)] if (m := _LAYER.search(name)) else None for name in tensors}
    if None in prefixes or len(prefixes) > 1:
        odd = sorted(n for n in tensors if not _LAYER.search(n)) or sorted(tensors)
        raise AnalysisError(
            f"{where}: module names without a common prefix before layers.<i>. (e.g. {odd[0]!r})"
        )
    (prefix,) = prefixes or {""}
    return {name[len(prefix) :]: t for name, t in tensors.items()}


def hf_config(config: dict) -> dict:
    """The HF config keys pico's components read, from pico-train's model config (or an HF config.json)."""
    if "num_attention_heads" in config:
        return config
    try:
        heads = int(config["attention_n_heads"])
        return {
            "hidden_size": config["d_model"],
            "num_hidden_layers": config["n_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": int(config.get("attention_n_kv_heads") or heads),
            "intermediate_size": config.get("activation_hidden_dim"),
            "vocab_size": config.get("vocab_size"),
        }
    except KeyError as e:
        raise AnalysisError(f"pico-train model config has no {e.args[0]!r}") from None


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


def _check(path: Path, kind: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.dim() != 2:
            shape = "(N, out_features)" if kind == "activations" else "(out_features, in_features)"
            raise AnalysisError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}")


def convert_step(
    ld_dir: Path, out_step: Path, model_config: dict | None, where, step: int | None = None
) -> None:
    """Write `out_step/learning_dynamics/{train,eval,weights}.safetensors` (and `model/config.json`) from
    pico-train's files in `ld_dir`; skipped when they are newer than their sources."""
    sources = [p for p in ld_dir.glob("*.pt")] + [p for p in ld_dir.glob("*_data") if p.is_dir()]
    done = dynamics_file(out_step, "weights")
    if done.is_file() and all(p.stat().st_mtime <= done.stat().st_mtime for p in sources):
        return
    files, weights = {}, {}
    for prefix, split in SPLITS.items():
        tensors = {}
        for kind in KINDS:
            path = ld_dir / f"{prefix}_{kind}.pt"
            if not path.is_file():
                continue
            data = load_pt(path)
            _check(path, kind, data)
            if kind == "weights":
                weights = weights or data  # W_N: the same in both splits
            else:
                tensors.update({tensor_key(kind, n): t.contiguous() for n, t in data.items()})
        if tensors:
            ids = _input_ids(ld_dir / f"{prefix}_data")
            if ids is not None:
                tensors["input_ids"] = ids
            files[split] = tensors
    if weights:
        files["weights"] = {tensor_key("weights", n): t.contiguous() for n, t in weights.items()}
    if "weights" not in files:
        raise AnalysisError(f"{where}: no {{train,val}}_weights.pt in {ld_dir}")
    for name in sorted(files, key=lambda n: n == "weights"):  # weights last: it marks the step converted
        path = dynamics_file(out_step, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "split": name,
            "positions": "last",
            "source": "pico-train",
            "pico_version": pico.__version__,
        }
        save_file(files[name], path, metadata=metadata | ({"step": str(step)} if step is not None else {}))
    if model_config is not None:
        (out_step / MODEL).mkdir(parents=True, exist_ok=True)
        (out_step / MODEL / "config.json").write_text(json.dumps(model_config, indent=2))


def as_pico_run(run_dir) -> Path:
    """The pico-layout copy of pico-train run `run_dir`: `<run_dir>/.pico_layout/<name>` (same folder name,
    so the analysis' run column is the run's name), converted where missing or out of date."""
    run_dir = Path(run_dir)
    steps = _steps(run_dir)
    if not steps:
        raise AnalysisError(f"{run_dir}: no checkpoints/step_<N>/{DYNAMICS}/*.pt files of pico-train")
    config, model = run_dir / TRAINING_CONFIG, None
    if config.is_file():
        try:
            model = hf_config((yaml.safe_load(config.read_text()) or {}).get("model") or {})
        except (ValueError, yaml.YAMLError, AttributeError) as e:
            raise AnalysisError(f"{config}: {e}".splitlines()[0]) from None
    out = run_dir / LAYOUT / run_dir.resolve().name
    for step, path in sorted(steps.items()):
        convert_step(path / DYNAMICS, step_dir(out, step), model, path, step)
    return out
