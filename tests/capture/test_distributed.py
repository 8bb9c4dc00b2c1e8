"""2-rank gloo capture under DDP and FSDP2 equals the single-process capture of the same global batch."""

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from pico.capture import capture, capture_weights
from pico.distributed import gather_rows, parallelize
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from tests.capture.common import LAYERS, batch, tiny_model, train_step
from tests.distributed import run_distributed_test


def single_process(positions: str) -> dict:
    """Activations, gradients and weights of one update on the whole batch in one process, one micro-batch."""
    model = tiny_model()
    with capture(model, LAYERS, positions=positions) as cap:
        train_step(model, batch(), micro_batch_size=8)
        grads = cap.gradients()
    return {"activations": cap.activations(), "gradients": grads, "weights": capture_weights(model, LAYERS)}


def _capture_on_two_ranks(strategy: str, positions: str, reference: dict, directory: str):
    rank = dist.get_rank()
    model = parallelize(tiny_model(), strategy=strategy, world_size=2, device=torch.device("cpu"))
    rows = batch()
    with capture(model, LAYERS, positions=positions) as cap:
        train_step(model, rows, micro_batch_size=2)  # rows [4r, 4r+4) in 2 micro-batches, sync on the last
        grads = cap.gradients()
    got = {"activations": cap.activations(), "gradients": grads, "weights": capture_weights(model, LAYERS)}
    for kind, tensors in reference.items():
        assert list(got[kind]) == list(tensors), kind
        for name, want in tensors.items():
            assert got[kind][name].shape == want.shape, (kind, name)
            torch.testing.assert_close(got[kind][name], want, rtol=1e-5, atol=1e-5, msg=f"{kind}.{name}")

    # Uneven row counts still come back in rank order.
    local = torch.arange(3.0).unsqueeze(1) + 10 * rank if rank == 0 else torch.tensor([[10.0]])
    assert torch.equal(gather_rows(local), torch.tensor([[0.0], [1.0], [2.0], [10.0]]))

    split = SplitDynamics(got["activations"], got["gradients"], rows)
    written = write_learning_dynamics(
        directory, {"train": split}, got["weights"], step=3, positions=positions
    )
    assert (len(written) == 2) if rank == 0 else (written == [])
    dist.barrier()
    with safe_open(f"{directory}/learning_dynamics/train.safetensors", "pt") as f:
        assert f.metadata()["world_size"] == "2"


@pytest.mark.parametrize("strategy,positions", [("ddp", "all"), ("fsdp", "last")])
def test_two_ranks_equal_one_process(strategy, positions, tmp_path):
    run_distributed_test(
        _capture_on_two_ranks,
        world_size=2,
        args=(strategy, positions, single_process(positions), str(tmp_path)),
    )
