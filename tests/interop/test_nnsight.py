"""A pico export in nnsight: a trace's logits and module outputs equal transformers'."""

import warnings

import pytest
import torch

from pico.model.hf import pico_to_llama_name
from tests.interop.conftest import TL_HOOKS, hf_outputs

nnsight = pytest.importorskip(
    "nnsight", minversion="0.8.1", reason="nnsight >= 0.8.1 is not installed (pip install -e .[interp])"
)
MODULES = list(TL_HOOKS)  # every kind of exported module


def load(kind: str, export):
    """The export as nnsight's `LanguageModel` (a deprecated alias since 0.8) or `TransformersModel`."""
    if kind == "LanguageModel":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
            return nnsight.LanguageModel(str(export), dispatch=True)
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(str(export), task="text-generation", dispatch=True)


@pytest.mark.parametrize("kind", ["LanguageModel", "TransformersModel"])
def test_trace_returns_logits_and_named_module_outputs(kind, export, hf_model, ids):
    model = load(kind, export)
    reference = hf_outputs(hf_model, ids, MODULES)
    llama = {name: pico_to_llama_name(f"{name}.weight").removesuffix(".weight") for name in MODULES}
    saved = {}
    with torch.no_grad(), model.trace(ids):
        for name, path in llama.items():  # in forward order: a trace reads modules as they run
            saved[name] = model.get(path).output.save()
        logits = model.output.logits.save()  # (B, T, vocab_size)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-4)
    for name in MODULES:
        torch.testing.assert_close(saved[name], reference[name], rtol=0, atol=1e-5, msg=name)


def test_text_is_tokenized_without_a_prefix_token(export):
    from transformers import AutoTokenizer

    model = load("TransformersModel", export)
    text = "The painter finds the wooden boat."
    with torch.no_grad(), model.trace(text):
        ids = model.inputs.save()
    assert ids[1]["input_ids"][0].tolist() == AutoTokenizer.from_pretrained(export)(text).input_ids
