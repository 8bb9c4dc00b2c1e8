"""Hugging Face interop against the real transformers LlamaForCausalLM, both directions."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pico.model import PicoDecoder, PicoDecoderConfig, from_pretrained, save_pretrained
from pico.model.hf import (
    ModelError,
    export_problem,
    first_special_token,
    llama_to_pico_name,
    pico_to_llama_name,
)

CONFIG = PicoDecoderConfig(
    d_model=64,
    n_layers=2,
    attention_n_heads=4,
    attention_n_kv_heads=2,
    activation_hidden_dim=128,
    vocab_size=256,
    max_seq_len=32,
    norm_eps=1e-5,
    position_emb_theta=500.0,
)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter (norm weights included) distinct random values so no swap goes unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_pico_to_hf_logits_match(tmp_path):
    model = randomized(PicoDecoder(CONFIG))
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "pico" not in saved and saved["torch_dtype"] == "float32"


def test_hf_saved_llama_loads_into_pico(tmp_path):
    hf_config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=False,
    )
    hf = randomized(LlamaForCausalLM(hf_config)).eval()
    hf.save_pretrained(tmp_path)
    model = PicoDecoder.from_pretrained(tmp_path)
    assert model.config == CONFIG
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_pico_disk_pico_is_exact(tmp_path):
    model = randomized(PicoDecoder(CONFIG))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == CONFIG
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(ids), loaded(ids))


def test_save_plain_state_dict_in_bf16_loads_as_fp32(tmp_path):
    model = randomized(PicoDecoder(CONFIG))
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_pretrained(state_dict, CONFIG, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = from_pretrained(tmp_path)
    assert loaded.layers[1].swiglu.w_2.weight.dtype == torch.float32
    assert torch.equal(loaded.layers[1].swiglu.w_2.weight, state_dict["layers.1.swiglu.w_2.weight"].float())


def test_name_mapping_round_trips():
    for name in PicoDecoder(CONFIG).state_dict():
        assert llama_to_pico_name(pico_to_llama_name(name)) == name
    assert pico_to_llama_name("layers.1.swiglu.w_0.weight") == "model.layers.1.mlp.gate_proj.weight"


def test_save_rejects_incomplete_or_misshapen_state_dict(tmp_path):
    state_dict = PicoDecoder(CONFIG).state_dict()
    missing = {k: v for k, v in state_dict.items() if k != "layers.1.attention.k_proj.weight"}
    with pytest.raises(ModelError, match="missing parameter 'layers.1.attention.k_proj.weight'"):
        save_pretrained(missing, CONFIG, tmp_path)
    wrong = {**state_dict, "output_norm.weight": torch.ones(65)}
    with pytest.raises(ModelError, match=r"'output_norm.weight' has shape \(65,\), expected \(64,\)"):
        save_pretrained(wrong, CONFIG, tmp_path)


def test_tied_llama_checkpoint_is_rejected(tmp_path):
    hf_config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="tie_word_embeddings=true"):
        PicoDecoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling="),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}},
            "rope_parameters=",
        ),
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"hidden_size": None}, "no hidden_size"),
    ],
)
def test_unsupported_configs_are_rejected_with_the_key(tmp_path, change, message):
    PicoDecoder(CONFIG).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ModelError, match=rf"^{path}: {message}"):
        from_pretrained(tmp_path)


def test_missing_or_damaged_files_are_named(tmp_path):
    with pytest.raises(ModelError, match=rf"^{tmp_path}/config.json does not exist$"):
        from_pretrained(tmp_path)
    PicoDecoder(CONFIG).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(
        ModelError, match=rf"^{tmp_path}: no model.safetensors or model.safetensors.index.json"
    ):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelError, match=rf"^{tmp_path}/config.json: not valid JSON \(Expecting"):
        from_pretrained(tmp_path)


def test_sharded_hf_checkpoint_loads(tmp_path):
    hf_config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    hf = randomized(LlamaForCausalLM(hf_config)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_export_refuses_modules_the_llama_layout_cannot_express(tmp_path):
    model = PicoDecoder(CONFIG)
    model.layers[1].swiglu_norm = torch.nn.LayerNorm(CONFIG.d_model, bias=False)  # same parameter names
    assert "layers.1.swiglu_norm is a LayerNorm" in export_problem(model)
    with pytest.raises(ModelError, match=r"^HF export: module layers\.1\.swiglu_norm is a LayerNorm"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    model.layers[1].swiglu_norm = torch.nn.RMSNorm(CONFIG.d_model)
    model.extra = torch.nn.Linear(2, 2)  # a parameterised module with no Llama name
    assert export_problem(model) == "module extra (Linear) has parameters with no Llama counterpart"
    assert export_problem(PicoDecoder(CONFIG)) is None


class WithHead(PicoDecoder):
    """A fork's decoder with a training-only head: trained and checkpointed, left out of the export."""

    training_only = ("head",)

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Linear(config.d_model, 3)


def test_training_only_modules_are_left_out_of_the_export(tmp_path):
    model = randomized(WithHead(CONFIG))
    assert export_problem(model) is None
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
        hidden = model.hidden(ids)  # (B, T, C): what the output layer maps to logits
        torch.testing.assert_close(model.de_embedding_proj(hidden), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(
            hf(ids, output_hidden_states=True).hidden_states[-1], hidden, rtol=0, atol=1e-4
        )


def test_special_tokens_go_to_config_json(tmp_path):
    PicoDecoder(CONFIG).save_pretrained(tmp_path, bos_token_id=3, eos_token_id=4)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (3, 4)
    assert AutoConfig.from_pretrained(tmp_path).eos_token_id == 4


def tokenizer_file(path: Path, special: list[str]) -> Path:
    """A word-level tokenizer.json whose added special tokens get the ids after its 3 words."""
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(path))
    return path


def test_the_tokenizer_goes_with_the_export_and_its_first_special_token_ends_documents(tmp_path):
    tokenizer = tokenizer_file(tmp_path / "tokenizer.json", ["<eos>", "<pad>"])  # ids 3, 4
    assert first_special_token(Tokenizer.from_file(str(tokenizer))) == (3, "<eos>")
    PicoDecoder(CONFIG).save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (3, 3)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert loaded.eos_token == "<eos>" and loaded.eos_token_id == 3 and loaded.model_max_length == 32
    assert loaded("a b").input_ids == [0, 1]
    PicoDecoder(CONFIG).save_pretrained(tmp_path / "other", tokenizer=tokenizer, eos_token_id=4)
    assert json.loads((tmp_path / "other" / "config.json").read_text())["eos_token_id"] == 4
    plain = tokenizer_file(tmp_path / "plain.json", [])
    assert first_special_token(Tokenizer.from_file(str(plain))) is None
    PicoDecoder(CONFIG).save_pretrained(tmp_path / "plain", tokenizer=plain)
    assert "eos_token_id" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_from_pretrained_builds_the_calling_class(tmp_path):
    class Probe(PicoDecoder):
        """A subclass, as a fork might define."""

    PicoDecoder(CONFIG).save_pretrained(tmp_path)
    loaded = Probe.from_pretrained(tmp_path)
    assert type(loaded) is Probe
    reference = from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in loaded.state_dict().items())
