"""PicoDecoder: shapes, causality, attention and RoPE maths, presets, meta-device init, config validation."""

import math

import pytest
import torch

from pico.model import PRESETS, PicoDecoder, PicoDecoderConfig, decoder
from pico.model.decoder import CPU_MIN_HEAD_DIM, apply_rope, causal_attention, rope_cos_sin

SMALL = dict(
    d_model=64,
    n_layers=2,
    attention_n_heads=4,
    attention_n_kv_heads=2,
    activation_hidden_dim=128,
    vocab_size=256,
    max_seq_len=32,
)


def small_model(**overrides) -> PicoDecoder:
    return PicoDecoder(PicoDecoderConfig(**{**SMALL, **overrides}))


def test_forward_shape_and_dtype():
    model = small_model()
    logits = model(torch.randint(0, 256, (3, 17)))
    assert logits.shape == (3, 17, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_bf16_autocast_forward_and_backward():
    model = small_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 256, (2, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_input_names_the_shape():
    with pytest.raises(ValueError, match=r"\(1, 33\).*max_seq_len=32"):
        small_model()(torch.zeros(1, 33, dtype=torch.long))


def test_causality():
    model = small_model()
    ids = torch.randint(0, 256, (2, 20))
    base = model(ids)
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def reference_attention(q, k, v):
    """Causal GQA attention by hand in float64: q (B, T, H, D), k/v (B, T, K, D) -> (B, T, H, D)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    H, K, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # head h reads h // (H/K)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_gqa_equals_attention_with_repeated_kv_by_hand():
    model = small_model()
    attn = model.layers[0].attention
    H, K, D = 4, 2, 16
    B, T = 2, 10
    x = torch.randn(B, T, 64)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q = apply_rope(attn.q_proj(x).view(B, T, H, D), cos, sin)  # (B, T, H, D)
    k = apply_rope(attn.k_proj(x).view(B, T, K, D), cos, sin)  # (B, T, K, D)
    v = attn.v_proj(x).view(B, T, K, D)  # (B, T, K, D)
    y = reference_attention(q, k, v).float().reshape(B, T, H * D)
    torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [4, 8, 12, CPU_MIN_HEAD_DIM, 24])
def test_causal_attention_with_padded_narrow_heads_equals_the_definition(head_dim):
    # Heads narrower than CPU_MIN_HEAD_DIM take the zero-padded path: values and gradients must not change.
    torch.manual_seed(0)
    q = torch.randn(2, 33, 6, head_dim, requires_grad=True)
    k, v = (torch.randn(2, 33, 2, head_dim, requires_grad=True) for _ in range(2))
    out = causal_attention(q, k, v)
    assert out.shape == q.shape
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)  # w: fp64 maths, cast back to fp32


def test_rope_dot_product_depends_only_on_relative_position():
    D, T = 16, 24
    cos, sin = rope_cos_sin(D, T, theta=10000.0)
    q, k = torch.randn(D), torch.randn(D)
    q_rot = apply_rope(q.expand(1, T, 1, D), cos, sin)[0, :, 0]  # (T, D): q at every position
    k_rot = apply_rope(k.expand(1, T, 1, D), cos, sin)[0, :, 0]
    dots = q_rot @ k_rot.T  # (T, T): entry (m, n) = <R_m q, R_n k>
    for offset in (-5, 0, 3, 11):
        diagonal = torch.diagonal(dots, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[0, 0], q @ k)  # no rotation at distance 0
    assert not torch.isclose(dots[0, 3], dots[0, 4])  # but the dot product does change with distance


@pytest.mark.parametrize(
    "name,expected", [("tiny", 11.28e6), ("small", 64.6e6), ("medium", 181.1e6), ("large", 569.8e6)]
)
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = PicoDecoder(PicoDecoderConfig.preset(name))
    assert abs(model.num_params() - expected) / expected < 0.01
    assert PRESETS[name]["d_model"] * 4 == PRESETS[name]["activation_hidden_dim"]


def test_preset_overrides():
    config = PicoDecoderConfig.preset("tiny", vocab_size=1000, max_seq_len=64)
    assert (config.d_model, config.vocab_size, config.max_seq_len) == (96, 1000, 64)
    assert PicoDecoderConfig.from_dict(config.to_dict()) == config


def test_num_params_and_flops_per_token():
    model = small_model()
    n = 256 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert model.num_params() == n
    assert model.num_params(exclude_embedding=True) == n - 256 * 64
    assert model.flops_per_token(32) == 6 * (n - 256 * 64) + 12 * 2 * 4 * 16 * 32


class WithHead(PicoDecoder):
    """A fork's decoder with a training-only head (as MAML's): trained alongside, not part of the model."""

    training_only = ("head",)

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(8, 256))


def test_training_only_modules_count_in_neither_params_nor_flops():
    plain, forked = small_model(), WithHead(PicoDecoderConfig(**SMALL))
    assert sum(p.numel() for p in forked.parameters()) == plain.num_params() + 64 * 8 + 8 * 256 + 256
    assert forked.num_params() == plain.num_params()
    assert forked.num_params(exclude_embedding=True) == plain.num_params(exclude_embedding=True)
    assert forked.flops_per_token(32) == plain.flops_per_token(32)


def test_meta_construction_then_init_weights_is_finite_and_deterministic():
    def build_on_meta(seed):
        with torch.device("meta"):
            model = small_model()
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_weights()
        return model

    a, b, c = build_on_meta(1), build_on_meta(1), build_on_meta(2)
    reference = small_model()
    torch.manual_seed(1)
    reference.init_weights()
    for (name, pa), pb, pc, pr in zip(
        a.state_dict().items(),
        b.state_dict().values(),
        c.state_dict().values(),
        reference.state_dict().values(),
    ):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb) and torch.equal(pa, pr), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    torch.testing.assert_close(a.rope_cos, reference.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(a.rope_sin, reference.rope_sin, rtol=0, atol=0)
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(a(ids), reference(ids), rtol=0, atol=0)


def test_init_weights_scheme():
    model = PicoDecoder(
        PicoDecoderConfig(**{**SMALL, "d_model": 256, "activation_hidden_dim": 512, "n_layers": 8})
    )
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight))
        for m in model.modules()
        if isinstance(m, torch.nn.RMSNorm)
    )
    assert model.embedding_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert model.layers[3].attention.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.layers[3].swiglu.w_2.weight.std().item() == pytest.approx(residual_std, rel=0.05)


def test_module_names_follow_the_contract():
    names = set(dict(small_model().named_parameters()))
    expected = {"embedding_proj.weight", "output_norm.weight", "de_embedding_proj.weight"}
    for i in range(2):
        expected |= {
            f"layers.{i}.{m}.weight"
            for m in (
                "attention_norm",
                "attention.q_proj",
                "attention.k_proj",
                "attention.v_proj",
                "attention.o_proj",
                "swiglu_norm",
                "swiglu.w_0",
                "swiglu.w_1",
                "swiglu.w_2",
            )
        }
    assert names == expected


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(d_model=100), "attention_n_heads"),
        (dict(attention_n_kv_heads=3), "attention_n_kv_heads"),
        (dict(d_model=12), "attention_n_heads = 3 must be even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(norm_eps=-1e-6), "norm_eps"),
        (dict(position_emb_theta=0), "position_emb_theta"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        PicoDecoderConfig(**{**SMALL, **overrides})


def test_unknown_preset_and_unknown_field_are_named():
    with pytest.raises(ValueError, match="'huge'"):
        PicoDecoderConfig.preset("huge")
    with pytest.raises(ValueError, match="model.n_heads"):
        PicoDecoderConfig.preset("tiny", n_heads=4)


@pytest.mark.skipif(decoder.flash_attn_func is None, reason="flash_attn is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs a CUDA device")
def test_flash_attn_matches_sdpa(monkeypatch):
    model = small_model().cuda()
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flash = model(ids)
        monkeypatch.setattr(decoder, "flash_attn_func", None)
        sdpa = model(ids)
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)
