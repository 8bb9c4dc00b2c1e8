"""A pico export in TransformerLens's TransformerBridge: logits and named activations equal transformers'."""

import pytest
import torch

from pico.model import PicoDecoder
from tests.interop.conftest import TL_HOOKS, hf_outputs

transformer_lens = pytest.importorskip(
    "transformer_lens.model_bridge",
    reason="TransformerLens (>= 4.3) is not installed: pip install -e .[interp]",
)


@pytest.fixture(scope="module")
def bridge(export):
    """The export booted as TransformerLens does for any Hugging Face model."""
    return transformer_lens.TransformerBridge.boot_transformers(str(export), device="cpu")


def test_logits_equal_transformers_and_pico(bridge, hf_model, export, ids):
    reference = hf_outputs(hf_model, ids, [])["logits"]
    with torch.no_grad():
        logits = bridge(ids, return_type="logits")  # (B, T, vocab_size)
        pico_logits = PicoDecoder.from_pretrained(export).eval()(ids)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits, pico_logits, rtol=0, atol=1e-4)


def test_run_with_cache_holds_every_exported_module(bridge, hf_model, ids):
    reference = hf_outputs(hf_model, ids, list(TL_HOOKS))
    logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-4)
    for name, hook in TL_HOOKS.items():
        expected = reference[name]  # (B, T, out_features)
        got = cache[hook]  # q/k/v: (B, T, heads, head_dim)
        assert got.shape[:2] == expected.shape[:2], hook
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=1e-5, msg=hook)


def test_grouped_query_heads_and_pattern(bridge, hf_model, ids):
    _, cache = bridge.run_with_cache(ids)
    assert bridge.cfg.n_heads == 4 and bridge.cfg.n_key_value_heads == 2 and bridge.cfg.d_head == 16
    assert cache["blocks.3.attn.hook_v"].shape == (2, 32, 2, 16)  # K value heads, not repeated
    pattern = cache["blocks.3.attn.hook_pattern"]  # (B, H, T, T)
    assert pattern.shape == (2, 4, 32, 32)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 32))
    assert pattern.triu(1).abs().max() == 0  # causal


def test_to_tokens_prepends_the_eos_token(bridge, export):
    from transformers import AutoTokenizer

    text = "The painter finds the wooden boat."
    plain = AutoTokenizer.from_pretrained(export)(text).input_ids
    assert bridge.to_tokens(text)[0].tolist() == [0, *plain]  # id 0: <|endoftext|>, the document separator
    assert bridge.to_tokens(text, prepend_bos=False)[0].tolist() == plain
