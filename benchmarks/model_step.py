"""Training-step throughput of PicoDecoder vs transformers.LlamaForCausalLM with the same weights.

One step = forward + cross-entropy + backward + AdamW. Steps of the two models alternate so load
drift on a shared machine hits both alike; warm-up steps are excluded and the median step is reported.
CPU runs in fp32; CUDA (when present) under bf16 autocast.

    python benchmarks/model_step.py --preset tiny --vocab-size 8192 --seq-len 256 --batch-size 4 --steps 10
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pico.model import PicoDecoder, PicoDecoderConfig  # noqa: E402
from pico.model.hf import llama_config, pico_to_llama_name  # noqa: E402


def build_pair(config: PicoDecoderConfig, device: str) -> tuple[PicoDecoder, LlamaForCausalLM]:
    """A PicoDecoder and a LlamaForCausalLM holding identical weights."""
    pico = PicoDecoder(config)
    fields = {
        k: v for k, v in llama_config(config).items() if k not in ("pico", "architectures", "model_type")
    }
    llama = LlamaForCausalLM(LlamaConfig(**fields, use_cache=False))
    llama.load_state_dict({pico_to_llama_name(k): v for k, v in pico.state_dict().items()})
    return pico.to(device), llama.to(device)


def make_step(model: torch.nn.Module, is_llama: bool, device: str):
    """A closure running one forward/backward/AdamW step on a batch, returning the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step(input_ids: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            logits = model(input_ids=input_ids).logits if is_llama else model(input_ids)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # .item() synchronises CUDA, so wall time covers the whole step

    return step


def bench_device(config: PicoDecoderConfig, args, device: str) -> list[tuple]:
    """Rows (impl, device, dtype, tokens/s, ms/step) for pico and HF on one device."""
    torch.manual_seed(0)
    pico, llama = build_pair(config, device)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    input_ids, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        diff = (pico(input_ids).float() - llama(input_ids=input_ids).logits.float()).abs().max().item()
    steps = {"pico": make_step(pico, False, device), "hf-llama": make_step(llama, True, device)}
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step(input_ids, targets)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    dtype = "bf16-autocast" if device == "cuda" else "fp32"
    tokens = args.batch_size * args.seq_len
    rows = [
        (name, device, dtype, tokens / statistics.median(t), 1000 * statistics.median(t))
        for name, t in times.items()
    ]
    print(f"[{device}] max |logits pico - logits hf| before training: {diff:.2e}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument(
        "--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    args = parser.parse_args()

    config = PicoDecoderConfig.preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    print(
        f"preset={args.preset} vocab={args.vocab_size} batch={args.batch_size} seq={args.seq_len} "
        f"steps={args.steps} (+{args.warmup} warm-up) threads={torch.get_num_threads()} "
        f"torch={torch.__version__}"
    )
    rows = [row for device in args.devices for row in bench_device(config, args, device)]
    print(f"\n{'impl':<10} {'device':<6} {'dtype':<14} {'tokens/s':>10} {'ms/step':>9}")
    for impl, device, dtype, tps, ms in rows:
        print(f"{impl:<10} {device:<6} {dtype:<14} {tps:>10.0f} {ms:>9.1f}")
    for device in args.devices:
        pico_tps, hf_tps = (tps for _, d, _, tps, _ in rows if d == device)
        print(f"ratio pico/hf-llama tokens/s on {device}: {pico_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
