"""Generate a small run directory in pico.run_dir's layout, with real safetensors files and no training."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pico.run_dir import EVAL, LATEST, MODEL, checkpoints_dir, dynamics_file, step_dir, step_name

MODULES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")


def _shapes(d_model: int, n_heads: int, n_kv_heads: int, hidden: int) -> dict[str, tuple[int, int]]:
    d_head = d_model // n_heads
    return {
        "attention.v_proj": (n_kv_heads * d_head, d_model),
        "attention.o_proj": (d_model, n_heads * d_head),
        "swiglu.w_2": (d_model, hidden),
    }


def eval_json(step: int) -> dict:
    """eval.json of `step` as pico.checkpoint writes it: paloma, blimp (subsets, fields), a failed task."""
    loss = 5.0 - step / 100
    return {
        "step": step,
        "paloma": {"loss": loss, "perplexity": math.exp(loss), "tokens": 1024, "n": 8},
        "blimp": {
            "acc": 0.5 + step / 100,
            "n": 20,
            "subsets": {"anaphor_gender_agreement": {"acc": 0.4 + step / 100, "n": 10}},
            "fields": {"morphology": {"acc": 0.6 + step / 100, "n": 20}},
        },
        "hellaswag": {"error": "the Hub is unreachable"},
    }


def make_run(
    run_dir,
    steps=(0, 10, 20),
    *,
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden: int = 32,
    n_samples: int = 32,
    seq_len: int = 8,
    seed: int = 0,
    nan: tuple[int, str] | None = None,
    dtype: torch.dtype = torch.float32,
    evals: bool = False,
) -> Path:
    """Write `run_dir/checkpoints/step_<N>/{model/config.json, learning_dynamics/*.safetensors}`
    for each step.

    Tensors drift smoothly with the step. `nan=(step, key)` puts a NaN into that tensor. A `step_5/` with a
    model but no learning_dynamics/ is written too, which analysis must skip. `evals` writes an eval.json per
    step (`eval_json(step)`; the first step's in the old `{"perplexity": ...}` shape).
    """
    run_dir = Path(run_dir)
    g = torch.Generator().manual_seed(seed)
    data = torch.Generator().manual_seed(1234)  # token ids: the same in every run, as with a shared data seed
    shapes = _shapes(d_model, n_heads, n_kv_heads, hidden)
    names = {f"layers.{i}.{m}": shapes[m] for i in range(n_layers) for m in MODULES}
    start = {name: torch.randn(shape, generator=g) for name, shape in names.items()}
    drift = {name: torch.randn(shape, generator=g) for name, shape in names.items()}
    inputs = torch.randn(n_samples, d_model, generator=g)  # the fixed eval batch, embedded
    eval_ids = torch.randint(0, 100, (n_samples, seq_len + 1), generator=data)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "intermediate_size": hidden,
    }
    for step in steps:
        ckpt = step_dir(run_dir, step)
        (ckpt / MODEL).mkdir(parents=True, exist_ok=True)
        (ckpt / MODEL / "config.json").write_text(json.dumps(config))
        weights = {name: start[name] + step / 10 * drift[name] for name in names}
        files = {"weights": {f"weights.{n}": w for n, w in weights.items()}}
        for split in ("train", "eval"):
            x = inputs if split == "eval" else torch.randn(n_samples, d_model, generator=g)
            ids = (
                eval_ids
                if split == "eval"
                else torch.randint(0, 100, (n_samples, seq_len + 1), generator=data)
            )
            tensors = {"input_ids": ids}
            for name, w in weights.items():
                features = x if w.shape[1] == d_model else torch.randn(n_samples, w.shape[1], generator=g)
                tensors[f"activations.{name}"] = torch.tanh(features @ w.T)  # (N, out_features)
                tensors[f"gradients.{name}"] = torch.randn(w.shape, generator=g) / (1 + step)
            files[split] = tensors
        for split, tensors in files.items():
            for key, t in tensors.items():
                if nan == (step, key):
                    t.view(-1)[0] = float("nan")
            path = dynamics_file(ckpt, split)
            path.parent.mkdir(exist_ok=True)
            save_file(
                {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()},
                path,
                metadata={"step": str(step), "split": split},
            )
        if evals:
            results = eval_json(step)
            if step == steps[0]:  # eval.json before the task registry: perplexity only, under "perplexity"
                results = {"step": step, "perplexity": results["paloma"]}
            (ckpt / EVAL).write_text(json.dumps(results))
    (step_dir(run_dir, 5) / MODEL).mkdir(parents=True, exist_ok=True)
    (checkpoints_dir(run_dir) / LATEST).write_text(step_name(max(steps)))
    return run_dir
