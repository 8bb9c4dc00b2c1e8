"""The PicoDecoder's architecture fields and the paper's presets: the one definition of the model's fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pico.errors import ConfigError


@dataclass
class PicoDecoderConfig:
    """Architecture of a PicoDecoder (field names as in pico-train); a bad field raises ConfigError."""

    d_model: int
    n_layers: int
    attention_n_heads: int
    attention_n_kv_heads: int
    activation_hidden_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0

    def __post_init__(self):
        for name in (
            "d_model",
            "n_layers",
            "attention_n_heads",
            "attention_n_kv_heads",
            "activation_hidden_dim",
            "vocab_size",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "position_emb_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"model.{name} must be a positive number, got {value!r}")
        if self.d_model % self.attention_n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by "
                f"model.attention_n_heads={self.attention_n_heads}"
            )
        if self.attention_n_heads % self.attention_n_kv_heads:
            raise ConfigError(
                f"model.attention_n_heads={self.attention_n_heads} is not divisible by "
                f"model.attention_n_kv_heads={self.attention_n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model / model.attention_n_heads = {self.head_dim} must be even for RoPE"
            )

    @property
    def head_dim(self) -> int:
        """Width D of one attention head."""
        return self.d_model // self.attention_n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> PicoDecoderConfig:
        """A named preset (tiny, small, medium, large) with some fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, fields: dict) -> PicoDecoderConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in fields:
            if key not in known:
                raise ConfigError(f"model.{key} is not a model field; known fields: {sorted(known)}")
        return cls(**fields)

    def to_dict(self) -> dict:
        """The fields as a plain dict (round-trips through from_dict)."""
        return dataclasses.asdict(self)


def _preset(d_model: int) -> dict:
    return dict(
        d_model=d_model,
        n_layers=12,
        attention_n_heads=12,
        attention_n_kv_heads=4,
        activation_hidden_dim=4 * d_model,
        vocab_size=50304,
        max_seq_len=2048,
        norm_eps=1e-6,
        position_emb_theta=10000.0,
    )


# pico-train's model sizes; parameter counts (untied embeddings) are in docs/model.md.
PRESETS = {"tiny": _preset(96), "small": _preset(384), "medium": _preset(768), "large": _preset(1536)}
