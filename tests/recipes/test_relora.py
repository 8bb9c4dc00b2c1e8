"""recipes/relora.py: the LoRA linear, the reset, the jagged schedule, and the recipe end to end (DDP, FSDP2,
kill -9 and resume across a reset, the HF export in stock transformers)."""

import importlib
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pico.capture import capture_weights
from pico.config import ConfigError, load_config
from pico.model import save_pretrained
from pico.training import captured_step, train_step
from tests.recipes.common import ROOT, launch
from tests.recipes.test_pretrain import losses, overrides, weights
from tests.tiny import LAYERS, MODEL, SEQ, VOCAB, shards

sys.path.insert(0, str(ROOT / "recipes"))  # as `python recipes/relora.py` runs: its sibling modules import
relora = importlib.import_module("relora")
pretrain = importlib.import_module("pretrain")
lora = importlib.import_module("relora_modules")

CPU = torch.device("cpu")
STEPS = 8  # resets at 2, 4, 6 and 8 (after 2 warmup steps), checkpoints at 0, 4 and 8
RELORA = [
    "training.schedule=cosine",
    "relora.r=4",
    "relora.reset_every=2",
    "relora.restart_warmup_steps=1",
]


def config(*extra):
    return load_config(None, [*MODEL, f"data.seq_len={SEQ}", *RELORA, *extra], cls=lora.ReLoRARunConfig)


def tiny(*extra, seed=3):
    """A ReLoRA model of the test size, and its config."""
    cfg = config(*extra)
    return relora.build_model(cfg.model_config(), seed, CPU, cfg.relora), cfg


def rows(n=4, seed=0):
    return torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def train(model, cfg, steps=3):
    """A few AdamW updates, so that A, B (and the scale) move and the optimizer has state."""
    optimizer = relora.build_optimizer(model, cfg.training)
    for i in range(steps):
        optimizer.zero_grad()
        train_step(model, [rows(seed=i)])
        optimizer.step()
    return optimizer


def test_the_attention_and_swiglu_linears_are_wrapped_under_their_names():
    model, _ = tiny()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    expected = [f"attention.{p}_proj" for p in "qkvo"] + [f"swiglu.w_{i}" for i in range(3)]
    assert wrapped == {f"layers.{i}.{name}" for i in range(2) for name in expected}
    assert isinstance(model.de_embedding_proj, torch.nn.Linear) and not lora.lora_modules(model.output_norm)
    v = model.layers[0].attention.v_proj
    assert (v.lora_A.shape, v.lora_B.shape, v.weight.dtype) == ((4, 32), (16, 4), torch.float32)
    assert v.scaling() == 32 / 4 and not v.lora_B.any() and v.lora_A.std() > 0


@pytest.mark.parametrize("trainable_scale", [False, True])
def test_function_is_unchanged_at_init_and_across_a_reset(trainable_scale):
    model, cfg = tiny(f"relora.trainable_scale={trainable_scale}")
    base = pretrain.build_model(cfg.model_config(), 3, CPU).eval()  # pretrain.py's model from the same seed
    ids = rows()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), base(ids), rtol=0, atol=1e-6)
    optimizer = train(model.train(), cfg)
    v = model.layers[1].attention.v_proj
    assert v.lora_B.any() and (not trainable_scale or v.lora_scale.item() != 1.0)
    w_eff, w, a = v.effective_weight(), v.weight.clone(), v.lora_A.clone()
    scale_state = {k: t.clone() for k, t in optimizer.state[v.lora_scale].items()} if trainable_scale else {}
    with torch.no_grad():
        before = model.eval()(ids)
        lora.relora_reset(model, optimizer, cfg.relora, seed=3, step=4)
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-6)
    assert not v.lora_B.any() and not torch.equal(v.lora_A, a)  # B zero, a new Kaiming A
    if trainable_scale:  # the scale back at 1 (s = tanh 1), its Adam state kept, as relora-pico does
        assert v.lora_scale.item() == 1.0 and scale_state["exp_avg"].any()
        assert all(torch.equal(optimizer.state[v.lora_scale][k], t) for k, t in scale_state.items())
    torch.testing.assert_close(v.weight, w_eff, rtol=0, atol=1e-6)  # W ← W + s·B·A, s included
    assert not torch.allclose(v.weight, w, rtol=0, atol=1e-4)


def test_only_lora_factors_and_unwrapped_modules_get_gradients():
    model, _ = tiny()
    train_step(model, [rows()])
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not {n for n in got if n.endswith(".weight") and ("attention." in n or "swiglu." in n)}
    assert {"embedding_proj.weight", "output_norm.weight", "layers.0.attention_norm.weight"} <= got
    assert "layers.0.swiglu.w_2.lora_A" in got and "de_embedding_proj.weight" in got
    assert all(m.weight.grad is None and m.lora_B.grad.any() for m in lora.lora_modules(model))


def test_captured_weights_and_gradients_are_the_effective_ones():
    """capture records W + s·B·A and dL/d(W + s·B·A): a plain model holding W_eff gives the same
    weights and gradients (dropout 0, so that the two compute the same function)."""
    model, cfg = tiny("relora.dropout=0")
    for m in lora.lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    plain = pretrain.build_model(cfg.model_config(), 3, CPU)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            name = next(n for n, x in model.named_modules() if x is m)
            plain.get_submodule(name).weight.copy_(m.effective_weight())
    batch = [rows(seed=1), rows(seed=2)]
    _, dynamics = captured_step(model, batch, LAYERS)
    train_step(plain, batch)
    assert all(m._probe is None for m in lora.lora_modules(model))  # no gradient is tracked after capture
    captured = capture_weights(model, LAYERS)
    for name in LAYERS:
        torch.testing.assert_close(captured[name], plain.get_submodule(name).weight, rtol=0, atol=0)
        ref = plain.get_submodule(name).weight.grad
        torch.testing.assert_close(dynamics.gradients[name], ref, rtol=1e-5, atol=1e-7)
        assert ref.abs().max() > 1e-4


def test_jagged_cosine_equals_its_formula():
    t = SimpleNamespace(warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    rl = SimpleNamespace(reset_every=20, restart_warmup_steps=5)
    f = relora.lr_lambda(t, rl)

    def cosine(s):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(cosine(10))
    assert f(19) == pytest.approx(cosine(19))  # just before the reset at 20
    assert f(20) == pytest.approx(cosine(25) / 5)  # just after it: re-warmup to the cosine at 25
    assert f(24) == pytest.approx(cosine(25)) and f(25) == pytest.approx(cosine(25))
    assert f(60) == pytest.approx(cosine(65) / 5)
    assert (
        f(99) == pytest.approx(cosine(99)) == pytest.approx(0.1, abs=3e-4)
    )  # the last update: ~min_lr_ratio
    late = relora.lr_lambda(SimpleNamespace(warmup_steps=30, max_steps=100, min_lr_ratio=0.1), rl)
    assert late(20) == pytest.approx(21 / 30) and late(40) < late(39) / 4  # no reset during warmup


@pytest.mark.parametrize("how, ratio", [("random", 0.999), ("magnitude", 0.5)])
def test_optimizer_reset_zeroes_the_configured_fraction_of_lora_moments_only(how, ratio):
    model, cfg = tiny(f"relora.optimizer_reset={how}", f"relora.prune_ratio={ratio}")
    optimizer = train(model, cfg)
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    factors = {p for m in lora.lora_modules(model) for p in (m.lora_A, m.lora_B)}
    zeroed = lora.relora_reset(model, optimizer, cfg.relora, seed=3, step=4)
    pruned = total = 0
    for p, state in optimizer.state.items():
        assert torch.equal(state["step"], before[p]["step"])  # Adam's bias correction goes on
        for key in ("exp_avg", "exp_avg_sq"):
            new, old = state[key], before[p][key]
            if p not in factors:
                assert torch.equal(new, old)
                continue
            assert torch.equal(new[new != 0], old[new != 0])  # kept entries are untouched
            pruned, total = pruned + int(((new == 0) & (old != 0)).sum()), total + new.numel()
            if how == "magnitude":  # the smallest entries go
                assert old[new == 0].abs().max() <= old[new != 0].abs().min()
    assert pruned / total == pytest.approx(zeroed, abs=2e-3)
    assert zeroed == pytest.approx(ratio, abs=0.002 if how == "random" else 1e-3)


def test_bad_relora_config_names_the_key():
    cases = {
        "relora.rank=4": "relora.rank: unknown key",
        "relora.prune_ratio=1.5": "relora.prune_ratio: must be in [0, 1], got 1.5",
        "relora.optimizer_reset=l1": "relora.optimizer_reset: 'l1' is not one of",
        "relora.restart_warmup_steps=3": "relora.restart_warmup_steps: must be in [0, relora.reset_every]",
        "training.schedule=linear": "training.schedule: 'linear'; ReLoRA's jagged cosine needs 'cosine'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            config(override)
        assert str(err.value).startswith(message), (override, str(err.value))
    with pytest.raises(
        ConfigError, match=r"relora.target_modules: no nn.Linear of PicoDecoder ends with 'swiglu.w_9'"
    ):
        tiny("relora.target_modules=[swiglu.w_9]")


def test_export_writes_the_effective_weights_that_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, cfg = tiny()
    for m in lora.lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)  # a non-zero s·B·A to merge
    save_pretrained(model, cfg.model_config(), tmp_path)  # the export path the checkpoint writer takes
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = rows()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), rtol=0, atol=1e-4)


# The recipe end to end: micro model, two resets between checkpoints.


def run_args(data, run_dir, *extra):
    return overrides(
        data, run_dir, *RELORA, f"training.max_steps={STEPS}", "checkpointing.save_every=4", *extra
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards(tmp_path_factory.mktemp("data"), 160, 24)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """A one-process run without dropout: the reference of the 2-rank runs (dropout masks are drawn per
    rank, so with dropout a run is reproducible on a fixed world size only)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    launch(run_args(data, run_dir, "relora.dropout=0"), recipe="recipes/relora.py")
    return run_dir


def test_recipe_logs_resets_and_exports_its_effective_weights(single):
    transformers = pytest.importorskip("transformers")
    _, acc = losses(single)
    assert [(e.step, e.value) for e in acc.Scalars("relora/resets")] == [(2, 1), (4, 2), (6, 3), (8, 4)]
    assert all(0.99 < e.value <= 1 for e in acc.Scalars("relora/optimizer_state_zeroed"))
    step = single / "checkpoints" / f"step_{STEPS}"
    ld = load_file(step / "learning_dynamics" / "weights.safetensors")
    exported = weights(single, STEPS)
    assert torch.equal(
        ld["weights.layers.1.attention.o_proj"], exported["model.layers.1.self_attn.o_proj.weight"]
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(step / "model").eval()
    assert not any("lora" in n for n in hf.state_dict())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, data, tmp_path, strategy):
    run_dir = tmp_path / "run"
    args = run_args(data, run_dir, "relora.dropout=0", f"training.strategy={strategy}")
    launch(args, nproc=2, recipe="recipes/relora.py")
    ref, _ = losses(single)
    got, _ = losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    for name, w in weights(single, STEPS).items():
        torch.testing.assert_close(weights(run_dir, STEPS)[name], w, rtol=0, atol=1e-5)
    for split in ("train", "eval"):  # effective weights' gradients, all-reduced like any gradient
        a = load_file(single / "checkpoints" / "step_4" / "learning_dynamics" / f"{split}.safetensors")
        b = load_file(run_dir / "checkpoints" / "step_4" / "learning_dynamics" / f"{split}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_resume_across_a_reset_is_bitwise_exact(data, tmp_path):
    """Killed at step 4 (just after the reset at 4 and its checkpoint), resumed: the resets at 6 and 8 and
    the dropout masks are drawn as in an uninterrupted run."""
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    launch(run_args(data, ref), recipe="recipes/relora.py")
    killed = launch(run_args(data, run_dir), check=False, kill_at="4:done", recipe="recipes/relora.py")
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert "resumed from" in launch(run_args(data, run_dir), recipe="recipes/relora.py").stdout
    assert losses(run_dir)[0] == losses(ref)[0]
    for name, w in weights(ref, STEPS).items():
        assert torch.equal(weights(run_dir, STEPS)[name], w), name
    for split in ("train", "eval", "weights"):
        a = load_file(ref / "checkpoints" / f"step_{STEPS}" / "learning_dynamics" / f"{split}.safetensors")
        b = load_file(
            run_dir / "checkpoints" / f"step_{STEPS}" / "learning_dynamics" / f"{split}.safetensors"
        )
        assert all(torch.equal(a[k], b[k]) for k in a), split
