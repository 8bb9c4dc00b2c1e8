"""The pico decoder: a LLaMA-style transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Shapes: B batch, T sequence length, C d_model, H query heads, K key/value heads, D head dim,
F activation_hidden_dim, V vocab_size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model import hf, pico_train
from pico.model.config import PRESETS, PicoDecoderConfig

__all__ = ["PRESETS", "PicoDecoder", "PicoDecoderConfig"]

try:  # optional backend, used for fp16/bf16 CUDA tensors when installed (`pip install pico[flash]`)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# torch's CPU flash-attention kernel vectorises over the head dimension: narrower heads leave AVX-512's 16
# fp32 lanes part empty and run slower than padded ones (docs/benchmarks.md, "Head padding").
CPU_MIN_HEAD_DIM = 16


def rope_cos_sin(
    head_dim: int, max_seq_len: int, theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta^(-2i/D), each (max_seq_len, D/2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, T, heads, D) by the angles in cos/sin (T, D/2).

    This is the "rotate half" layout of Hugging Face Llama, so q/k weights map to it without permutation.
    """
    cos = cos[:, None, :].to(x.dtype)  # (T, 1, D/2)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, heads, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, heads, D)


def _use_flash_attn(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (B, T, H, D) over k, v (B, T, K, D), H a multiple of K: (B, T, H, D).

    flash-attn for fp16/bf16 CUDA tensors when installed, else torch's SDPA. On CPU, heads narrower than
    CPU_MIN_HEAD_DIM are zero-padded to it: zero q/k columns add nothing to the scores and the zero v
    columns are sliced off, so the result is the same up to rounding, 1.5x faster at the tiny preset's D=8.
    """
    if _use_flash_attn(q):
        return flash_attn_func(q, k, v, causal=True)  # GQA handled by the kernel
    D = q.shape[-1]
    pad = CPU_MIN_HEAD_DIM - D if q.device.type == "cpu" else 0
    if pad > 0:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # (B, T, heads, CPU_MIN_HEAD_DIM)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # (B, H, T, D), (B, K, T, D) x2
        is_causal=True,
        enable_gqa=True,
        scale=D**-0.5,
    ).transpose(1, 2)  # (B, T, H, D)
    return y[..., :D] if pad > 0 else y


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share K key/value heads (H/K each)."""

    def __init__(self, config: PicoDecoderConfig):
        super().__init__()
        self.n_heads = config.attention_n_heads
        self.n_kv_heads = config.attention_n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class SwiGLU(nn.Module):
    """Gated feed-forward layer w_2(silu(w_0 x) * w_1 x) (Shazeer 2020)."""

    def __init__(self, config: PicoDecoderConfig):
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)  # gate
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)  # up
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, config: PicoDecoderConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.swiglu_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.swiglu = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)  # (B, T, C)
        x = x + self.swiglu(self.swiglu_norm(x))  # (B, T, C)
        return x


class PicoDecoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V)."""

    # Names of child modules a fork trains alongside the decoder (e.g. an auxiliary head): checkpoints'
    # state/ holds them, the Llama export (model/) leaves them out (docs/model.md).
    training_only: tuple[str, ...] = ()

    def __init__(self, config: PicoDecoderConfig):
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.output_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # RoPE tables live here and are passed to every block; not saved, recomputed by init_rope().
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.position_emb_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D/2)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.de_embedding_proj(self.hidden(input_ids))  # (B, T, V)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, C), what the output layer maps to logits."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} has {T} positions, "
                f"more than model.max_seq_len={self.config.max_seq_len}"
            )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.embedding_proj(input_ids)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin)  # (B, T, C)
        return self.output_norm(x)  # (B, T, C)

    @torch.no_grad()
    def init_rope(self):
        """Recompute the RoPE cos/sin buffers in place on their current device (needed after to_empty)."""
        cos, sin = rope_cos_sin(
            self.config.head_dim,
            self.config.max_seq_len,
            self.config.position_emb_theta,
            device=self.rope_cos.device,
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Initialise every parameter and buffer: N(0, std) for embeddings and linear layers, with
        o_proj and w_2 (the writes into the residual stream) scaled down to std / sqrt(2 * n_layers)
        as in GPT-2 and OLMo; every other module with `reset_parameters` (the norms, also a LayerNorm
        that a recipe fork swaps in) is reset by it, so RMSNorm weights start at 1. Works after meta
        construction + to_empty()."""
        self.init_rope()
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_write = name.endswith(("attention.o_proj", "swiglu.w_2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_write else std)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters of the model, `training_only` modules left out (they are not part of the model
        the run makes); exclude_embedding drops the input embedding table (a lookup, no FLOPs) but keeps
        de_embedding_proj, which is a real matmul."""
        params = self.named_parameters()
        n = sum(p.numel() for name, p in params if name.split(".")[0] not in self.training_only)
        if exclude_embedding:
            n -= self.embedding_proj.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, 6N + 12 L H D T (PaLM appendix B; torchtitan), where
        N = num_params(exclude_embedding=True) (no `training_only` module) and the second term is attention
        scores and values."""
        c = self.config
        attention = 12 * c.n_layers * c.attention_n_heads * c.head_dim * seq_len
        return 6 * self.num_params(exclude_embedding=True) + attention

    def save_pretrained(
        self, directory: str | Path, *, tokenizer: str | Path | None = None, **special_tokens: int
    ):
        """Write config.json + model.safetensors loadable by transformers as LlamaForCausalLM.

        `tokenizer`: a tokenizer.json to copy alongside; `special_tokens`: e.g. bos_token_id=0,
        eos_token_id=0, recorded in config.json for `generate` (default: the tokenizer's first special
        token). See pico.model.hf.save_pretrained."""
        hf.save_pretrained(self, self.config, directory, tokenizer=tokenizer, **special_tokens)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PicoDecoder:
        """Load (fp32, CPU) a model saved by save_pretrained, a LlamaForCausalLM checkpoint saved
        by transformers, or a pico-train `pico_decoder` checkpoint (its remote code is never run)."""
        load = pico_train.load_pretrained if pico_train.is_pico_train_model(directory) else hf.load_pretrained
        config, state_dict = load(directory)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.init_rope()
        model.load_state_dict(state_dict)  # copies into the fp32 parameters, whatever the saved dtype
        return model
