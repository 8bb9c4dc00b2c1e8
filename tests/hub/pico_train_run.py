"""Write a run in pico-train's released format (the test builds it: no third-party data) from a pico run."""

import json
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from pico.run_dir import MODEL, dynamics_file, list_steps, step_dir

PREFIX = "_forward_module."  # what Lightning Fabric's wrapper puts in front of named_modules()


def pico_train_files(pico_run, step: int) -> dict[str, object]:
    """`learning_dynamics/` of one step in pico-train's format: file name → dict of tensors (or a Dataset)."""
    files = {}
    weights = load_file(dynamics_file(step_dir(pico_run, step), "weights"))
    for split, prefix in (("train", "train"), ("eval", "val")):
        data = load_file(dynamics_file(step_dir(pico_run, step), split))
        for kind in ("activations", "gradients"):
            files[f"{prefix}_{kind}.pt"] = {
                PREFIX + k.split(".", 1)[1]: t for k, t in data.items() if k.startswith(kind + ".")
            }
        files[f"{prefix}_weights.pt"] = {PREFIX + k.split(".", 1)[1]: t for k, t in weights.items()}
        files[f"{prefix}_data"] = Dataset.from_dict({"input_ids": data["input_ids"].tolist()})
    return files


def write_local(files: dict, folder: Path) -> None:
    """Save `pico_train_files` output into `folder` as pico-train does (torch.save, save_to_disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        if isinstance(value, Dataset):
            value.save_to_disk(str(folder / name))
        else:
            torch.save(value, folder / name)


def model_section(pico_run) -> dict:
    """pico-train's `model:` config keys for the pico run's model/config.json."""
    config = json.loads((step_dir(pico_run, list_steps(pico_run)[0]) / MODEL / "config.json").read_text())
    return {
        "d_model": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "attention_n_heads": config["num_attention_heads"],
        "attention_n_kv_heads": config["num_key_value_heads"],
        "activation_hidden_dim": config["intermediate_size"],
    }


def make_pico_train_run(pico_run, out: Path) -> Path:
    """pico-train's `learning_dynamics/` for each step of `pico_run`, and `out/training_config.yaml`."""
    for step in list_steps(pico_run):
        write_local(
            pico_train_files(pico_run, step), out / "checkpoints" / f"step_{step}" / "learning_dynamics"
        )
    (out / "training_config.yaml").write_text(yaml.safe_dump({"model": model_section(pico_run)}))
    return out
