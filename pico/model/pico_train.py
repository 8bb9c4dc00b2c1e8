"""pico-train's `pico_decoder` checkpoints, read as a PicoDecoder without running the code they ship.

pico-train saves a Hugging Face model at the root of every step dir (and of its Hub branch): a config.json
with `model_type: pico_decoder` whose architecture keys are pico's config fields one to one, weights
`pico_decoder.<pico name>` in model.safetensors, and `pico_decoder.py`, remote code that pico never imports.
The one difference in the weights is RoPE's layout: pico-train rotates interleaved pairs (x[2i], x[2i+1]),
pico the halves (x[i], x[i + D/2]) as HF Llama does, so each head's q_proj and k_proj rows are reordered
(even rows, then odd). q and k get the same order, so every attention score, and the logits, are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pico.config_loader import ConfigError
from pico.model.config import PicoDecoderConfig
from pico.model.hf import _check_state_dict, _load_llama_tensors

MODEL_TYPE = "pico_decoder"
WEIGHT_PREFIX = "pico_decoder."
FIELDS = tuple(f.name for f in dataclasses.fields(PicoDecoderConfig))  # the same names in both
# config.json keys that do not describe the architecture: transformers' bookkeeping, and pico-train's
# ModelConfig.batch_size (stored on its attention modules, never used by them)
IGNORED_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "_attn_implementation_autoset",
        "batch_size",
    }
)


def _read_config(directory: Path) -> dict | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def is_pico_train_model(directory: str | Path) -> bool:
    """Whether `directory` holds a pico-train model (config.json with model_type pico_decoder)."""
    config = _read_config(Path(directory))
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def pico_config(config: dict, source: str = "config.json") -> PicoDecoderConfig:
    """The PicoDecoderConfig of a pico-train config.json dict; an unknown or missing key raises one line."""
    for key in config:
        if key not in FIELDS and key not in IGNORED_KEYS:
            raise ConfigError(
                f"{source}: unknown key {key!r} for a pico_decoder model; known: {list(FIELDS)}"
            )
    required = [f.name for f in dataclasses.fields(PicoDecoderConfig) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in config]
    if missing:
        raise ConfigError(f"{source}: missing key {missing[0]!r} of a pico_decoder model")
    try:
        return PicoDecoderConfig.from_dict({k: config[k] for k in FIELDS if k in config})
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows (n_heads·D, C) from pico-train's RoPE pairs (2i, 2i+1) to pico's (i, i + D/2)."""
    rows, cols = weight.shape
    per_head = weight.view(n_heads, rows // n_heads // 2, 2, cols)  # (heads, D/2, pair, C)
    return per_head.transpose(1, 2).reshape(rows, cols)  # (heads, pair, D/2, C): evens, then odds


def pico_state_dict(tensors: dict[str, torch.Tensor], config: PicoDecoderConfig, source: str) -> dict:
    """pico's state dict from pico-train's `pico_decoder.*` tensors: prefix dropped, q/k rows reordered."""
    state = {}
    for name, tensor in tensors.items():
        if not name.startswith(WEIGHT_PREFIX):
            raise ValueError(f"{source}: tensor {name!r} is not under {WEIGHT_PREFIX!r}")
        name = name.removeprefix(WEIGHT_PREFIX)
        if name.endswith("attention.q_proj.weight"):
            tensor = interleaved_to_half(tensor, config.attention_n_heads)
        elif name.endswith("attention.k_proj.weight"):
            tensor = interleaved_to_half(tensor, config.attention_n_kv_heads)
        state[name] = tensor
    _check_state_dict(state, config, source)
    return state


def load_pretrained(directory: str | Path) -> tuple[PicoDecoderConfig, dict[str, torch.Tensor]]:
    """The pico config and state dict (pico names and RoPE layout) of a pico-train model directory."""
    directory = Path(directory)
    config = pico_config(_read_config(directory) or {}, source=str(directory / "config.json"))
    return config, pico_state_dict(_load_llama_tensors(directory), config, str(directory))
