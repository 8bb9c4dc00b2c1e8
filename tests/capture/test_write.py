"""Contract-3 learning_dynamics files and the in-situ dynamics scalars."""

import pytest
import torch
from safetensors import safe_open

import pico
from pico.capture import capture, capture_weights, dynamics_scalars, write_learning_dynamics
from pico.metrics import condition_number, norm, per
from tests.capture.common import LAYERS, SEQ, batch, tiny_model, train_step


def captured(positions: str = "last") -> dict:
    """Activations, gradients, weights and input_ids of one captured update of the tiny model."""
    model, rows = tiny_model(), batch()
    with capture(model, LAYERS, positions=positions) as cap:
        train_step(model, rows, micro_batch_size=4)
        grads = cap.gradients()
    return {"activations": cap.activations(), "gradients": grads,
            "weights": capture_weights(model, LAYERS), "input_ids": rows}


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# out_features of each captured module of the tiny model, and in_features
SHAPES = {"attention.v_proj": (8, 16), "attention.o_proj": (16, 16), "swiglu.w_2": (16, 32)}


@pytest.mark.parametrize("dtype,positions", [("float32", "last"), ("bfloat16", "all")])
def test_files_match_contract(tmp_path, dtype, positions):
    tensors = captured(positions)
    paths = write_learning_dynamics(tmp_path / "learning_dynamics", "train", tensors, step=7,
                                    positions=positions, dtype=dtype)
    assert [p.name for p in paths] == ["train.safetensors", "weights.safetensors"]
    modules = [f"layers.{i}.{s}" for i in range(2) for s in LAYERS]
    data, meta = read(paths[0])
    assert sorted(data) == sorted([f"activations.{m}" for m in modules] + [f"gradients.{m}" for m in modules]
                                  + ["input_ids"])
    rows = 8 if positions == "last" else 8 * SEQ
    for m in modules:
        out, inp = SHAPES[m.split(".", 2)[2]]
        assert data[f"activations.{m}"].shape == (rows, out)
        assert data[f"gradients.{m}"].shape == (out, inp)
        assert data[f"activations.{m}"].dtype == data[f"gradients.{m}"].dtype == getattr(torch, dtype)
        assert torch.equal(data[f"gradients.{m}"], tensors["gradients"][m].to(getattr(torch, dtype)))
    assert torch.equal(data["input_ids"].long(), tensors["input_ids"]) and data["input_ids"].dtype == torch.int32
    assert meta == {"step": "7", "split": "train", "positions": positions, "dtype": dtype, "world_size": "1",
                    "pico_version": pico.__version__}
    weights, wmeta = read(paths[1])
    assert sorted(weights) == sorted(f"weights.{m}" for m in modules)
    assert weights[f"weights.{modules[0]}"].shape == SHAPES["attention.v_proj"]
    assert wmeta["split"] == "weights" and wmeta["step"] == "7"


def test_eval_split_without_weights(tmp_path):
    tensors = {k: v for k, v in captured().items() if k != "weights"}
    paths = write_learning_dynamics(tmp_path, "eval", tensors, step=0)
    assert [p.name for p in paths] == ["eval.safetensors"]
    assert read(paths[0])[1]["split"] == "eval"


def test_bad_input_is_named(tmp_path):
    tensors = captured()
    with pytest.raises(ValueError, match=r"activations.layers.0.attention.v_proj has shape \(7, 8\)"):
        bad = {**tensors["activations"], "layers.0.attention.v_proj": torch.zeros(7, 8)}
        write_learning_dynamics(tmp_path, "train", {**tensors, "activations": bad}, step=1)
    with pytest.raises(ValueError, match="'test'"):
        write_learning_dynamics(tmp_path, "test", tensors, step=1)
    with pytest.raises(ValueError, match="float16"):
        write_learning_dynamics(tmp_path, "train", tensors, step=1, dtype="float16")
    with pytest.raises(ValueError, match="'input_ids'"):
        write_learning_dynamics(tmp_path, "train", {k: v for k, v in tensors.items() if k != "input_ids"}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_dynamics_scalars_tags_and_values():
    tensors = captured()
    scalars = dynamics_scalars(tensors, ["per", "condition_number", "norm"], split="eval")
    m = "layers.1.attention.o_proj"
    assert scalars[f"dynamics/per/eval/activations/{m}"] == per(tensors["activations"][m])
    assert scalars[f"dynamics/condition_number/eval/weights/{m}"] == condition_number(tensors["weights"][m])
    assert scalars[f"dynamics/norm/eval/gradients/{m}"] == norm(tensors["gradients"][m])
    # condition_number is registered for gradients and weights only; input_ids are never measured
    assert f"dynamics/condition_number/eval/activations/{m}" not in scalars
    assert len(scalars) == 6 * (3 + 2 + 3)
    assert all(isinstance(v, float) for v in scalars.values())
    with pytest.raises(ValueError, match="'cka' compares two tensors"):
        dynamics_scalars(tensors, ["per", "cka"], split="train")
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        dynamics_scalars(tensors, ["nope"], split="train")
