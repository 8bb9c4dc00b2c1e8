"""Hugging Face Llama layout: save a pico model as LlamaForCausalLM, load one back.

Both use RoPE in the "rotate half" layout, so every weight maps over by name alone. Only modules whose
Llama counterpart computes the same function are exported: a fork that swaps a module for another kind
(e.g. LayerNorm for RMSNorm) is refused by name instead of being written as a wrong Llama checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pico.errors import PicoError
from pico.model.config import PicoDecoderConfig

CONFIG_FILE = "config.json"  # the LlamaConfig of a model dir
WEIGHTS_FILE = "model.safetensors"  # its weights (Llama names); a sharded one has WEIGHTS_FILE.index.json
WEIGHTS_METADATA = {"format": "pt"}  # the safetensors metadata of WEIGHTS_FILE (transformers checks it)

_TOP_NAMES = {  # pico name -> Llama name
    "embedding_proj.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "de_embedding_proj.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # within layers.{i} -> within model.layers.{i}
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "swiglu_norm.weight": "post_attention_layernorm.weight",
    "swiglu.w_0.weight": "mlp.gate_proj.weight",
    "swiglu.w_1.weight": "mlp.up_proj.weight",
    "swiglu.w_2.weight": "mlp.down_proj.weight",
}
# The module kind behind each pico name (by its last part): what the Llama layout computes there.
_MODULE_KINDS = {
    "embedding_proj": nn.Embedding,
    "de_embedding_proj": nn.Linear,
    "attention_norm": nn.RMSNorm,
    "swiglu_norm": nn.RMSNorm,
    "output_norm": nn.RMSNorm,
    "q_proj": nn.Linear,
    "k_proj": nn.Linear,
    "v_proj": nn.Linear,
    "o_proj": nn.Linear,
    "w_0": nn.Linear,
    "w_1": nn.Linear,
    "w_2": nn.Linear,
}
_TOP_NAMES_INVERSE = {v: k for k, v in _TOP_NAMES.items()}
_LAYER_NAMES_INVERSE = {v: k for k, v in _LAYER_NAMES.items()}


_REQUIRED_KEYS = (  # the LlamaConfig fields with no default that pico reads
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


class ModelError(PicoError, ValueError):
    """A model dir or a model that the Llama layout cannot read or write; the message names the file or
    module."""

    kind = "model error"


def pico_to_llama_name(name: str) -> str:
    """Llama name of a pico parameter,
    e.g. layers.0.swiglu.w_0.weight -> model.layers.0.mlp.gate_proj.weight."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None or match[2] not in _LAYER_NAMES:
        raise KeyError(f"pico parameter {name!r} has no Llama counterpart")
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"


def llama_to_pico_name(name: str) -> str:
    """pico parameter name of a Llama parameter name (inverse of pico_to_llama_name)."""
    if name in _TOP_NAMES_INVERSE:
        return _TOP_NAMES_INVERSE[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None or match[2] not in _LAYER_NAMES_INVERSE:
        raise KeyError(f"Llama parameter {name!r} has no pico counterpart")
    return f"layers.{match[1]}.{_LAYER_NAMES_INVERSE[match[2]]}"


def _training_only(model: nn.Module, name: str) -> bool:
    """Whether parameter or module `name` lies in one of `model.training_only`'s child modules."""
    return name.split(".", 1)[0] in getattr(model, "training_only", ())


def export_problem(model: nn.Module) -> str | None:
    """Why `model` cannot be written in the Llama layout (the first module of another kind), or None.

    Its `training_only` modules (PicoDecoder.training_only) are left out of the export and not checked; a
    module that defines `effective_weight()` where an nn.Linear is expected is written as that Linear."""
    for name, module in model.named_modules():
        if _training_only(model, name):
            continue
        kind = _MODULE_KINDS.get(name.rsplit(".", 1)[-1])
        if kind is nn.Linear and hasattr(module, "effective_weight"):
            continue
        if kind is not None and type(module) is not kind:
            return (
                f"module {name} is a {type(module).__name__}, which the Llama layout cannot express "
                f"(it expects {kind.__name__} there)"
            )
        if kind is None and next(module.parameters(recurse=False), None) is not None:
            return f"module {name} ({type(module).__name__}) has parameters with no Llama counterpart"
    return None


def export_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], module_names: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """What the Llama export of `model` holds, from its full `state_dict` (pico names): the one rule.

    A model `export_problem` finds a module in is refused (ModelError naming it); each module with an
    `effective_weight()` (e.g. a LoRA linear: W + s·B·A) is written as the nn.Linear it computes, its entries
    replaced by `<name>.weight`; `training_only` modules are left out. `effective_weight()` may be a
    collective (under FSDP2): call this on every rank. `module_names` maps `model.named_modules()` names to
    the state dict's (e.g. without the parts compile inserts).
    """
    problem = export_problem(model)
    if problem:
        raise ModelError(f"HF export: {problem}")
    state = dict(state_dict)
    for name, module in model.named_modules():
        if hasattr(module, "effective_weight"):
            name = module_names(name) if module_names is not None else name
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
            state[f"{name}.weight"] = module.effective_weight().detach().to("cpu")  # (out, in)
    return {k: v for k, v in state.items() if not _training_only(model, k)}


def llama_config(
    config: PicoDecoderConfig, dtype: torch.dtype = torch.float32, **special_tokens: int
) -> dict:
    """The LlamaConfig fields (config.json) describing a pico architecture; `special_tokens`
    e.g. eos_token_id."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "intermediate_size": config.activation_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention_n_heads,
        "num_key_value_heads": config.attention_n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.position_emb_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": config.position_emb_theta},  # ... 5.x this
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
        **special_tokens,
    }


def pico_config_from_llama(hf: dict, source: str = CONFIG_FILE) -> PicoDecoderConfig:
    """The pico architecture of a Llama config.json dict; an unsupported variant is a ModelError naming
    the key."""

    def reject(message: str):
        raise ModelError(f"{source}: {message}; pico supports untied, bias-free Llama with plain RoPE")

    if hf.get("model_type") != "llama":
        reject(f"model_type={hf.get('model_type')!r} is not 'llama'")
    for key in _REQUIRED_KEYS:
        if key not in hf:
            reject(f"no {key}")
    if hf.get("tie_word_embeddings", False):
        reject("tie_word_embeddings=true (tied embeddings) is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            reject(f"{key}=true (biases) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        reject(f"hidden_act={hf['hidden_act']!r} is not supported")
    if hf.get("rope_scaling"):
        reject(f"rope_scaling={hf['rope_scaling']!r} is not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        reject(f"rope_parameters={rope!r} is not supported")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        reject(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads")
    return PicoDecoderConfig(
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        attention_n_heads=n_heads,
        attention_n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        activation_hidden_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        position_emb_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
    )


def expected_shapes(config: PicoDecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every pico parameter name of `config`'s architecture with its shape."""
    c, kv = config, config.attention_n_kv_heads * config.head_dim
    layer = {
        "attention_norm.weight": (c.d_model,),
        "attention.q_proj.weight": (c.d_model, c.d_model),
        "attention.k_proj.weight": (kv, c.d_model),
        "attention.v_proj.weight": (kv, c.d_model),
        "attention.o_proj.weight": (c.d_model, c.d_model),
        "swiglu_norm.weight": (c.d_model,),
        "swiglu.w_0.weight": (c.activation_hidden_dim, c.d_model),
        "swiglu.w_1.weight": (c.activation_hidden_dim, c.d_model),
        "swiglu.w_2.weight": (c.d_model, c.activation_hidden_dim),
    }
    shapes = {"embedding_proj.weight": (c.vocab_size, c.d_model)}
    shapes.update({f"layers.{i}.{k}": v for i in range(c.n_layers) for k, v in layer.items()})
    shapes.update({"output_norm.weight": (c.d_model,), "de_embedding_proj.weight": (c.vocab_size, c.d_model)})
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], config: PicoDecoderConfig, source: str):
    """Raise a ModelError naming the parameter unless state_dict has exactly the pico parameters of config,
    shapes included."""
    expected = expected_shapes(config)
    for name in state_dict:
        if name not in expected:
            raise ModelError(f"{source}: unexpected parameter {name!r} for this model config")
    for name, shape in expected.items():
        if name not in state_dict:
            raise ModelError(f"{source}: missing parameter {name!r}")
        if tuple(state_dict[name].shape) != shape:
            raise ModelError(
                f"{source}: parameter {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}"
            )


def save_pretrained(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    config: PicoDecoderConfig,
    directory: str | Path,
    *,
    tokenizer: str | Path | None = None,
    **special_tokens: int,
):
    """Write an HF model dir: config.json + model.safetensors (Llama names) for a module or a full state dict
    in pico names (`export_state` decides what a module exports), and the tokenizer files of `tokenizer`.

    Every model dir pico writes holds `model_files`. `special_tokens` (bos_token_id, eos_token_id) go to
    config.json so that `generate` stops at EOS; with a `tokenizer` they default to its first special token.
    """
    directory = Path(directory)
    weights, files = model_files(model_or_state_dict, config, tokenizer=tokenizer, **special_tokens)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights, directory / WEIGHTS_FILE, metadata=WEIGHTS_METADATA)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def model_files(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    config: PicoDecoderConfig,
    *,
    tokenizer: str | Path | None = None,
    **special_tokens: int,
) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """What `save_pretrained` writes: the tensors of model.safetensors (Llama names, on the CPU, contiguous;
    its metadata is WEIGHTS_METADATA) and {file name: content} of the other files (config.json, tokenizer
    files). The checkpoint writer writes them itself, hashing as it writes (pico.manifest)."""
    state_dict = model_or_state_dict
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = export_state(model_or_state_dict, model_or_state_dict.state_dict())
    check_state_dict(state_dict, config, "save_pretrained")
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) != 1:
        raise ModelError(
            f"save_pretrained: parameters mix dtypes {sorted(map(str, dtypes))}; cast them to one"
        )
    tensors = {pico_to_llama_name(k): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    files = {}
    if tokenizer is not None:
        tokenizer_files, tokens = _tokenizer_files(Path(tokenizer), config.max_seq_len)
        files.update(tokenizer_files)
        special_tokens = {**tokens, **special_tokens}
    config_json = llama_config(config, dtypes.pop(), **special_tokens)
    files[CONFIG_FILE] = (json.dumps(config_json, indent=2) + "\n").encode()
    return tensors, files


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the file's permissions following the umask as every file pico
    writes does (safetensors makes it 0600 whatever the umask)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask: from /proc/self/status where Linux has it, which leaves it alone; else set and
    put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def first_special_token(tokenizer: Tokenizer) -> tuple[int, str] | None:
    """(id, text) of the tokenizer's first special token (lowest id): pico's EOS and BOS (documents
    end with it; exports name it in config.json; evaluation conditions an empty context on it)."""
    special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return (min(special), special[min(special)]) if special else None


def _tokenizer_files(tokenizer: Path, max_len: int) -> tuple[dict[str, bytes], dict[str, int]]:
    """`tokenizer.json` and a `tokenizer_config.json` that make AutoTokenizer load it, its first special token
    being the EOS token and the pad token of batched inference (padded on the left, so that `generate`
    continues every row from its own last token; the attention mask hides the pads); and the bos/eos/pad
    ids for config.json."""
    data = tokenizer.read_bytes()
    first = first_special_token(Tokenizer.from_buffer(data))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if first is not None:
        config.update(eos_token=first[1], pad_token=first[1], padding_side="left")
    files = {"tokenizer.json": data, "tokenizer_config.json": json.dumps(config, indent=2).encode()}
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return files, (dict.fromkeys(ids, first[0]) if first is not None else {})


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a truncated or garbage file is a ModelError naming it."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, without the path
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def _index_shards(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names; one that is not a file of its directory (an
    absolute path, `..`) or an index that is not one is a ModelError naming it."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    for shard in shards:
        path = PurePosixPath(shard) if isinstance(shard, str) else None
        if path is None or path.is_absolute() or ".." in path.parts or "\\" in shard or not path.parts:
            raise ModelError(f"{index}: names {shard!r}, which is not a file of {index.parent}")
    return shards


def load_weight_files(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, keyed by Llama name."""
    single, index = directory / WEIGHTS_FILE, directory / f"{WEIGHTS_FILE}.index.json"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        return {
            k: v for shard in _index_shards(index) for k, v in _read_safetensors(directory / shard).items()
        }
    raise ModelError(
        f"{directory}: no {single.name} or {index.name} (only safetensors checkpoints are supported)"
    )


def load_pretrained(directory: str | Path) -> tuple[PicoDecoderConfig, dict[str, torch.Tensor]]:
    """The pico config and state dict (pico names) of a Llama-layout directory: ours or one
    transformers saved."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise ModelError(f"{config_path} does not exist")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from None
    config = pico_config_from_llama(hf_config, source=str(config_path))
    state_dict = {}
    for name, tensor in load_weight_files(directory).items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some transformers versions saved; recomputed here
            continue
        try:
            state_dict[llama_to_pico_name(name)] = tensor
        except KeyError as err:
            raise ModelError(f"{directory}: {err.args[0]}") from None
    check_state_dict(state_dict, config, str(directory))
    return config, state_dict
