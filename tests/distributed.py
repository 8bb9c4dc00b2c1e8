"""Run a test function on real processes, OLMo-core style: `run_distributed_test(fn, world_size=2)`."""

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """Return a free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(*args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_ranks(fn, world_size: int = 2, args: tuple = (), backend: str = "gloo", timeout: float = 240):
    """Run `fn(*args)` on `world_size` processes of `backend` until they end (killed after `timeout`
    seconds); return their exit codes and the first failure `(rank, traceback)`, or None."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors, backend))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], None if errors.empty() else errors.get()


def run_distributed_test(fn, world_size: int = 2, args: tuple = (), backend: str = "gloo") -> None:
    """Run `fn(*args)` on `world_size` processes of `backend` ("gloo" for CPU tensors, "nccl" for CUDA ones,
    each rank on GPU rank % device_count); re-raise the first rank's failure in the test."""
    codes, error = start_ranks(fn, world_size, args, backend)
    if error is not None:
        rank, tb = error
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    assert all(c == 0 for c in codes), f"process exit codes {codes}"
