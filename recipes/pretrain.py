"""Pretrain a pico decoder: `[./torchrun.sh] python recipes/pretrain.py --config FILE [section.key=value ...]`.

This file is the training loop. Fork it to run an experiment: swap the model, the optimizer or the
schedule here, without touching `pico/`.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from pico.capture import capture, capture_weights, dynamics_scalars, gather_rows, write_learning_dynamics
from pico.checkpoint import (checkpoint_writer, export_model, load_train_state, resolve_resume, rng_state,
                             save_train_state, set_rng_state)
from pico.config import ConfigError, load_config, save_config
from pico.data import TokenStream, find_tokenizer, iter_eval_batches, read_batch
from pico.distributed import (all_reduce_sum, autocast, cleanup, gradient_sync, init_distributed, parallelize,
                              resolve_strategy)
from pico.evaluation import perplexity
from pico.logging import TrainLogger, peak_flops
from pico.model import PicoDecoder


def lr_lambda(t):
    """Linear warmup to `lr`, then linear or cosine decay to `min_lr_ratio · lr` at `max_steps`."""
    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        if t.schedule == "constant":
            return 1.0
        decay = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay
    return factor


def build_optimizer(model, t):
    """AdamW; weight decay only on matrices (norm gains and other 1-D parameters are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def main(argv=None):
    """Train one run as configured; exit 2 on a bad config, 3 when a non-finite loss stops it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (defaults apply where it is silent)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    t, d, ld, ck = cfg.training, cfg.data, cfg.learning_dynamics, cfg.checkpointing
    dist = init_distributed()
    run_dir = os.path.expanduser(ck.run_dir)

    # Model: built on the meta device, materialised once and initialised from the seed (identical on
    # every rank and for every world size), then wrapped or sharded by parallelize().
    torch.manual_seed(t.seed)
    model_cfg = cfg.model_config()
    with torch.device("meta"):
        model = PicoDecoder(model_cfg)
    model.to_empty(device=dist.device)
    model.init_weights()
    flops_per_token, n_params = model.flops_per_token(d.seq_len), model.num_params()
    model = parallelize(model, t.strategy, dist.world_size, dist.device, t.precision,
                        t.activation_checkpointing, t.compile)
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))

    try:
        stream = TokenStream(d.path, d.seq_len, d.batch_size, d.micro_batch_size, dist.rank, dist.world_size,
                             vocab_size=model_cfg.vocab_size, shuffle_seed=d.shuffle_seed, wrap=d.wrap,
                             prefetch=d.prefetch, device=dist.device)
    except ValueError as e:  # a batch split that does not divide, or unreadable data (names the file)
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    accum = stream.accumulation_steps
    eval_ids = None
    if ld.enabled and ld.eval_data:  # the fixed eval batch: the same sequences at every checkpoint
        if ld.eval_batch_size % dist.world_size:
            print(f"config error: learning_dynamics.eval_batch_size: {ld.eval_batch_size} is not divisible "
                  f"by the world size {dist.world_size}", file=sys.stderr)
            sys.exit(2)
        rows = ld.eval_batch_size // dist.world_size
        eval_all = read_batch(ld.eval_data, ld.eval_batch_size, d.seq_len, model_cfg.vocab_size)  # (N, T+1)
        eval_ids = eval_all[dist.rank * rows:(dist.rank + 1) * rows].to(dist.device)

    step = 0
    resume_from = resolve_resume(run_dir, ck.resume)
    if resume_from is not None:
        extra = {"step": 0, "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state()}
        extra = load_train_state(resume_from / "state", model, optimizer, extra)
        step = extra["step"]
        scheduler.load_state_dict(extra["scheduler"])
        stream.load_state_dict(extra["data"])
        set_rng_state(extra["rng"])
    elif dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log = TrainLogger(run_dir, dist.is_main, t.max_steps)
    log.print(f"pico | {n_params / 1e6:.2f}M params | {resolve_strategy(t.strategy, dist.world_size, dist.device)} "
              f"x{dist.world_size} | accumulation {accum} | "
              + (f"resumed from {resume_from} at step {step}" if resume_from else f"new run in {run_dir}"))
    peak = peak_flops(dist.device)
    tokenizer = find_tokenizer(d.path)
    last_saved = step if resume_from is not None else -1
    skipped = 0

    def forward_backward(batches):
        """Forward/backward over micro-batches; the loss is the global-batch mean token cross-entropy."""
        total = torch.zeros((), device=dist.device)
        for i, (inputs, labels) in enumerate(batches):
            with gradient_sync(model, i == len(batches) - 1), autocast(t.precision, dist.device, model):
                logits = model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()) / len(batches)
            loss.backward()
            total += loss.detach()
        return all_reduce_sum(total) / dist.world_size

    def captured(batches, input_ids):
        """forward_backward under capture: (loss, learning dynamics of this split)."""
        with capture(model, ld.layers, ld.positions) as cap:
            loss = forward_backward(batches)
            gradients = cap.gradients()
        return loss, {"activations": cap.activations(), "gradients": gradients, "input_ids": input_ids}

    def evaluate(step):
        """Perplexity of W_step on the eval set, sharded over ranks; logged and returned for eval.json."""
        batches = iter_eval_batches(cfg.evaluation.data, d.seq_len, cfg.evaluation.batch_size, dist.rank,
                                    dist.world_size, cfg.evaluation.max_batches, model_cfg.vocab_size)
        result = perplexity(model, batches, dist.device, t.precision)
        log.scalars(step, {"eval/perplexity": result["perplexity"], "eval/loss": result["loss"]})
        log.print(f"eval  {step:>6} | loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}")
        return {"step": step, "perplexity": result}

    def checkpoint(step, state, dynamics, evals):
        """Write step_<step>: train state (as it was before this step's batch), HF model, dynamics, evals."""
        with checkpoint_writer(run_dir, step, dist.is_main) as path:
            save_train_state(path / "state", model, optimizer, state)
            export_model(path / "model", model, model_cfg, tokenizer, dist.is_main)
            for split, tensors in dynamics.items():
                write_learning_dynamics(path / "learning_dynamics", split, tensors, step=step, positions=ld.positions,
                                        dtype=ld.dtype, world_size=dist.world_size)
                if dist.is_main:
                    log.scalars(step, dynamics_scalars(tensors, ld.metrics, split))
            if evals is not None and dist.is_main:
                (path / "eval.json").write_text(json.dumps(evals, indent=2))

    while True:
        # The weights are W_step here. A checkpoint step captures the eval split now and the train split on
        # the real forward/backward of update step+1, then saves all of it before that update is applied.
        save_now = step != last_saved and (step % ck.save_every == 0 or step == t.max_steps)
        if step == t.max_steps and not save_now:
            break
        capture_now = save_now and ld.enabled
        # Everything measured on W_step runs before the training batch's forward/backward.
        t_ckpt = time.perf_counter()
        evals = evaluate(step) if save_now and cfg.evaluation.data else None
        dynamics = {}
        if capture_now and eval_ids is not None:  # its gradients are kept apart from the training ones
            optimizer.zero_grad(set_to_none=True)
            _, dynamics["eval"] = captured([(eval_ids[:, :-1], eval_ids[:, 1:])], eval_all)
        optimizer.zero_grad(set_to_none=True)
        t_ckpt = time.perf_counter() - t_ckpt
        state = {"step": step, "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state()}
        t0 = time.perf_counter()
        final = step == t.max_steps  # past it, only the train split needs the batch update step+1 would use
        batches = None
        if not final or (capture_now and (d.wrap or (step + 1) * d.batch_size <= stream.num_samples)):
            batches = [next(stream) for _ in range(accum)]
        if batches and capture_now:
            ids = gather_rows(torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])).cpu()  # (B, T+1)
            loss, dynamics["train"] = captured(batches, ids)
        elif batches and not final:
            loss = forward_backward(batches)
        if dynamics:  # the weights W_step go with the train split (the eval one when there is no batch left)
            (dynamics.get("train") or dynamics["eval"])["weights"] = capture_weights(model, ld.layers)
        if save_now:
            t_save = time.perf_counter()
            checkpoint(step, state, dynamics, evals)
            last_saved, t_save = step, time.perf_counter() - t_save
            # Blocking cost of the checkpoint step: evals and eval split on W_step, then writing it all.
            log.scalars(step, {"checkpoint/seconds": t_ckpt + t_save})
            log.print(f"saved  {step:>6} | step_{step} in {t_ckpt + t_save:.1f}s")
            t0 += t_save  # tokens/s counts training time only
        if final:
            break

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
        else:  # the update is dropped; the step (and its batch) still counts
            skipped += 1
            log.scalars(step, {"train/nonfinite_steps": skipped})
            log.print(f"step {step + 1}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}: "
                      + ("update skipped" if t.nan_policy == "skip" else "stopping"))
            if t.nan_policy == "stop":
                if step != last_saved:
                    checkpoint(step, state, {}, None)
                log.close()
                cleanup()
                sys.exit(3)
        scheduler.step()
        step += 1
        if step % cfg.logging.log_every == 0 or step == t.max_steps:
            elapsed = time.perf_counter() - t0
            tokens_per_s = d.batch_size * d.seq_len / elapsed
            mfu = tokens_per_s * flops_per_token / (peak * dist.world_size) if peak else None
            lr = scheduler.get_last_lr()[0]
            log.scalars(step, {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                               "train/tokens_per_s": tokens_per_s, **({"train/mfu": mfu} if mfu else {})})
            log.train_line(step, loss.item(), lr, grad_norm.item(), tokens_per_s, mfu)
    stream.close()
    log.print(f"done: {step} steps, {skipped} skipped; checkpoints in {os.path.join(run_dir, 'checkpoints')}")
    log.close()
    cleanup()


if __name__ == "__main__":
    main()
