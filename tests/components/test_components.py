"""OV circuits against explicit per-head loops and autograd; the component registry."""

import pytest
import torch

from pico.components import (
    COMPONENTS,
    get_component,
    ov_activations,
    ov_circuit,
    ov_circuit_grad,
    register_component,
)

HEADS = [(4, 2), (4, 4), (6, 1)]  # (n_heads, n_kv_heads): GQA, MHA, MQA
D_MODEL, D_HEAD = 12, 3


def weights(n_heads, n_kv_heads, dtype=torch.float64):
    w_v = torch.randn(n_kv_heads * D_HEAD, D_MODEL, dtype=dtype)  # nn.Linear (out, in)
    w_o = torch.randn(D_MODEL, n_heads * D_HEAD, dtype=dtype)
    return w_v, w_o


@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS)
def test_ov_circuit_matches_per_head_loop(n_heads, n_kv_heads):
    w_v, w_o = weights(n_heads, n_kv_heads)
    ov = ov_circuit(w_v, w_o, n_heads, n_kv_heads)
    assert ov.shape == (n_heads, D_MODEL, D_MODEL)
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        expected = (
            w_o[:, h * D_HEAD : (h + 1) * D_HEAD] @ w_v[g * D_HEAD : (g + 1) * D_HEAD, :]
        )  # W_O^h W_V^g: (D, D)
        torch.testing.assert_close(ov[h], expected)


def test_ov_circuit_is_what_a_head_writes():
    """Through the attention value path, head h maps a residual vector x to OV_h x."""
    n_heads, n_kv_heads = 4, 2
    w_v, w_o = weights(n_heads, n_kv_heads)
    x = torch.randn(5, D_MODEL, dtype=torch.float64)
    v = x @ w_v.T  # (5, n_kv * d_head): what v_proj outputs
    per_head = ov_activations(v, w_o, n_heads, n_kv_heads)  # (H, 5, D)
    ov = ov_circuit(w_v, w_o, n_heads, n_kv_heads)
    torch.testing.assert_close(per_head, torch.einsum("hde,ne->hnd", ov, x))
    torch.testing.assert_close(
        per_head.sum(0), v.reshape(5, 2, D_HEAD).repeat_interleave(2, 1).flatten(1) @ w_o.T
    )


@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS)
def test_ov_gradient_is_the_product_rule(n_heads, n_kv_heads):
    w_v, w_o = weights(n_heads, n_kv_heads)
    g_v, g_o = weights(n_heads, n_kv_heads)
    _, tangent = torch.autograd.functional.jvp(
        lambda a, b: ov_circuit(a, b, n_heads, n_kv_heads), (w_v, w_o), (g_v, g_o)
    )
    torch.testing.assert_close(ov_circuit_grad(w_v, w_o, g_v, g_o, n_heads, n_kv_heads), tangent)


def test_ov_shape_errors():
    w_v, w_o = weights(4, 2)
    with pytest.raises(ValueError, match=r"w_v \(6, 12\) does not match w_o \(12, 12\)"):
        ov_circuit(w_v, w_o, 4, 4)
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        ov_circuit(w_v, w_o, 4, 3)
    with pytest.raises(ValueError, match="not a multiple of n_heads=5"):
        ov_circuit(w_v, w_o, 5, 1)
    with pytest.raises(ValueError, match=r"v \(3, 7\)"):
        ov_activations(torch.randn(3, 7), w_o, 4, 2)


class Source:
    """What analysis hands a component: tensors of one checkpoint and split, and the HF model config."""

    def __init__(self, tensors, config):
        self.tensors, self.model_config = tensors, config

    def load(self, data_type, module):
        return self.tensors[f"{data_type}.{module}"]


def test_ov_component_reads_the_layer_it_is_given():
    w_v, w_o = weights(4, 2)
    g_v, g_o = weights(4, 2)
    v = torch.randn(9, w_v.shape[0], dtype=torch.float64)
    prefix = "layers.1.attention"
    source = Source(
        {
            f"weights.{prefix}.v_proj": w_v,
            f"weights.{prefix}.o_proj": w_o,
            f"gradients.{prefix}.v_proj": g_v,
            f"gradients.{prefix}.o_proj": g_o,
            f"activations.{prefix}.v_proj": v,
        },
        {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": D_MODEL},
    )
    ov = get_component("ov_circuit")
    assert ov.per_head and ov.modules == ("attention.v_proj", "attention.o_proj")
    torch.testing.assert_close(ov.fn(source, 1, "weights"), ov_circuit(w_v, w_o, 4, 2))
    torch.testing.assert_close(ov.fn(source, 1, "gradients"), ov_circuit_grad(w_v, w_o, g_v, g_o, 4, 2))
    assert ov.fn(source, 1, "activations").shape == (4, 9, D_MODEL)
    with pytest.raises(KeyError):
        ov.fn(source, 0, "weights")


def test_component_registry_round_trip():
    @register_component("test_qk", modules=("attention.q_proj", "attention.k_proj"), data_types=("weights",))
    def qk(source, layer, data_type):
        return source.load("weights", f"layers.{layer}.attention.q_proj").T @ source.load(
            "weights", f"layers.{layer}.attention.k_proj"
        )

    try:
        component = get_component("test_qk")
        assert component.fn is qk and component.data_types == ("weights",) and not component.per_head
        source = Source(
            {
                "weights.layers.0.attention.q_proj": torch.eye(3),
                "weights.layers.0.attention.k_proj": 2 * torch.eye(3),
            },
            {},
        )
        torch.testing.assert_close(component.fn(source, 0, "weights"), 2 * torch.eye(3))
        with pytest.raises(ValueError, match="already registered"):
            register_component("test_qk", modules=())(qk)
    finally:
        COMPONENTS.pop("test_qk")
    with pytest.raises(ValueError, match="unknown component 'nope'; registered: .*ov_circuit"):
        get_component("nope")
