"""learning_dynamics files (docs/checkpoints.md) and the in-situ dynamics scalars."""

import pytest
import torch
from safetensors import safe_open

import pico
from pico.analysis import in_situ_scalars
from pico.capture import capture, capture_weights
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.metrics import condition_number, norm, per
from tests.capture.common import LAYERS, SEQ, batch, tiny_model, train_step


def captured(positions: str = "last") -> tuple[SplitDynamics, dict]:
    """What one captured update of the tiny model recorded, and the weights of its modules."""
    model, rows = tiny_model(), batch()
    with capture(model, LAYERS, positions=positions) as cap:
        train_step(model, rows, micro_batch_size=4)
        grads = cap.gradients()
    return SplitDynamics(cap.activations(), grads, rows), capture_weights(model, LAYERS)


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# out_features of each captured module of the tiny model, and in_features
SHAPES = {"attention.v_proj": (8, 16), "attention.o_proj": (16, 16), "swiglu.w_2": (16, 32)}


@pytest.mark.parametrize("dtype,positions", [("float32", "last"), ("bfloat16", "all")])
def test_files_match_contract(tmp_path, dtype, positions):
    split, weights = captured(positions)
    paths = write_learning_dynamics(
        tmp_path, {"train": split}, weights, step=7, positions=positions, dtype=dtype
    )
    assert [p.name for p in paths] == ["train.safetensors", "weights.safetensors"]
    modules = [f"layers.{i}.{s}" for i in range(2) for s in LAYERS]
    data, meta = read(paths[0])
    assert sorted(data) == sorted(
        [f"activations.{m}" for m in modules] + [f"gradients.{m}" for m in modules] + ["input_ids"]
    )
    rows = 8 if positions == "last" else 8 * SEQ
    for m in modules:
        out, inp = SHAPES[m.split(".", 2)[2]]
        assert data[f"activations.{m}"].shape == (rows, out)
        assert data[f"gradients.{m}"].shape == (out, inp)
        assert data[f"activations.{m}"].dtype == data[f"gradients.{m}"].dtype == getattr(torch, dtype)
        assert torch.equal(data[f"gradients.{m}"], split.gradients[m].to(getattr(torch, dtype)))
    assert torch.equal(data["input_ids"].long(), split.input_ids) and data["input_ids"].dtype == torch.int32
    assert meta == {
        "step": "7",
        "split": "train",
        "positions": positions,
        "dtype": dtype,
        "world_size": "1",
        "pico_version": pico.__version__,
    }
    stored, wmeta = read(paths[1])
    assert sorted(stored) == sorted(f"weights.{m}" for m in modules)
    assert stored[f"weights.{modules[0]}"].shape == SHAPES["attention.v_proj"]
    assert wmeta["split"] == "weights" and wmeta["step"] == "7"


def test_eval_split_without_weights(tmp_path):
    split, _ = captured()
    paths = write_learning_dynamics(tmp_path, {"eval": split}, None, step=0)
    assert [p.name for p in paths] == ["eval.safetensors"]
    assert read(paths[0])[1]["split"] == "eval"


def test_bad_input_is_named(tmp_path):
    split, weights = captured()
    with pytest.raises(ValueError, match=r"activations.layers.0.attention.v_proj has shape \(7, 8\)"):
        bad = {**split.activations, "layers.0.attention.v_proj": torch.zeros(7, 8)}
        write_learning_dynamics(
            tmp_path, {"train": SplitDynamics(bad, split.gradients, split.input_ids)}, None, step=1
        )
    with pytest.raises(ValueError, match="'test'"):
        write_learning_dynamics(tmp_path, {"test": split}, weights, step=1)
    with pytest.raises(ValueError, match="float16"):
        write_learning_dynamics(tmp_path, {"train": split}, weights, step=1, dtype="float16")
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        write_learning_dynamics(
            tmp_path,
            {"train": SplitDynamics(split.activations, split.gradients, split.input_ids.float())},
            None,
            step=1,
        )
    with pytest.raises(ValueError, match=r"weights.layers.0.attention.v_proj must be \(out_features"):
        write_learning_dynamics(tmp_path, {}, {"layers.0.attention.v_proj": torch.zeros(3)}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_in_situ_scalars_tags_and_values():
    split, weights = captured()
    scalars = in_situ_scalars({"eval": split}, weights, ["per", "condition_number", "norm"])
    m = "layers.1.attention.o_proj"
    assert scalars[f"dynamics/per/eval/activations/{m}"] == per(split.activations[m])
    assert scalars[f"dynamics/condition_number/train/weights/{m}"] == condition_number(weights[m])
    assert scalars[f"dynamics/norm/eval/gradients/{m}"] == norm(split.gradients[m])
    # condition_number is registered for gradients and weights only; input_ids are never measured
    assert f"dynamics/condition_number/eval/activations/{m}" not in scalars
    assert len(scalars) == 6 * (3 + 2 + 3)
    assert all(isinstance(v, float) for v in scalars.values())
    with pytest.raises(ValueError, match="'cka' compares two tensors"):
        in_situ_scalars({"train": split}, None, ["per", "cka"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        in_situ_scalars({"train": split}, None, ["nope"])
