"""A pico export as a checkpoint writes it (weights, config.json, tokenizer files), and transformers on it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pico.data.demo import train_tokenizer
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.model.hf import pico_to_llama_name

TEXT = [  # invented lines for a tiny BPE
    "The painter carries seven lanterns under the bridge at dawn.",
    "A quiet baker finds the wooden boat behind the mill.",
    "Two tall farmers repair the broken fence on the hill.",
    "My neighbour sells some fresh bread near the harbour.",
]
# pico module -> the TransformerLens hook of its output (docs/interop.md); q/k/v come split into heads there.
TL_HOOKS = {
    "embedding_proj": "hook_embed",
    "layers.3.attention_norm": "blocks.3.ln1.hook_out",
    "layers.3.attention.q_proj": "blocks.3.attn.hook_q",
    "layers.3.attention.k_proj": "blocks.3.attn.hook_k",
    "layers.3.attention.v_proj": "blocks.3.attn.hook_v",
    "layers.3.attention.o_proj": "blocks.3.hook_attn_out",
    "layers.3.swiglu_norm": "blocks.3.ln2.hook_out",
    "layers.3.swiglu.w_0": "blocks.3.mlp.hook_pre",
    "layers.3.swiglu.w_1": "blocks.3.mlp.hook_pre_linear",
    "layers.3.swiglu.w_2": "blocks.3.hook_mlp_out",
    "output_norm": "ln_final.hook_out",
    "de_embedding_proj": "unembed.hook_out",
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The `model/` dir of a 4-layer GQA pico decoder with random weights (norms too) and its tokenizer."""
    root = tmp_path_factory.mktemp("interop")
    train_tokenizer(TEXT * 8, vocab_size=300).save(str(root / "tokenizer.json"))
    config = PicoDecoderConfig(
        d_model=64,
        n_layers=4,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=96,
        vocab_size=300,
        max_seq_len=32,
    )
    torch.manual_seed(0)
    model = PicoDecoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(root / "model", tokenizer=root / "tokenizer.json")
    return root / "model"


@pytest.fixture(scope="module")
def hf_model(export):
    """transformers' own model of the export: the reference for logits and activations."""
    return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()


@pytest.fixture
def ids():
    """A batch of token ids, (2, 32)."""
    return torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))


def hf_outputs(hf_model, ids, modules: list[str]) -> dict[str, torch.Tensor]:
    """Logits and the outputs of `modules` (pico names) in transformers' model on `ids`, by forward hooks."""
    outputs, handles = {}, []

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out

        return hook

    for name in modules:
        llama = pico_to_llama_name(f"{name}.weight").removesuffix(".weight")
        handles.append(hf_model.get_submodule(llama).register_forward_hook(keep(name)))
    try:
        with torch.no_grad():
            outputs["logits"] = hf_model(ids).logits  # (B, T, vocab_size)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
