"""MAML pretraining, in one process or several:

    python recipes/maml.py --config FILE [section.key=value ...]
    ./torchrun.sh recipes/maml.py --config FILE [section.key=value ...]

A fork of recipes/pretrain.py: each micro-batch is a next-token step or, with probability
`maml.hybrid_ratio`, a first-order MAML step on a subset-masked episode (recipes/maml_modules.py,
docs/case_studies.md).
"""

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a YAML config and `section.key=value` overrides."""
    layout = argparse.RawDescriptionHelpFormatter  # the docstring's usage lines as written
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=layout)
    parser.add_argument("--config", help="YAML config (defaults apply where it is silent)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and a bad command line at once, before the imports below (seconds)

# ruff: noqa: E402 (the imports follow the early parse_args)
import math
import os
import sys
import time
from pathlib import Path

import torch
from maml_modules import MamlDecoder, MamlRunConfig, maml_scalars, maml_step, mask_token_id, step_episodes
from tokenizers import Tokenizer

from pico.capture import capture_weights, check_capture, prepare_compile
from pico.checkpoint import CheckpointStep, CheckpointWriter, load_checkpoint, saved_step, train_state
from pico.checkpoint_schedule import Retention, is_checkpoint_step
from pico.config import load_config
from pico.data import TokenStream, find_tokenizer, read_batch
from pico.data.fingerprint import bind_data
from pico.distributed import cleanup, init_distributed, parallelize, resolve_strategy
from pico.errors import exit_on
from pico.evaluation import evaluate_tasks, load_tasks
from pico.hub import DRAIN_TIMEOUT, resume_source, start_uploader
from pico.logging import TrainLogger, peak_flops
from pico.model.hf import export_problem
from pico.preemption import Preemption
from pico.run_dir import checkpoints_dir
from pico.run_lock import changes_line, open_run_dir, start_run
from pico.spikes import SpikeDetector, save_spike
from pico.training import apply_update

RECIPE = os.path.basename(__file__)  # run.json records it: another recipe may not resume this run


def lr_lambda(t):
    """Linear warmup to `lr`, then linear or cosine decay to `min_lr_ratio · lr` at `max_steps`; or WSD:
    `lr` held, then a linear or 1-sqrt decay over the last `wsd_decay_steps()` steps (Hägele et al. 2024)."""

    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "wsd":  # stable until the decay's start, then through it
            decay_steps = t.wsd_decay_steps()
            progress = min(1.0, max(0, step - (t.max_steps - decay_steps)) / decay_steps)
            decay = 1 - progress if t.decay_shape == "linear" else 1 - math.sqrt(progress)
        else:
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
            decay = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return factor


def build_optimizer(model, t):
    """AdamW (fused: one kernel for all parameters); weight decay only on matrices, not on 1-D parameters;
    the attention and SwiGLU matrices in a group of their own at `block_lr_ratio · lr` when that is not 1."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scaled = t.block_lr_ratio != 1
    block = {n for n, p in named if scaled and p.ndim >= 2 and (".attention." in n or ".swiglu." in n)}
    groups = [
        {"params": [p for n, p in named if p.ndim >= 2 and n not in block], "weight_decay": t.weight_decay},
        {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    if block:  # the lr-allocation control of docs/case_studies.md
        params = [p for n, p in named if n in block]
        groups.append({"params": params, "weight_decay": t.weight_decay, "lr": t.lr * t.block_lr_ratio})
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


def build_model(model_cfg, seed, device, maml):
    """The model on the meta device, materialised and initialised from the seed (the same on every rank)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MamlDecoder(model_cfg, maml)
    model.to_empty(device=device)
    model.init_weights()
    return model


def measure(step, model, tasks, eval_batch, *, cfg, dist, log):
    """The checkpoint step's part on W_step: evaluation, then the eval split; (CheckpointStep, seconds)."""
    t, ld, start = cfg.training, cfg.learning_dynamics, time.perf_counter()
    evals = evaluate_tasks(model, tasks, dist.device, precision=t.precision, catch=True) if tasks else None
    log.evals(step, evals or {})  # a task that failed is recorded as such, and training goes on
    ckpt = CheckpointStep(step, {}, evals=evals)
    if eval_batch is not None:  # its gradients are kept apart from the training ones
        model.zero_grad(set_to_none=True)
        rows = [eval_batch.tensor_split(dist.world_size)[dist.rank].to(dist.device)]  # this rank's share
        _, _, ckpt.dynamics["eval"] = maml_step(
            model, rows, [None], t.precision, ld.layers, ld.positions, losses=True
        )
    return ckpt, time.perf_counter() - start


def finish(writer, uploader, retention, log, upload_timeout=DRAIN_TIMEOUT):
    """Wait for the last checkpoint write and the Hub uploads (up to `upload_timeout` s), delete the train
    state that retention no longer keeps, close the logs and the process group."""
    writer.complete_write()
    uploader.finish(upload_timeout)  # prints the steps it could not upload with the command that retries them
    retention.prune()  # the states that waited for their upload
    log.close()
    cleanup()


@exit_on()  # bad input, before step 0 or mid-run (a bad row of data): one line `<kind>: <message>`, exit 2
def main(argv=None):
    """Train one run as configured; exit 2 on bad input, 3 when a non-finite loss stops it, 75 when a signal
    preempts it (resumable: launch the same command)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, cls=MamlRunConfig)
    t, d, ld, ck = cfg.training, cfg.data, cfg.learning_dynamics, cfg.checkpointing
    dist, run_dir, model_cfg = init_distributed(), os.path.expanduser(ck.run_dir), cfg.model_config()

    # Build, and check against the config before step 0: the model (then parallelized), optimizer, schedule,
    # data, the fixed eval batch, and every evaluation task's documents.
    model = build_model(model_cfg, t.seed, dist.device, cfg.maml)
    flops_per_token, n_params = model.flops_per_token(d.seq_len), model.num_params()
    no_export = export_problem(model)  # a fork whose modules the Llama layout cannot express
    check_capture(model, ld, dist.world_size)
    if ld.enabled and t.compile:
        prepare_compile()  # so that capture's hooks reach the compiled blocks
    model = parallelize(
        model,
        strategy=t.strategy,
        world_size=dist.world_size,
        device=dist.device,
        precision=t.precision,
        activation_checkpointing=t.activation_checkpointing,
        compile=t.compile,
        # Meta steps leave the output layer unused, next-token steps the head (docs/case_studies.md).
        ddp_options={"find_unused_parameters": True},
    )
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    stream = TokenStream.from_config(d, dist.rank, dist.world_size, model_cfg.vocab_size, dist.device)
    eval_batch = None  # the eval split's fixed batch (N, T+1): the same sequences at every checkpoint
    if ld.enabled and ld.eval_data:
        eval_batch = read_batch(ld.eval_data, ld.eval_batch_size, d.seq_len, model_cfg.vocab_size)
    tokenizer, specs = find_tokenizer(d.path), cfg.evaluation.task_specs()
    # The mask token is an id the data never holds.
    mask = mask_token_id(cfg, Tokenizer.from_file(str(tokenizer)).get_vocab_size() if tokenizer else None)
    tasks = load_tasks(specs, tokenizer, d.seq_len, vocab_size=model_cfg.vocab_size)

    # One run per run directory: lock it, resume from the latest complete checkpoint (or the one named, also
    # on the Hub) once checked against this config, else start a new run there, from scratch or from another
    # run's step (`branch_from`: docs/checkpoints.md). A bad Hub repo or no permission fails here too.
    resume, uploader = resume_source(ck.resume, ck.hub, run_dir), start_uploader(run_dir, ck.hub)
    resume_from = open_run_dir(run_dir, cfg, dist.device, resume, recipe=RECIPE)
    branch = None if resume_from or ck.branch_from is None else Path(ck.branch_from)  # another run's step
    load_from = resume_from or branch
    first_step = saved_step(load_from) if load_from else 0
    # The run is bound to its data: a new run records it, a resumed one must find it unchanged (docs/data.md).
    data_changes = bind_data(
        run_dir, stream, eval_batch, eval_data=ld.eval_data, resume_from=resume_from, step=first_step
    )
    if load_from:
        load_checkpoint(load_from, model, optimizer, scheduler, stream, branch=bool(branch))
    changes = start_run(  # run.json, config.yaml; the settings changed from the run resumed or branched from
        run_dir, cfg, step=first_step, resumed_from=resume_from, recipe=RECIPE, branched_from=branch
    )
    log = TrainLogger(run_dir, t.max_steps)
    strategy = resolve_strategy(t.strategy, dist.world_size, dist.device)
    origin = f"resumed from {resume_from} at step {first_step}" if resume_from else f"new run in {run_dir}"
    accum = stream.accumulation_steps
    log.print(
        f"pico | {n_params / 1e6:.2f}M params | {strategy} x{dist.world_size} | accum {accum} | {origin}"
    )
    if data_changes:
        log.print(f"data.allow_changed: from step {first_step} on the data differ: {data_changes}")
    if branch:
        log.print(f"branched from {branch} at step {first_step}; changed: {changes_line(changes)}")
    if no_export:
        log.print(f"checkpoints hold no HF model/: {no_export}")
    peak, skipped = peak_flops(dist.device), 0
    sd = t.spike_detection
    spikes = SpikeDetector(sd.window, sd.threshold) if sd.enabled else None
    retention = Retention(run_dir, ck, uploader)  # checkpointing.keep_state_last / keep_state_steps
    writer = CheckpointWriter(
        run_dir,
        tokenizer=tokenizer,
        export=not no_export,
        positions=ld.positions,
        dtype=ld.dtype,
        on_published=retention.published,  # hands the step to the Hub uploader, then prunes old state/
    )
    preemption = Preemption(t.preempt_signals, t.preempt_timeout)  # from here, a signal stops at a step's end

    # The loop. The weights are W_step at the top. A checkpoint step measures W_step (evaluation and the eval
    # split), captures the train split on the real forward/backward of update step+1, and saves it all
    # before that update is applied. The step a run resumed from is saved already; a branch saves its first.
    # A preemption signal on any rank ends the loop at the next step: its checkpoint, then exit 75.
    for step in range(first_step, t.max_steps + 1):
        stop = preemption.requested()  # every rank agrees (a collective)
        due = step == first_step or is_checkpoint_step(step, ck, t.max_steps)
        saved = resume_from is not None and step == first_step
        ckpt, t_eval = None, 0.0
        if due and not saved:
            ckpt, t_eval = measure(step, model, tasks, eval_batch, cfg=cfg, dist=dist, log=log)
        optimizer.zero_grad(set_to_none=True)
        state, t0 = train_state(step, scheduler, stream), time.perf_counter()
        last = step == t.max_steps or stop  # past it, only the train split needs the batch of update step+1
        capturing = ckpt is not None and ld.enabled
        batches = stream.next_batch() if not last or (capturing and stream.has_batch(step)) else None
        if batches:  # which micro-batches are meta steps, and their episodes, from (seed, step)
            episodes = step_episodes(batches, cfg.maml, t.seed, step, dist.rank, model_cfg.vocab_size, mask)
        if batches and capturing:
            loss, stats, ckpt.dynamics["train"] = maml_step(
                model, batches, episodes, t.precision, ld.layers, ld.positions
            )
        elif batches and not last:
            loss, stats, _ = maml_step(model, batches, episodes, t.precision)
        if stop and ckpt is None and not saved:  # preempted between scheduled steps: its state and model
            ckpt = CheckpointStep(step, {})
        if ckpt is not None:  # write step_<step> in the background; the end of training waits, to log it
            ckpt.train_state, ckpt.weights = state, capture_weights(model, ld.layers) if capturing else None
            start = time.perf_counter()
            writer.complete_write()  # the previous step's write ends (published) before this one starts
            writer.save(ckpt, model, optimizer)
            if last:
                writer.complete_write()
            log.dynamics(step, ckpt.dynamics, ckpt.weights, ld.metrics)  # in-situ metrics: dynamics/*
            t_save = time.perf_counter() - start
            log.checkpoint(step, t_save, t_eval, writer.written())
            t0 += t_save  # tokens/s counts training time only
        if last:
            break
        spike = spikes.observe(loss.item()) if spikes else None
        if spike is not None:  # keep its batch and the update's learning dynamics (docs/learning_dynamics.md)
            path = save_spike(
                run_dir, step, spike, model, batches, stream, rng=state["rng"], ld=ld, precision=t.precision
            )
            log.scalars(step + 1, {"train/spike": spike.z})
            log.print(f"step {step + 1}: loss spike {spike}: its batch and learning dynamics in {path}")

        grad_norm, applied = apply_update(model, optimizer, loss, t.grad_clip)
        if not applied:  # the update is dropped; the step (and its batch) still counts
            skipped += 1
            log.scalars(step, {"train/nonfinite_steps": skipped})
            verdict = "update skipped" if t.nan_policy == "skip" else "stopping"
            log.print(
                f"step {step + 1}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}: {verdict}"
            )
            if t.nan_policy == "stop":
                if ckpt is None and not saved:
                    writer.complete_write()
                    writer.save(CheckpointStep(step, state), model, optimizer)
                finish(writer, uploader, retention, log)
                sys.exit(3)
        scheduler.step()
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == t.max_steps:
            tokens_per_s = d.batch_size * d.seq_len / (time.perf_counter() - t0)
            mfu = tokens_per_s * flops_per_token / (peak * dist.world_size) if peak else None
            log.train(step + 1, loss.item(), scheduler.get_last_lr()[0], grad_norm.item(), tokens_per_s, mfu)
            log.scalars(step + 1, maml_scalars(stats))
    stream.close()
    if stop and step < t.max_steps:
        finish(writer, uploader, retention, log, upload_timeout=preemption.time_left())
        preemption.exit(step)
    log.print(f"done: {step} steps, {skipped} skipped; checkpoints in {checkpoints_dir(run_dir)}")
    finish(writer, uploader, retention, log)


if __name__ == "__main__":
    main()
