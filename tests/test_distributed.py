"""pico.distributed: resolve_device (the one device-name parser), parallelize's keyword arguments and
DDP's gradient reduction."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pico.distributed import parallelize, resolve_device
from pico.errors import ConfigError
from pico.model import PicoDecoder
from pico.training import token_loss
from tests.distributed import run_distributed_test
from tests.tiny import model_config


def test_resolve_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:x", "", None, "cpu:0"):
        with pytest.raises(ConfigError, match=r"^--device: expected auto, cpu, cuda or cuda:N, got "):
            resolve_device(name, key="--device")
    with pytest.raises(ConfigError, match="^device: cuda:1 asked for, but torch sees no CUDA GPU"):
        resolve_device("cuda:1")


def test_cuda_is_this_process_gpu(monkeypatch):
    """`cuda` (and `auto` on a GPU machine) is cuda:LOCAL_RANK under a launcher, else the current GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == resolve_device() == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device(
        "cuda", 0
    )


def _ddp_options_reach_ddp():
    model = parallelize(
        PicoDecoder(model_config()),
        strategy="ddp",
        world_size=2,
        device=torch.device("cpu"),
        ddp_options={"find_unused_parameters": True},
    )
    assert isinstance(model, DistributedDataParallel) and model.find_unused_parameters
    plain = parallelize(PicoDecoder(model_config()), strategy="ddp", world_size=2, device=torch.device("cpu"))
    assert not plain.find_unused_parameters
    # The options are DDP's alone: FSDP2 and one process ignore them.
    sharded = parallelize(
        PicoDecoder(model_config()),
        strategy="fsdp",
        world_size=dist.get_world_size(),
        device=torch.device("cpu"),
        ddp_options={"find_unused_parameters": True},
    )
    assert isinstance(sharded, PicoDecoder)


def test_ddp_options_reach_ddp():
    run_distributed_test(_ddp_options_reach_ddp, world_size=2)


def _ddp_reduces_every_iteration_alike():
    torch.manual_seed(0)
    local = PicoDecoder(model_config())
    model = parallelize(copy.deepcopy(local), strategy="ddp", world_size=4, device=torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))  # (2, T+1)
    grads = []
    for _ in range(3):  # DDP buckets iteration 1 in parameter order, later ones in gradient-ready order
        model.zero_grad()
        token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))
    token_loss(local, ids[:, :-1], ids[:, 1:]).backward()
    for p, grad in zip(local.parameters(), grads[0]):  # the mean over ranks, summed in float64
        parts = [torch.empty_like(p.grad) for _ in range(4)]
        dist.all_gather(parts, p.grad)
        torch.testing.assert_close(grad.double(), torch.stack(parts).double().mean(0), rtol=0, atol=1e-7)


def test_ddp_reduces_the_first_iteration_as_every_later_one():
    """At 4 ranks update 1 of a run (a resumed run's too) gets bitwise the gradients a later update would."""
    run_distributed_test(_ddp_reduces_every_iteration_alike, world_size=4)


def test_parallelize_takes_keywords():
    with pytest.raises(TypeError):
        parallelize(PicoDecoder(model_config()), "ddp", 1, torch.device("cpu"))
    model = PicoDecoder(model_config())
    assert parallelize(model, strategy="auto", world_size=1, device=torch.device("cpu")) is model
    with pytest.raises(ConfigError, match="^training.strategy: unknown strategy 'tp'"):
        parallelize(model, strategy="tp", world_size=2, device=torch.device("cpu"))
