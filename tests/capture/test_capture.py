"""Single-process capture: activations, gradients, weights, hooks, wrappers, no effect on training."""

import copy

import pytest
import torch
import torch._dynamo

from pico.capture import capture, capture_weights
from pico.distributed import parallelize
from pico.errors import ConfigError
from tests.capture.common import LAYERS, SEQ, batch, global_mean_loss, tiny_model, train_step


def manual_outputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The captured modules' outputs (B, T, out) computed block by block without hooks."""
    cos, sin = model.rope_cos[: ids.shape[1]], model.rope_sin[: ids.shape[1]]
    x = model.embedding_proj(ids)  # (B, T, C)
    out = {}
    for i, block in enumerate(model.layers):
        h = block.attention_norm(x)
        out[f"layers.{i}.attention.v_proj"] = block.attention.v_proj(h)
        out[f"layers.{i}.attention.o_proj"] = attn = block.attention(h, cos, sin)
        x = x + attn
        out[f"layers.{i}.swiglu.w_2"] = mlp = block.swiglu(block.swiglu_norm(x))
        x = x + mlp
    return out


@pytest.mark.parametrize("positions", ["last", "all"])
def test_activations_equal_manual_forward(positions):
    model, rows = tiny_model(), batch()
    with capture(model, LAYERS, positions=positions) as cap:
        train_step(model, rows, micro_batch_size=3)  # micro-batches of 3, 3, 2 rows
    acts = cap.activations()
    with torch.no_grad():
        expected = manual_outputs(model, rows[:, :-1])
    assert list(acts) == list(expected)
    for name, full in expected.items():
        want = full[:, -1, :] if positions == "last" else full.reshape(-1, full.shape[-1])
        assert acts[name].shape == ((8 if positions == "last" else 8 * SEQ), full.shape[-1])
        torch.testing.assert_close(acts[name], want, rtol=0, atol=1e-6)


def test_gradients_and_weights_equal_autograd():
    model, rows = tiny_model(), batch()
    reference = copy.deepcopy(model)
    with capture(model, LAYERS) as cap:
        train_step(model, rows, micro_batch_size=4)  # 2 accumulated micro-batches
        grads = cap.gradients()
    names = list(grads)
    params = [reference.get_submodule(n).weight for n in names]
    expected = torch.autograd.grad(global_mean_loss(reference, rows), params)
    for name, want in zip(names, expected):
        assert grads[name].dtype == torch.float32 and grads[name].device.type == "cpu"
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7)
    weights = capture_weights(model, LAYERS)
    assert list(weights) == names
    for name, param in zip(names, params):
        assert torch.equal(weights[name], param.detach())
        assert weights[name].data_ptr() != model.get_submodule(name).weight.data_ptr()  # a copy, not a view


def test_no_extra_forward_pass():
    def count_calls(model):
        calls = []
        handles = [m.register_forward_pre_hook(lambda m, a: calls.append(m)) for m in model.modules()]
        return calls, handles

    model, rows = tiny_model(), batch()
    calls, handles = count_calls(model)
    train_step(model, rows, micro_batch_size=4)
    without = len(calls)
    calls.clear()
    with capture(model, LAYERS) as cap:
        train_step(model, rows, micro_batch_size=4)
        cap.gradients()
    cap.activations()
    for h in handles:
        h.remove()
    assert without > 0 and len(calls) == without


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_error():
    model, rows = tiny_model(), batch()
    with capture(model, LAYERS) as cap:
        assert hooks(model) == len(cap.modules) == 6
        model(rows[:, :-1])
    assert hooks(model) == 0
    with pytest.raises(ZeroDivisionError):
        with capture(model, LAYERS):
            assert hooks(model) == 6
            _ = 1 / 0
    assert hooks(model) == 0


def test_capture_leaves_training_bitwise_identical():
    model_a = tiny_model()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    for step in range(3):
        rows = batch(seed=10 + step)
        train_step(model_a, rows, micro_batch_size=4)
        with capture(model_b, LAYERS, positions="all") as cap:
            train_step(model_b, rows, micro_batch_size=4)
            cap.gradients()
        cap.activations()
        capture_weights(model_b, LAYERS)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_suffix_matching_and_errors():
    model = tiny_model()
    with capture(model, ["layers.1.swiglu.w_2", "v_proj"]) as cap:
        assert list(cap.modules) == [
            "layers.0.attention.v_proj",
            "layers.1.attention.v_proj",
            "layers.1.swiglu.w_2",
        ]
    with pytest.raises(ConfigError, match="'proj'"):  # suffixes match whole dot-separated parts only
        with capture(model, ["proj"]):
            pass
    with pytest.raises(ConfigError, match="'attention.nope'"):
        with capture(model, ["attention.v_proj", "attention.nope"]):
            pass
    with pytest.raises(ConfigError, match="positions='first'"):
        with capture(model, LAYERS, positions="first"):
            pass
    assert hooks(model) == 0
    with capture(model, LAYERS) as cap:
        pass
    with pytest.raises(RuntimeError, match="no forward pass of layers.0.attention.v_proj"):
        cap.activations()
    with pytest.raises(RuntimeError, match="layers.0.attention.v_proj.weight has no gradient"):
        cap.gradients()


def test_activation_checkpointing_records_each_forward_once():
    model, rows = tiny_model(), batch()
    reference = copy.deepcopy(model)
    model = parallelize(
        model, strategy="ddp", world_size=1, device=torch.device("cpu"), activation_checkpointing=True
    )
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    with capture(model, LAYERS) as cap:
        train_step(model, rows, micro_batch_size=4)  # backward re-runs each block's forward
        grads = cap.gradients()
    with capture(reference, LAYERS) as ref:
        train_step(reference, rows, micro_batch_size=4)
    assert list(cap.modules) == list(ref.modules)
    for name, want in ref.activations().items():
        assert torch.equal(cap.activations()[name], want)
        torch.testing.assert_close(grads[name], ref.gradients()[name], rtol=1e-6, atol=1e-8)


def test_compiled_blocks_need_hook_guards():
    rows = batch()
    eager = tiny_model()
    with capture(eager, LAYERS) as ref:
        eager(rows[:, :-1])
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            model = torch.compile(tiny_model(), backend="eager")  # names gain `_orig_mod.`
            model(rows[:, :-1])  # compiled before the hooks exist
            with capture(model, LAYERS) as cap:
                model(rows[:, :-1])
            assert list(cap.modules) == list(ref.modules)
            for name, want in ref.activations().items():
                torch.testing.assert_close(cap.activations()[name], want, rtol=0, atol=1e-6)
        torch._dynamo.reset()
        model = tiny_model()  # torch's default guards: hooks added after compiling are never called
        for block in model.layers:
            block.compile(backend="eager")
        model(rows[:, :-1])
        with capture(model, LAYERS) as cap:
            model(rows[:, :-1])
        with pytest.raises(RuntimeError, match="prepare_compile"):
            cap.activations()
    finally:
        torch._dynamo.reset()
