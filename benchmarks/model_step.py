"""Training-step speed and memory of PicoDecoder vs transformers.LlamaForCausalLM with the same weights.

One step = forward + loss + backward + AdamW, both with `torch.optim.AdamW(fused=True)` (what the HF
Trainer uses by default, `adamw_torch_fused`). pico's step is `pico.training.train_step`, the recipe's
default: the output layer and the loss fused and chunked over tokens. HF's is `model(ids).logits` then
`F.cross_entropy`. Steps of all implementations alternate, so load drift on a shared machine hits each
alike; a repetition is `--steps` rounds of one step each, its ratio the median of its rounds' paired
ratios (hf-llama's step time / the implementation's), reported as the median over `--reps` repetitions
with their min–max spread. Peak memory is measured per implementation in its own subprocess, after a
warm-up step: the peak RSS of a step above the RSS before it (CPU), or the allocator's peak (CUDA). CPU
runs in fp32 on `--threads` threads; CUDA (when present) under bf16 autocast. `--levers` adds pico
variants with one lever undone (the fused loss, fused AdamW, the CPU attention-head padding of
`pico.model.decoder.causal_attention`), and per-block `torch.compile` with its compile time amortised.

    python benchmarks/model_step.py [--vocab-sizes 8192 50304] [--reps 3] [--steps 5] [--levers]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compile from scratch in every run, so that the first compiled step shows the whole compile cost.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pico.model import PicoDecoder, PicoDecoderConfig, decoder  # noqa: E402
from pico.model.hf import llama_config, pico_to_llama_name  # noqa: E402
from pico.training import train_step  # noqa: E402

DEFAULT_MIN_HEAD_DIM = decoder.CPU_MIN_HEAD_DIM

# name: (model, loss, AdamW implementation, per-block compile, CPU head padding); the first is the default.
IMPLS = {
    "pico": ("pico", "chunked", "fused", False, True),
    "hf-llama": ("hf", "logits", "fused", False, True),
}
LEVERS = {  # pico with one lever changed
    "pico logits-loss": ("pico", "logits", "fused", False, True),
    "pico for-loop-adamw": ("pico", "chunked", "for-loop", False, True),
    "pico compile": ("pico", "chunked", "fused", True, True),
    "pico unpadded-heads": ("pico", "chunked", "fused", False, False),
}


def build(impl: tuple, config: PicoDecoderConfig, device: str) -> torch.nn.Module:
    """The model of `impl` on `device`, from seed 0: pico and HF hold identical weights."""
    torch.manual_seed(0)
    pico = PicoDecoder(config)
    if impl[0] == "pico":
        if impl[3]:
            for block in pico.layers:
                block.compile()
        return pico.to(device)
    fields = {
        k: v for k, v in llama_config(config).items() if k not in ("pico", "architectures", "model_type")
    }
    llama = LlamaForCausalLM(LlamaConfig(**fields, use_cache=False))
    llama.load_state_dict({pico_to_llama_name(k): v for k, v in pico.state_dict().items()})
    return llama.to(device)


def make_step(model: torch.nn.Module, impl: tuple, device: str):
    """A closure running one forward/backward/AdamW step on token rows (B, T+1), returning the loss."""
    _, loss_kind, adamw, _, pad_heads = impl
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=adamw == "fused")
    precision = "bf16-mixed" if device == "cuda" else "fp32"

    def step(rows: torch.Tensor) -> float:
        decoder.CPU_MIN_HEAD_DIM = DEFAULT_MIN_HEAD_DIM if pad_heads else 0  # 0: never pad
        if loss_kind == "chunked":
            loss = train_step(model, [rows], precision)
        else:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                ids = rows[:, :-1]  # (B, T)
                logits = model(input_ids=ids).logits if isinstance(model, LlamaForCausalLM) else model(ids)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decoder.CPU_MIN_HEAD_DIM = DEFAULT_MIN_HEAD_DIM
        return loss.item()  # .item() synchronises CUDA, so wall time covers the whole step

    return step


def vm_kb(field: str) -> int:
    """A `Vm*` field of /proc/self/status in kB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(name: str, impls: dict, config: PicoDecoderConfig, args, device: str) -> None:
    """Run in a subprocess: build one implementation, take a warm-up step (optimizer state, lazy library
    set-up), then print the peak memory of one more step above what it started from, in bytes."""
    model = build(impls[name], config, device)
    step = make_step(model, impls[name], device)
    rows = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    step(rows)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(rows)
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS (Linux)
        before = vm_kb("VmRSS") * 1024
        step(rows)
        peak = vm_kb("VmHWM") * 1024
    print(json.dumps({"step_bytes": peak - before}))


def measure_memory(name: str, vocab: int, args, device: str) -> dict:
    """`memory_child` of one implementation in a fresh process (so peaks do not mix)."""
    cmd = [sys.executable, __file__, "--memory-child", name, "--vocab-sizes", str(vocab), "--devices", device]
    cmd += ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_speed(impls: dict, config: PicoDecoderConfig, args, device: str) -> tuple[dict, dict, dict]:
    """Per implementation: tokens/s of each repetition (the median of its steps), the ratio to hf-llama of
    each repetition (the median of its rounds' ratios: steps alternate, so a round's steps share the
    machine's load) and the seconds of its first step (compilation included)."""
    rows = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    torch._dynamo.reset()  # compiled blocks of an earlier vocab size would be reused otherwise
    steps = {name: make_step(build(impl, config, device), impl, device) for name, impl in impls.items()}
    first = {}
    for _ in range(args.warmup):
        for name, step in steps.items():
            start = time.perf_counter()
            step(rows)
            first.setdefault(name, time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    speed, ratio = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(args.reps):
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                step(rows)
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            speed[name].append(tokens / statistics.median(t))
            ratio[name].append(statistics.median(h / p for h, p in zip(times["hf-llama"], t)))
    return speed, ratio, first


def check_equal(config: PicoDecoderConfig, device: str) -> float:
    """max |logits pico - logits HF| on one batch before training."""
    pico, llama = build(IMPLS["pico"], config, device), build(IMPLS["hf-llama"], config, device)
    ids = torch.randint(0, config.vocab_size, (2, 32), device=device)
    with torch.no_grad():
        return (pico(ids).float() - llama(input_ids=ids).logits.float()).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[8192, 50304])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (ratios: median and spread)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation and repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: robust on a shared machine)"
    )
    parser.add_argument("--levers", action="store_true", help="also time pico with one lever undone")
    parser.add_argument(
        "--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    impls = {**IMPLS, **(LEVERS if args.levers else {})}

    def config(vocab):
        return PicoDecoderConfig.preset(args.preset, vocab_size=vocab, max_seq_len=args.seq_len)

    if args.memory_child:
        return memory_child(
            args.memory_child, {**IMPLS, **LEVERS}, config(args.vocab_sizes[0]), args, args.devices[0]
        )
    print(
        f"preset={args.preset} batch={args.batch_size} seq={args.seq_len} "
        f"reps={args.reps} x {args.steps} steps (+{args.warmup} warm-up) "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    for device in args.devices:
        dtype = "bf16-autocast" if device == "cuda" else "fp32"
        print(
            f"\n[{device}, {dtype}] tokens/s: median over reps; ratio vs hf-llama: median [min, max] "
            "over reps; step MB: peak memory of a step above the memory before it"
        )
        print(
            f"{'vocab':>6} {'impl':<20} {'tokens/s':>9} {'ratio':>6} {'spread':>13} "
            f"{'step MB':>8} {'mem ratio':>9}"
        )
        for vocab in args.vocab_sizes:
            diff = check_equal(config(vocab), device)
            speed, ratio, first = measure_speed(impls, config(vocab), args, device)
            memory = {name: measure_memory(name, vocab, args, device)["step_bytes"] for name in impls}
            for name, tps in speed.items():
                ratios = ratio[name]
                print(
                    f"{vocab:>6} {name:<20} {statistics.median(tps):>9.0f} "
                    f"{statistics.median(ratios):>5.2f}x "
                    f"[{min(ratios):.2f}, {max(ratios):.2f}] {memory[name] / 2**20:>8.0f} "
                    f"{memory[name] / memory['hf-llama']:>8.2f}x"
                )
            print(f"{vocab:>6} max |logits pico - logits hf| before training: {diff:.1e}")
            if "pico compile" in speed:  # compilation amortised: after how many steps it has paid
                tokens = args.batch_size * args.seq_len
                eager, compiled = (tokens / statistics.median(speed[n]) for n in ("pico", "pico compile"))
                extra = first["pico compile"] - first["pico"]
                verdict = (
                    f"pays after {extra / (eager - compiled):,.0f} steps"
                    if compiled < eager
                    else "never pays"
                )
                print(
                    f"{vocab:>6} compile: first step +{extra:.1f}s, "
                    f"then {1e3 * (eager - compiled):+.0f} ms/step saved: {verdict}"
                )


if __name__ == "__main__":
    main()
