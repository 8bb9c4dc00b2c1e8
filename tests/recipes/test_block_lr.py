"""`training.block_lr_ratio`, the lr-allocation control of docs/case_studies.md: pretrain.py's (and the
forks') `build_optimizer` puts the attention and SwiGLU matrices in a group at that fraction of the learning
rate; at 1.0 the optimizer, and so training, is what it was without the key."""

import importlib
import sys

import pytest
import torch

from pico.config import ConfigError, load_config
from pico.training import apply_update, train_step
from tests.recipes.common import ROOT
from tests.tiny import MODEL, SEQ, VOCAB

sys.path.insert(0, str(ROOT / "recipes"))  # as `python recipes/relora.py` runs: its sibling modules import
pretrain = importlib.import_module("pretrain")
relora = importlib.import_module("relora")
lora = importlib.import_module("relora_modules")

CPU = torch.device("cpu")
WARMUP = ["training.warmup_steps=2", "training.max_steps=6", "training.schedule=cosine"]


def config(*extra, cls=None):
    args = [*MODEL, f"data.seq_len={SEQ}", *WARMUP, *extra]
    return load_config(None, args, cls=cls) if cls else load_config(None, args)


def rows(seed):
    return torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def train(model, optimizer, t, steps=4):
    """`steps` updates as pretrain.py makes them (step, clip, update, schedule); each step's group lrs."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretrain.lr_lambda(t))
    lrs = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, [rows(step)])
        apply_update(model, optimizer, loss, t.grad_clip)
        lrs.append([group["lr"] for group in optimizer.param_groups])
        scheduler.step()
    return lrs


def before_the_key(model, t):
    """build_optimizer before `block_lr_ratio`: matrices with weight decay, 1-D parameters without."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


def test_the_default_builds_the_optimizer_as_before_and_trains_bitwise_the_same():
    cfg = config()
    assert cfg.training.block_lr_ratio == 1.0
    runs = []
    for build in (pretrain.build_optimizer, before_the_key):
        model = pretrain.build_model(cfg.model_config(), 3, CPU)
        optimizer = build(model, cfg.training)
        runs.append((model, optimizer, train(model, optimizer, cfg.training)))
    (new, opt_new, lrs_new), (old, opt_old, lrs_old) = runs
    sizes = [[len(g["params"]) for g in opt.param_groups] for opt in (opt_new, opt_old)]
    assert sizes[0] == sizes[1]
    assert lrs_new == lrs_old
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name


def test_block_matrices_train_at_the_ratio_the_rest_at_full_lr():
    cfg = config("training.block_lr_ratio=0.4")
    model = pretrain.build_model(cfg.model_config(), 3, CPU)
    optimizer = pretrain.build_optimizer(model, cfg.training)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    linears = [f"attention.{p}_proj" for p in "qkvo"] + [f"swiglu.w_{i}" for i in range(3)]
    expected_block = sorted(f"layers.{i}.{m}.weight" for i in range(2) for m in linears)
    assert groups[2] == expected_block
    assert groups[0] == ["de_embedding_proj.weight", "embedding_proj.weight"]  # full lr, weight decay
    assert all(n.endswith("norm.weight") for n in groups[1])  # full lr, no weight decay
    assert sorted(sum(groups, [])) == sorted(names.values())  # every parameter once
    wd = cfg.training.weight_decay
    assert [g["weight_decay"] for g in optimizer.param_groups] == [wd, 0.0, wd]
    lrs = train(model, optimizer, cfg.training)
    for full, no_decay, block in lrs:  # the schedule scales every group alike: the ratio holds at every step
        assert full == no_decay and block == pytest.approx(0.4 * full, rel=1e-12)
    assert lrs[1][0] == pytest.approx(cfg.training.lr)  # the end of warmup: the full rate


def test_first_update_of_a_block_matrix_is_adamw_at_the_reduced_lr():
    """Adam's first step moves each entry by lr · g / (|g| + eps) (bias-corrected): 0.4 lr on the block."""
    cfg = config("training.block_lr_ratio=0.4", "training.warmup_steps=0", "training.grad_clip=null")
    model = pretrain.build_model(cfg.model_config(), 3, CPU)
    optimizer = pretrain.build_optimizer(model, cfg.training)
    v, emb = model.layers[0].attention.v_proj.weight, model.embedding_proj.weight
    before = {"v": v.detach().clone().double(), "emb": emb.detach().clone().double()}
    train_step(model, [rows(0)])
    grads = {"v": v.grad.double(), "emb": emb.grad.double()}
    optimizer.step()
    t = cfg.training
    for key, param, lr in (("v", v, t.lr * 0.4), ("emb", emb, t.lr)):
        w, g = before[key], grads[key]
        expected = w * (1 - lr * t.weight_decay) - lr * g / (g.abs() + t.eps)
        torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-7)


def test_relora_scales_its_lora_factors_and_leaves_the_frozen_weights_out():
    cfg = config(
        "training.block_lr_ratio=0.5",
        "relora.r=4",
        "relora.reset_every=2",
        "relora.restart_warmup_steps=1",
        cls=lora.ReLoRARunConfig,
    )
    model = relora.build_model(cfg.model_config(), 3, CPU, cfg.relora)
    optimizer = relora.build_optimizer(model, cfg.training)
    names = {id(p): n for n, p in model.named_parameters()}
    block = sorted(names[id(p)] for p in optimizer.param_groups[2]["params"])
    assert block and all(n.endswith(("lora_A", "lora_B")) for n in block)
    assert len(block) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    assert optimizer.param_groups[2]["lr"] == pytest.approx(0.5 * cfg.training.lr)


@pytest.mark.parametrize("value", [0, -0.5])
def test_a_ratio_that_is_not_positive_is_a_config_error(value):
    with pytest.raises(ConfigError, match=f"training.block_lr_ratio: must be positive, got {value}"):
        config(f"training.block_lr_ratio={value}")
