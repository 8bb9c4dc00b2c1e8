"""Cost of the manifest: hashing every checkpoint file as it is written (docs/checkpoints.md, "Manifest").

Reference: the same background write of the same step (`CheckpointWriter`: DCP state with AdamW moments,
train_state.json, the HF export, eval.json) without the manifest: DCP's plain `FileSystemWriter`, safetensors'
`save_file`, plain file writes, no manifest.json. Each iteration writes once with and once without, in
alternating order; the ratio is the median of per-iteration ratios, and the best times are the least
disturbed by other load on a shared machine. Then the work the manifest adds, timed alone, as a fraction of
the background write: hashing the bytes of one written step held in memory with xxh3-128 (pico's) and, for
comparison, sha256; and writing model.safetensors with pico's hashing writer
(`pico.manifest.write_safetensors`) instead of safetensors' `save_file`.

    python benchmarks/checkpoint_hashing.py --preset tiny --reps 15 [--dir /dev/shm]
"""

import argparse
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter

import pico.checkpoint
import pico.manifest
from pico.checkpoint import CheckpointStep, CheckpointWriter
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.run_dir import step_dir


class _PlainWriter(FileSystemWriter):
    """DCP's own writer (the reference): no hashing stream."""

    def digests(self) -> dict:
        return {}


def _plain_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def _plain_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# pico.checkpoint's writers of a step's files, as the reference replaces them
WITHOUT_MANIFEST = {
    "HashingWriter": _PlainWriter,
    "write_safetensors": _plain_safetensors,
    "write_bytes": _plain_bytes,
    "write_manifest": lambda step_path, digests: None,
}


def model_and_optimizer(preset: str, vocab: int):
    """The preset's model after one AdamW update (so that the optimizer has its moments to save)."""
    torch.manual_seed(0)
    model = PicoDecoder(PicoDecoderConfig.preset(preset, vocab_size=vocab, max_seq_len=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (2, 17))  # (B, T+1)
    logits = model(ids[:, :-1])  # (B, T, V)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    return model, optimizer


def write(writer: CheckpointWriter, model, optimizer, step: int, manifest: bool) -> float:
    """Seconds of the background write of step `step` (the writer's own measure)."""
    kept = {name: getattr(pico.checkpoint, name) for name in WITHOUT_MANIFEST}
    if not manifest:
        vars(pico.checkpoint).update(WITHOUT_MANIFEST)
    try:
        writer.save(CheckpointStep(step, {"step": step}, evals={"task": {"acc": 0.5}}), model, optimizer)
        writer.complete_write()
    finally:
        vars(pico.checkpoint).update(kept)
    return writer.written()[step]


def hashing_alone(files: list[Path]) -> dict[str, float]:
    """Seconds to hash the contents of `files` (read into memory first) with each algorithm."""
    contents = [f.read_bytes() for f in files]
    seconds = {}
    for name, digest in (("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256)):
        start = time.perf_counter()
        for data in contents:
            digest(data).hexdigest()
        seconds[name] = time.perf_counter() - start
    return seconds


def export_writers(model, directory: Path, reps: int = 5) -> float:
    """Median extra seconds of writing the weights with `write_safetensors` (hashing) over `save_file`."""
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    extra = []
    for _ in range(reps):
        start = time.perf_counter()
        save_file(tensors, directory / "a.safetensors")
        middle = time.perf_counter()
        pico.manifest.write_safetensors(directory / "b.safetensors", tensors, {})
        extra.append((time.perf_counter() - middle) - (middle - start))
    return statistics.median(extra)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, optimizer = model_and_optimizer(args.preset, args.vocab)
    root = Path(tempfile.mkdtemp(prefix="pico-hashing-", dir=args.dir))
    writer = CheckpointWriter(root)
    times = {True: [], False: []}
    ratios = []
    write(writer, model, optimizer, 0, True)  # warm-up: allocations, first files of the directory
    for rep in range(1, args.reps + 1):
        order = (True, False) if rep % 2 else (False, True)
        seconds = {
            manifest: write(writer, model, optimizer, 2 * rep + i, manifest)
            for i, manifest in enumerate(order)
        }
        for manifest in seconds:
            times[manifest].append(seconds[manifest])
        ratios.append(seconds[True] / seconds[False])
        kept = step_dir(root, 2 * rep + 1)
        for old in root.glob("checkpoints/step_*"):
            if old != kept:
                shutil.rmtree(old)
    files = sorted(p for p in step_dir(root, 2 * args.reps + 1).rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in files)
    state = sum(f.stat().st_size for f in files if "/state/" in str(f))
    alone = hashing_alone(files)
    writers = export_writers(model, root)
    shutil.rmtree(root)

    params = sum(p.numel() for p in model.parameters())
    write_s = statistics.median(times[True])
    print(
        f"preset={args.preset} vocab={args.vocab} params={params / 1e6:.1f}M step files: {len(files)}, "
        f"{total / 1e6:.0f} MB (state/ {state / 1e6:.0f} MB) reps={args.reps} "
        f"dir={args.dir or tempfile.gettempdir()} torch={torch.__version__}"
    )
    print("background write of one step: seconds (median, best); ratio: median [min, max] per iteration")
    print(f" {'write':<27}{'median':>8}{'best':>8}  {'ratio':>6}  spread")
    for manifest, name in ((False, "no manifest (reference)"), (True, "manifest, xxh3_128 (pico)")):
        ratio = (
            f"{statistics.median(ratios):6.3f}x [{min(ratios):.3f}, {max(ratios):.3f}]"
            if manifest
            else f"{1:6.3f}x"
        )
        print(f" {name:<27}{statistics.median(times[manifest]):8.3f}{min(times[manifest]):8.3f}  {ratio}")
    print("the manifest's work alone: seconds, and as a share of the background write")
    for name, seconds in alone.items():
        label = f"{name} of the step" + (" (not used)" if name == "sha256" else "")
        print(f" {label:<32}{seconds:7.3f}  {seconds / write_s:6.1%}  ({total / seconds / 1e9:.1f} GB/s)")
    label = "model.safetensors, pico's writer"
    print(f" {label:<32}{writers:+7.3f}  {writers / write_s:6.1%}  (vs safetensors' save_file)")


if __name__ == "__main__":
    main()
