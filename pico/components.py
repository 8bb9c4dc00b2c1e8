"""Components: what a metric is applied to. A simple component is one module's activations, weights or
gradients; a compound component combines modules, like the OV circuit of each attention head.

A component is evaluated at one layer of one checkpoint through a `source`, any object with
`source.load(data_type, module) -> Tensor` (for one split) and `source.model_config -> dict` (the HF
config.json). Register your own with `@register_component(name, modules=(...), per_head=...)`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pico.errors import AnalysisError, ConfigError
from pico.run_dir import DATA_TYPES


@dataclass(frozen=True)
class Component:
    """A registered compound component: `fn(source, layer, data_type) -> Tensor`
    ((n_heads, ...) if per_head)."""

    name: str
    fn: Callable[..., torch.Tensor]
    modules: tuple[str, ...]  # module-name suffixes within a layer it reads, e.g. "attention.v_proj"
    per_head: bool
    data_types: tuple[str, ...]


COMPONENTS: dict[str, Component] = {}


def register_component(name: str, *, modules, per_head: bool = False, data_types=DATA_TYPES):
    """Decorator registering `fn(source, layer: int, data_type: str) -> Tensor` under `name`."""

    def decorator(fn):
        if name in COMPONENTS:
            raise ValueError(
                f"component {name!r} is already registered (by {COMPONENTS[name].fn.__module__})"
            )
        COMPONENTS[name] = Component(name, fn, tuple(modules), per_head, tuple(data_types))
        return fn

    return decorator


def get_component(name: str) -> Component:
    """The registered compound component called `name`; a ConfigError listing the known names otherwise."""
    if name not in COMPONENTS:
        raise ConfigError(f"unknown component {name!r}; registered: {', '.join(sorted(COMPONENTS))}")
    return COMPONENTS[name]


def _head_shapes(w_v: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(d_model, d_head) from nn.Linear weights w_v (n_kv*d_head, d_model), w_o (d_model, n_heads*d_head)."""
    if n_heads % n_kv_heads:
        raise AnalysisError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    d_model, inner = w_o.shape
    if inner % n_heads:
        raise AnalysisError(
            f"w_o {tuple(w_o.shape)} has {inner} input features, not a multiple of n_heads={n_heads}"
        )
    d_head = inner // n_heads
    if tuple(w_v.shape) != (n_kv_heads * d_head, d_model):
        raise AnalysisError(
            f"w_v {tuple(w_v.shape)} does not match w_o {tuple(w_o.shape)}: expected "
            f"({n_kv_heads * d_head}, {d_model}) for n_heads={n_heads}, n_kv_heads={n_kv_heads}"
        )
    return d_model, d_head


def _w_o_heads(w_o: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    return w_o.reshape(w_o.shape[0], n_heads, d_head).permute(1, 0, 2)  # (H, D, d_head): W_O[:, h]


def ov_circuit(w_v: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Per-head OV matrices W_O[:, h] @ W_V[g(h)] (Elhage et al. 2021), g(h) = h // (n_heads / n_kv_heads)."""
    d_model, d_head = _head_shapes(w_v, w_o, n_heads, n_kv_heads)
    w_v = w_v.reshape(n_kv_heads, d_head, d_model).repeat_interleave(
        n_heads // n_kv_heads, dim=0
    )  # (H, d_head, D)
    return _w_o_heads(w_o, n_heads, d_head) @ w_v  # (H, D, D)


def ov_circuit_grad(w_v, w_o, grad_v, grad_o, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Product rule: per head W_O[:, h] grad_V[g(h)] + grad_O[:, h] W_V[g(h)], (n_heads, d_model, d_model)."""
    return ov_circuit(grad_v, w_o, n_heads, n_kv_heads) + ov_circuit(w_v, grad_o, n_heads, n_kv_heads)


def ov_activations(v: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Value vectors v (N, n_kv*d_head) written through each head's W_O slice: (n_heads, N, d_model)."""
    n, d_head = v.shape[0], w_o.shape[1] // n_heads
    if n_heads % n_kv_heads or w_o.shape[1] % n_heads or v.shape[1] != n_kv_heads * d_head:
        raise AnalysisError(
            f"v {tuple(v.shape)} and w_o {tuple(w_o.shape)} do not fit n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}"
        )
    v = v.reshape(n, n_kv_heads, d_head).repeat_interleave(n_heads // n_kv_heads, dim=1)  # (N, H, d_head)
    return torch.einsum("nhk,hdk->hnd", v, _w_o_heads(w_o, n_heads, d_head))  # (H, N, D)


def _heads(config: dict) -> tuple[int, int]:
    try:
        n_heads = int(config["num_attention_heads"])
    except KeyError:
        raise AnalysisError("model config.json has no 'num_attention_heads'") from None
    return n_heads, int(config.get("num_key_value_heads", n_heads))


@register_component("ov_circuit", modules=("attention.v_proj", "attention.o_proj"), per_head=True)
def ov_component(source, layer: int, data_type: str) -> torch.Tensor:
    """Layer `layer`'s per-head OV circuit: weights (H, D, D), gradients (H, D, D), activations (H, N, D)."""
    n_heads, n_kv_heads = _heads(source.model_config)
    v_name, o_name = f"layers.{layer}.attention.v_proj", f"layers.{layer}.attention.o_proj"
    w_o = source.load("weights", o_name)
    if data_type == "activations":
        return ov_activations(source.load("activations", v_name), w_o, n_heads, n_kv_heads)
    w_v = source.load("weights", v_name)
    if data_type == "weights":
        return ov_circuit(w_v, w_o, n_heads, n_kv_heads)
    return ov_circuit_grad(
        w_v, w_o, source.load("gradients", v_name), source.load("gradients", o_name), n_heads, n_kv_heads
    )
