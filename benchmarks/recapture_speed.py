"""Seconds per model of `recipes/analyze.py --model` (re-captured learning dynamics) and the analysis' share.

Models: `--models` exports of the tiny preset (vocabulary 50304, random weights, each written by
`save_pretrained` as a pico checkpoint writes `model/`), read back through transformers' LlamaForCausalLM.
Per model: loading it (`load_model`), the capture (`capture_eval`: one forward/backward of the eval batch
under pico's hooks, the default layers, gradients only for them), writing the step (`write_step`), and the
default analysis of the re-captured run (eval split) divided by the number of models. `recapture()` end to
end (its checks included) is timed as well. A first pass warms up (imports, allocator) and is not counted.

Reference: the run's own in-training capture of the same eval split, `pico.training.captured_step` on a
PicoDecoder with the same weights and batch (what recipes/pretrain.py does at each checkpoint step).

    python benchmarks/recapture_speed.py --models 3 --batch 16 --seq 256
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from pico.analysis import analyze, load_spec
from pico.analysis.recapture import capture_eval, load_model, recapture, write_step
from pico.data import read_batch
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.model.hf import llama_config
from pico.run_dir import DEFAULT_LAYERS, step_dir
from pico.training import captured_step


def exports(root: Path, config: PicoDecoderConfig, n: int) -> list[Path]:
    """`n` tiny-preset models with different random weights, saved as a checkpoint's `model/`."""
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        path = step_dir(root / "run", 1000 * i) / "model"
        PicoDecoder(config).save_pretrained(path)
        paths.append(path)
    return paths


def eval_data(root: Path, rows: int, seq: int, vocab: int) -> Path:
    """A parquet file of `rows` random token rows of seq + 1 ids."""
    ids = np.random.default_rng(0).integers(0, vocab, size=(rows, seq + 1))
    path = root / "eval" / "part-000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array(ids.tolist(), type=pa.list_(pa.int32()))}), path)
    return path.parent


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def reference(path: Path, rows: torch.Tensor) -> float:
    """Seconds of the in-training eval split on the same weights: captured_step on a PicoDecoder."""
    model = PicoDecoder.from_pretrained(path)
    seconds, _ = timed(captured_step, model, [rows], DEFAULT_LAYERS, "last", "fp32", rows)
    return seconds


def one_pass(models: list[Path], data: Path, rows: torch.Tensor, config, out: Path) -> dict[str, list[float]]:
    """Each phase's seconds for every model, the analysis per model, and recapture() end to end per model."""
    times = {key: [] for key in ("load", "capture", "write", "reference")}
    for step, path in enumerate(models):
        load, model = timed(load_model, path, str(path))
        capture, (_, dynamics, weights) = timed(capture_eval, model, rows, DEFAULT_LAYERS)
        write, _ = timed(write_step, out / "pieces", step, dynamics, weights, llama_config(config))
        times["load"].append(load)
        times["capture"].append(capture)
        times["write"].append(write)
        times["reference"].append(reference(path, rows))
    spec = load_spec(None, ["splits=[eval]"])
    seconds, _ = timed(analyze, [out / "pieces"], spec, progress=False)
    times["analysis"] = [seconds / len(models)]
    seconds, _ = timed(
        recapture,
        models,
        eval_data=str(data),
        output=out / "whole",
        eval_batch_size=len(rows),
        progress=False,
    )
    times["recapture()"] = [seconds / len(models)]
    return times


def main():
    """Print the seconds per model of each phase, its share, and the ratio to the in-training capture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3, help="models re-captured per pass")
    parser.add_argument("--batch", type=int, default=16, help="eval batch rows")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--reps", type=int, default=2, help="passes after a warm-up one; medians reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PicoDecoderConfig.preset("tiny", max_seq_len=args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models, data = (
            exports(root, config, args.models),
            eval_data(root, args.batch, args.seq, config.vocab_size),
        )
        rows = read_batch(str(data), args.batch, args.seq)  # (batch, seq + 1)
        passes = [one_pass(models, data, rows, config, root / f"out{i}") for i in range(args.reps + 1)][1:]
    median = {key: statistics.median(v for p in passes for v in p[key]) for key in passes[0]}
    total = median["load"] + median["capture"] + median["write"] + median["analysis"]
    print(
        f"preset=tiny vocab={config.vocab_size} eval batch {args.batch} x {args.seq} tokens, "
        f"{args.models} models, reps={args.reps} threads={args.threads} torch={torch.__version__} "
        f"transformers={transformers.__version__}\n"
    )
    print(f"{'phase':<12}{'s/model':>10}{'share':>8}")
    for key in ("load", "capture", "write", "analysis"):
        print(f"{key:<12}{median[key]:>10.3f}{median[key] / total:>8.1%}")
    print(f"{'total':<12}{total:>10.3f}{1:>8.1%}")
    print(
        f"{'recapture()':<12}{median['recapture()']:>10.3f}   end to end, its checks included (no analysis)"
    )
    ref = median["reference"]
    print(
        f"\nreference: the in-training eval-split capture (captured_step, PicoDecoder): {ref:.3f} s\n"
        f"capture / reference = {median['capture'] / ref:.2f}x; "
        f"total per model / reference = {total / ref:.2f}x"
    )


if __name__ == "__main__":
    main()
