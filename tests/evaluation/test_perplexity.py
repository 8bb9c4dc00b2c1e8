"""pico.evaluation.perplexity: the value, sharding over real ranks, FSDP2 weights after no-grad forward."""

import math

import torch
import torch.nn.functional as F

from pico.distributed import parallelize
from pico.evaluation import perplexity
from pico.model import PicoDecoder
from tests.distributed import run_distributed_test
from tests.tiny import model_config

CFG = model_config(max_seq_len=16)


def model_and_batches(n_batches=4, batch=2):
    torch.manual_seed(0)
    model = PicoDecoder(CFG)
    ids = torch.randint(0, 64, (n_batches * batch, 9), generator=torch.Generator().manual_seed(1))
    return model, [(ids[i : i + batch, :-1], ids[i : i + batch, 1:]) for i in range(0, len(ids), batch)]


def test_perplexity_is_exp_of_mean_token_loss():
    model, batches = model_and_batches()
    result = perplexity(model, batches, torch.device("cpu"))
    with torch.no_grad():
        losses = torch.cat(
            [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none") for x, y in batches]
        )
    assert result["tokens"] == losses.numel() == 4 * 2 * 8
    assert math.isclose(result["loss"], losses.double().mean().item(), rel_tol=1e-6)
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-12)


def _sharded(strategy):
    import torch.distributed as dist

    model, batches = model_and_batches()
    with torch.no_grad():  # every rank, all batches, unsharded
        reference = torch.cat(
            [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none") for x, y in batches]
        ).double()
    rank = dist.get_rank()
    model = parallelize(model, strategy=strategy, world_size=2, device=torch.device("cpu"))
    result = perplexity(model, batches[rank::2], torch.device("cpu"))
    assert result["tokens"] == reference.numel()
    assert math.isclose(result["loss"], reference.mean().item(), rel_tol=1e-6)


def test_perplexity_sharded_over_two_ranks_equals_one_process():
    run_distributed_test(_sharded, args=("ddp",))
    run_distributed_test(_sharded, args=("fsdp",))


def _no_stale_weights_after_eval():
    """Train, evaluate between backward and step, train again: equals the same run without the evaluation."""

    def run(evaluate):
        model, batches = model_and_batches()
        model = parallelize(model, strategy="fsdp", world_size=2, device=torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for x, y in batches[:2]:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            losses.append(loss.item())
            if evaluate:
                perplexity(model, batches[2:], torch.device("cpu"))
            opt.step()
            opt.zero_grad()
        return losses

    assert run(evaluate=True) == run(evaluate=False)


def test_fsdp_evaluation_between_backward_and_step_leaves_training_unchanged():
    run_distributed_test(_no_stale_weights_after_eval)
