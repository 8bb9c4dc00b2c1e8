"""pico.training: the fused, chunked output layer + loss equals the plain logits path, also under capture and
on 2 ranks (DDP, FSDP2), and a step is bitwise reproducible."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pico.training
from pico.capture import capture
from pico.distributed import full_tensor, parallelize
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.training import captured_step, chunked_cross_entropy, train_step
from tests.distributed import run_distributed_test

VOCAB, SEQ = 101, 13  # neither divides the chunk of 7 tokens below


@pytest.fixture(autouse=True)
def _odd_chunks(monkeypatch):
    """Chunks of 7 tokens: no micro-batch (2-4 rows of 13 tokens) is a whole number of chunks."""
    monkeypatch.setattr(pico.training, "LOSS_CHUNK_ELEMENTS", 7 * VOCAB)


def model(seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    config = PicoDecoderConfig(
        d_model=16,
        n_layers=2,
        attention_n_heads=2,
        attention_n_kv_heads=1,
        activation_hidden_dim=32,
        vocab_size=VOCAB,
        max_seq_len=16,
    )
    return PicoDecoder(config)


def rows(n: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(1))  # (n, T+1)


def plain_grads(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy of the full logits over `batch` and every parameter's gradient, in one process."""
    reference = model()
    loss = F.cross_entropy(reference(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in reference.named_parameters()}


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, f"{name}: relative error {rel:.1e}"


def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients():
    hidden = torch.randn(37, 16, requires_grad=True)  # (N, C); 37 = 5 chunks of 7 + 2
    weight = torch.randn(VOCAB, 16, requires_grad=True)  # (V, C)
    labels = torch.randint(0, VOCAB, (37,))
    plain = F.cross_entropy(hidden @ weight.T, labels)
    want = torch.autograd.grad(3 * plain, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, labels)
    got = torch.autograd.grad(3 * chunked, (hidden, weight))  # a non-unit upstream gradient
    assert_rel_close(chunked, plain, "loss")
    assert_rel_close(got[0], want[0], "hidden grad")
    assert_rel_close(got[1], want[1], "weight grad")


def test_train_step_equals_the_plain_logits_path_and_is_bitwise_reproducible():
    want_loss, want = plain_grads(rows())
    runs = []
    for _ in range(2):
        trained = model()
        loss = train_step(trained, list(rows().split(2)))  # 4 micro-batches of 26 tokens each
        runs.append((loss, {name: p.grad for name, p in trained.named_parameters()}))
    assert_rel_close(runs[0][0], want_loss, "loss")
    for name, grad in runs[0][1].items():
        assert_rel_close(grad, want[name], name)
        assert torch.equal(grad, runs[1][1][name]), f"{name}: two identical runs differ"
    assert torch.equal(runs[0][0], runs[1][0])


def test_captured_gradients_are_those_the_optimizer_receives():
    layers = ["attention.v_proj", "de_embedding_proj"]
    for captured in (layers[:1], layers):  # capturing the output layer runs the plain logits path
        trained = model()
        loss, dynamics = captured_step(trained, list(rows().split(4)), captured)
        params = dict(trained.named_parameters())
        for name, grad in dynamics.gradients.items():
            assert torch.equal(grad, params[f"{name}.weight"].grad), name
    assert dynamics.activations["de_embedding_proj"].shape == (8, VOCAB)  # the logits of the last position
    want_loss, want = plain_grads(rows())
    assert_rel_close(loss, want_loss, "loss")
    assert_rel_close(params["de_embedding_proj.weight"].grad, want["de_embedding_proj.weight"])


def float64_token_losses(batch: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (N, T) of the full logits over `batch`, computed in float64."""
    reference = model().double()
    logits = reference(batch[:, :-1])  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(
        len(batch), -1
    )


def test_per_token_losses_are_the_cross_entropy_of_each_token_and_the_loss_their_mean():
    want = float64_token_losses(rows())  # (8, T)
    _, want_grads = plain_grads(rows())
    for captured in (["attention.v_proj"], ["attention.v_proj", "de_embedding_proj"]):  # fused, plain
        trained = model()
        loss, dynamics = captured_step(trained, list(rows().split(4)), captured, losses=True)
        assert dynamics.losses.dtype == torch.float32 and dynamics.losses.shape == (8, SEQ)
        torch.testing.assert_close(dynamics.losses.double(), want, rtol=0, atol=1e-5)
        assert_rel_close(loss, dynamics.losses.mean(), "loss")
        for name, p in trained.named_parameters():
            assert_rel_close(p.grad, want_grads[name], name)  # the same batch-mean gradient
    _, without = captured_step(model(), list(rows().split(4)), captured)
    assert without.losses is None


def test_output_layer_hooks_see_the_logits_and_forward_is_unchanged():
    trained = model()
    with capture(trained, ["de_embedding_proj"]) as cap:
        train_step(trained, [rows(2)])
    assert cap.activations()["de_embedding_proj"].shape == (2, VOCAB)
    assert "forward" not in vars(trained)  # the hidden-states switch is undone
    with torch.no_grad():
        assert trained(rows(2)[:, :-1]).shape == (2, SEQ, VOCAB)


def _two_ranks_equal_one_process(strategy: str):
    pico.training.LOSS_CHUNK_ELEMENTS = 7 * VOCAB  # a spawned process: the fixture did not run here
    want_loss, want = plain_grads(rows())
    trained = parallelize(model(), strategy=strategy, world_size=2, device=torch.device("cpu"))
    rank = dist.get_rank()
    loss = train_step(trained, list(rows()[4 * rank : 4 * rank + 4].split(2)))  # 2 micro-batches each
    assert_rel_close(loss, want_loss, "loss")
    for name, p in trained.named_parameters():
        name = name.removeprefix("module.")
        assert_rel_close(full_tensor(p.grad), want[name], name)
    trained.zero_grad(set_to_none=True)
    rows_of_rank = list(rows()[4 * rank : 4 * rank + 4].split(2))
    _, dynamics = captured_step(trained, rows_of_rank, ["attention.v_proj"], losses=True)
    torch.testing.assert_close(dynamics.losses.double(), float64_token_losses(rows()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(strategy):
    run_distributed_test(_two_ranks_equal_one_process, world_size=2, args=(strategy,))
