"""Seconds from a SIGTERM to the torchrun launcher until every process of a preempted run has exited.

A 2-process run of recipes/pretrain.py with the tiny preset (11.3M parameters, vocabulary 50304) on random
data, a checkpoint every `--save-every` steps (learning dynamics at the default layers), is sent SIGTERM
`--trials` times, each after a few more logged updates; every launch resumes the last one. Per trial: the
recipe's own figure (signal to `sys.exit`, which it prints) and the time until the launcher and every worker
have exited, against torchrun's default grace of 30 s before it SIGKILLs the workers (the bound to fit).

    python benchmarks/preemption.py --trials 5
"""

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
GRACE = 30.0  # torchrun's default TORCH_ELASTIC_SHUTDOWN_TIMEOUT


def make_data(directory: Path, rows: int, seq: int) -> Path:
    """Random pretokenized rows of seq + 1 ids below the tiny preset's vocabulary."""
    directory.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, 50304, size=(rows, seq + 1), dtype=np.int32)
    pq.write_table(
        pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}), directory / "d.parquet"
    )
    return directory


def preempt(args: list[str], after: int) -> tuple[float, float, int]:
    """Launch, SIGTERM the launcher once `after` updates are logged; (recipe s, every process s, step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    proc = subprocess.Popen(
        ["./torchrun.sh", "recipes/pretrain.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, start, output = 0, None, []
    for line in proc.stdout:  # the end of the output: every process holding the pipe has exited
        output.append(line)
        if start is None and line.startswith("step "):
            seen += 1
            if seen == after:
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
    took = time.monotonic() - start
    proc.wait()
    m = re.search(r"preempted by SIGTERM at step (\d+): .*?; ([\d.]+)s from the signal", "".join(output))
    if m is None:
        raise SystemExit("no preemption line:\n" + "".join(output[-30:]))
    return float(m.group(2)), took, int(m.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--save-every", type=int, default=4)
    args = p.parse_args()
    steps = 4 * args.trials + 8
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.batch * (steps + 1), args.seq)
        run = [
            "model.preset=tiny",
            f"data.path={data}",
            f"data.seq_len={args.seq}",
            f"data.batch_size={args.batch}",
            "data.micro_batch_size=2",
            f"training.max_steps={steps}",
            "training.warmup_steps=1",
            f"checkpointing.run_dir={Path(tmp) / 'run'}",
            f"checkpointing.save_every={args.save_every}",
            f"learning_dynamics.eval_data={data}",
            "learning_dynamics.eval_batch_size=8",
            "logging.log_every=1",
        ]
        print(
            f"tiny preset, 2 CPU processes, rows of {args.seq}, batch {args.batch}, "
            f"save_every {args.save_every}"
        )
        print(f"{'trial':>5} {'step saved':>10} {'recipe s':>9} {'all exited s':>13} {'of 30 s grace':>14}")
        for trial in range(args.trials):
            recipe, took, step = preempt(run, after=1 + trial % 3)
            print(f"{trial:>5} {step:>10} {recipe:9.1f} {took:13.1f} {took / GRACE:13.0%}")


if __name__ == "__main__":
    main()
