"""pico-train runs, written exactly as pico-train's trainer writes them: the ground truth pico's reader is
tested against. Written from a reading of pico-train's trainer, checkpointing and model code (and of the
Lightning, DeepSpeed and huggingface_hub calls it makes); no third-party code or data.

What a run holds (pico-train's `Trainer.train` / `_training_loop`, `save_checkpoint`,
`save_learning_dynamics_states`, `save_evaluation_results`):

    <runs_dir>/<run_name>/training_config.yaml       all six config sections, written once
    <runs_dir>/<run_name>/eval_results/step_<N>.json  {"paloma": mean of per-document perplexities}
    <runs_dir>/<run_name>/checkpoints/latest -> step_<N>
    <runs_dir>/<run_name>/checkpoints/step_<N>/       config.json (model_type pico_decoder), model.safetensors
        (keys pico_decoder.*), pico_decoder.py (remote code), tokenizer files, fabric_state/,
        learning_dynamics/{train,val}_{activations,weights,gradients}.pt and train_data/

Per checkpoint step N < max_steps: train_* then val_*, both with W_N, the train batch being the batch of
update N+1. After the loop, at the final step: val_* only. Never val_data/. Ranks are simulated in one process
(world_size 1 or 2): rank r reads what torch's DistributedSampler gives it, `all_gather` is a stack on rank 0
(Lightning's DDP/DeepSpeed `all_gather`) and the identity on one device — so one-device activations are
transposed and re-cut exactly as pico-train's hook does. Gradients are the sum over learning-dynamics
sub-batches of sub-batch-mean gradients, averaged over ranks (ZeRO-2: each backward averages, backwards add).
The training step itself is plain fp32 AdamW on the batch mean (its numerics are not pico-train's; only what
the files mean is).

Every Hub upload is recorded as a `Commit` (title + the files' bytes at that moment) in pico-train's order;
`replay_on_hub` applies them to tests/hub/standin.py's stand-in as `upload_folder` would (adds only, never
deletes; unchanged files are no-ops and a commit that changes nothing is skipped).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from datasets import Dataset, disable_progress_bars
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DistributedSampler

DEFAULT_SUFFIXES = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
EOS = "<|endoftext|>"
REMOTE_CODE_MARKER = "REMOTE_CODE_RAN"  # created next to a remote-code file if anything ever runs it
REMOTE_CODE = f'''"""Not pico-train's code: a stand-in written by pico's tests. Nothing may ever run it."""
from pathlib import Path

Path(__file__).with_name("{REMOTE_CODE_MARKER}").touch()
raise RuntimeError("the checkpoint's remote code was run: " + __file__)
'''


# --- pico-train's model, from its documented architecture --------------------------------------------------
def model_config(**overrides) -> dict:
    """A pico-train `model:` section (every ModelConfig field), tiny by default."""
    config = {
        "model_type": "pico_decoder",
        "d_model": 32,
        "n_layers": 2,
        "vocab_size": 64,
        "batch_size": 8,
        "max_seq_len": 16,
        "attention_n_heads": 4,
        "attention_n_kv_heads": 2,
        "activation_hidden_dim": 48,
        "norm_eps": 1e-6,
        "position_emb_theta": 10000.0,
    }
    return config | overrides


class RMSNorm(nn.Module):
    """x / rms(x) (in fp32, eps inside the root) times a learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """pico-train's RoPE: rotate the interleaved pairs (x[2i], x[2i+1]) of x (B, T, heads, D) by angles
    (T, D/2) — not the "rotate half" pairs (x[i], x[i+D/2]) of HF Llama and pico."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()  # (B, T, heads, D/2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (B, T, heads, D/2, 2)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.h, self.k = c["attention_n_heads"], c["attention_n_kv_heads"]
        self.d = c["d_model"] // self.h
        self.q_proj = nn.Linear(c["d_model"], self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c["d_model"], self.k * self.d, bias=False)
        self.v_proj = nn.Linear(c["d_model"], self.k * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c["d_model"], bias=False)

    def forward(self, x, angles):
        B, T, _ = x.shape
        q = rotate_pairs(self.q_proj(x).view(B, T, self.h, self.d), angles)
        k = rotate_pairs(self.k_proj(x).view(B, T, self.k, self.d), angles)
        v = self.v_proj(x).view(B, T, self.k, self.d)
        group = self.h // self.k  # query head h reads kv head h // group
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)  # (B, T, H, D)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.d)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        probs = scores.float().masked_fill(causal, float("-inf")).softmax(-1).type_as(v)
        y = torch.einsum("bhts,bshd->bthd", probs, v)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, self.h * self.d))


class SwiGLU(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.w_0 = nn.Linear(c["d_model"], c["activation_hidden_dim"], bias=False)
        self.w_1 = nn.Linear(c["d_model"], c["activation_hidden_dim"], bias=False)
        self.w_2 = nn.Linear(c["activation_hidden_dim"], c["d_model"], bias=False)

    def forward(self, x):
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = Attention(c)
        self.swiglu = SwiGLU(c)
        self.attention_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.swiglu_norm = RMSNorm(c["d_model"], c["norm_eps"])

    def forward(self, x, angles):
        h = x + self.attention(self.attention_norm(x), angles)
        return h + self.swiglu(self.swiglu_norm(h))


class ReferenceDecoder(nn.Module):
    """pico-train's PicoDecoder as its code documents it, module names included: ids (B, T) -> fp32 logits."""

    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        self.embedding_proj = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.output_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.de_embedding_proj = nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, ids):
        d = self.c["d_model"] // self.c["attention_n_heads"]
        inv_freq = self.c["position_emb_theta"] ** -(torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
        h = self.embedding_proj(ids)
        for layer in self.layers:
            h = layer(h, angles)
        return self.de_embedding_proj(self.output_norm(h)).float()


def reference_model(config: dict, state: dict[str, torch.Tensor] | None = None) -> ReferenceDecoder:
    """A ReferenceDecoder with `state` (pico-train names, any dtype: the model takes it)."""
    model = ReferenceDecoder(config)
    if state is not None:
        model.to(next(iter(state.values())).dtype).load_state_dict(state)
    return model


def write_hf_model(step_dir: Path, config: dict, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """What `PicoDecoderHF.save_pretrained` writes at a step dir's root; returns them as path → bytes."""
    hf_config = {k: v for k, v in config.items() if k != "model_type"} | {
        "architectures": ["PicoDecoderHF"],
        "auto_map": {
            "AutoConfig": "pico_decoder.PicoDecoderHFConfig",
            "AutoModelForCausalLM": "pico_decoder.PicoDecoderHF",
        },
        "model_type": "pico_decoder",
        "torch_dtype": "float32",
        "transformers_version": "4.48.0",
    }
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tensors = {f"pico_decoder.{k}": v.float().contiguous() for k, v in state.items()}
    save_file(tensors, step_dir / "model.safetensors", metadata={"format": "pt"})
    (step_dir / "pico_decoder.py").write_text(REMOTE_CODE)
    return {n: (step_dir / n).read_bytes() for n in ("config.json", "model.safetensors", "pico_decoder.py")}


# --- learning dynamics, as CheckpointStateExtractor computes them ------------------------------------------
def module_prefix(world_size: int) -> str:
    """What Lightning's wrapper puts before module names: `_forward_module.` on one device (the module
    itself), `_forward_module.module.` under DeepSpeed (the engine holds the model as `module`)."""
    return "_forward_module." if world_size == 1 else "_forward_module.module."


def rank_rows(n: int, world_size: int, rank: int) -> list[int]:
    """The dataset rows rank `rank` reads: torch's DistributedSampler (shuffle off, padded by wrapping)."""
    if world_size == 1:
        return list(range(n))
    return list(DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False))


def _forward_context(precision: str, world_size: int):
    """Lightning's precision on one device: bf16-mixed is autocast (DeepSpeed casts the module instead)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed" and world_size == 1)


def learning_dynamics(
    config: dict,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    *,
    world_size: int,
    batch_size: int,
    suffixes: list[str],
    sequence_idx: int,
    precision: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """activations, weights, gradients of `state` on `rows` (n, T+1), as pico-train stores them."""
    model = reference_model(config, state)
    prefix, b = module_prefix(world_size), batch_size // world_size
    names = {n: prefix + n for n, _ in model.named_modules() if n and any(s in prefix + n for s in suffixes)}
    params = {
        n: p for n, p in model.named_parameters() if any(s in prefix + n for s in suffixes) and "weight" in n
    }
    shards = [rank_rows(len(rows), world_size, r) for r in range(world_size)]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, out, n=n: seen[n].append(out[:, sequence_idx, :].detach()))
        for n, module in model.named_modules()
        if n in names
    ]
    acts = {n: [] for n in names}
    grads = {n: torch.zeros(p.shape) for n, p in params.items()}
    for start in range(0, len(shards[0]), b):
        seen.update({n: [] for n in names})
        for shard in shards:
            ids = rows[shard[start : start + b]]
            with _forward_context(precision, world_size):
                logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                grads[n] += g.float() / world_size  # each backward averages over ranks; backwards add
        for n in names:
            # all_gather: a stack (W, b, out) on several devices, the identity (b, out) on one; then the
            # hook's transpose(0, 1) and re-cut into rows of `out`, as pico-train does on both
            local = torch.stack(seen[n]) if world_size > 1 else seen[n][0]
            acts[n].append(local.transpose(0, 1).reshape(-1, local.shape[-1]))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    return {
        "activations": {names[n]: torch.cat(a)[: len(rows)] for n, a in acts.items()},
        "weights": {names[n]: modules[n].weight.detach().clone() for n in names},
        "gradients": {re.sub(r"\.weight", "", prefix + n): g for n, g in grads.items()},
    }


def per_document_perplexity(config: dict, state: dict[str, torch.Tensor], docs: list[list[int]]) -> float:
    """pico-train's Paloma number: the mean over documents of exp(mean NLL of tokens 2..L), L <= 2048."""
    model = reference_model(config, {k: v.float() for k, v in state.items()})
    ppls = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor(doc[:2048])[None]
            ppls.append(math.exp(F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()))
    return sum(ppls) / len(ppls)


# --- the run -------------------------------------------------------------------------------------------
@dataclass
class Commit:
    """One Hub upload: its title and every file it sends (path in the repo → bytes at that moment)."""

    title: str
    files: dict[str, bytes]


@dataclass
class PicoTrainRun:
    """A written run and the ground truth behind it."""

    path: Path  # <runs_dir>/<run_name>
    run_name: str
    world_size: int
    config: dict  # the six sections, as training_config.yaml holds them
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # W_N as stored (module dtype)
    train_batches: dict[int, torch.Tensor] = field(default_factory=dict)  # step N → the rows of update N+1
    eval_batch: torch.Tensor | None = None  # (n, T+1): the learning_dynamics.eval_data `val` split (the
    # writer does not write that dataset: tests that need it at hand write it with write_eval_data)
    commits: list[Commit] = field(default_factory=list)

    def step_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step}"

    def dynamics_dir(self, step: int) -> Path:
        return self.step_dir(step) / "learning_dynamics"


def training_config(
    *,
    run_name: str,
    model: dict,
    world_size: int,
    max_steps: int,
    save_every: int,
    batch_size: int,
    grad_accum: int,
    ld_batch_size: int,
    suffixes: list[str],
    sequence_idx: int,
    precision: str,
    eval_data: str,
) -> dict:
    """training_config.yaml: every field of pico-train's six config dataclasses."""
    return {
        "data": {
            "dataset": {"name": "pico-lm/pretokenized-dolma"},
            "dataloader": {"batch_size": batch_size},
            "tokenizer": {"name": "allenai/OLMo-7B-0724-hf", "vocab_size": model["vocab_size"]},
        },
        "model": model,
        "training": {
            "fabric": {
                "num_nodes": 1,
                "num_devices": world_size,
                "precision": precision,
                "accelerator": "cuda",
            },
            "optimization": {
                "optimizer": "adamw",
                "lr": 0.001,
                "lr_scheduler": "linear_with_warmup",
                "lr_warmup_steps": 0,
                "gradient_accumulation_steps": grad_accum,
            },
            "max_steps": max_steps,
        },
        "evaluation": {
            "metrics": ["paloma"],
            "paloma": {
                "dataset_name": "pico-lm/pretokenized-paloma-tinsy",
                "dataset_split": "val",
                "max_length": 2048,
                "batch_size": 16,
            },
        },
        "monitoring": {
            "logging": {"log_level": "INFO", "log_every_n_steps": 100},
            "save_to_wandb": False,
            "wandb": {"project": "", "entity": ""},
        },
        "checkpointing": {
            "run_name": run_name,
            "runs_dir": "runs",
            "checkpoints_dir": "checkpoints",
            "logs_dir": "logs",
            "fabric_checkpoint_dir": "fabric_state",
            "fabric_checkpoint_filename": "checkpoint.pt",
            "learning_dynamics_dir": "learning_dynamics",
            "save_every_n_steps": save_every,
            "save_to_hf": True,
            "hf_checkpoint": {"repo_id": "pico-lm/pico-decoder-test", "collection_slug": None},
            "training": {"auto_resume": True},
            "evaluation": {"eval_results_dir": "eval_results"},
            "learning_dynamics": {
                "layer_suffixes": list(suffixes),
                "sequence_idx": sequence_idx,
                "batch_size": ld_batch_size,
                "eval_data": eval_data,
            },
        },
    }


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer over `<|endoftext|>` (id 0, special), t1 … t<V-1>."""
    vocab = {EOS: 0} | {f"t{i}": i for i in range(1, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int) -> dict[str, bytes]:
    """`tokenizer.save_pretrained(folder)`: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": max_len}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}, indent=2))
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return {n: (folder / n).read_bytes() for n in names}


def _files_under(folder: Path, path_in_repo: str) -> dict[str, bytes]:
    """What `upload_folder(folder, path_in_repo)` sends: every file below `folder` now."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {f"{path_in_repo}/{p.relative_to(folder)}": p.read_bytes() for p in files}


class _Writer:
    """The trainer's side effects, in its order."""

    def __init__(self, run: PicoTrainRun, tokenizer: Tokenizer, docs: list[list[int]]):
        self.run, self.tokenizer, self.docs = run, tokenizer, docs
        self.model_cfg = run.config["model"]

    def save_checkpoint(self, step: int, state: dict, optimizer: torch.optim.Optimizer) -> None:
        run, folder = self.run, self.run.step_dir(step)
        model_files = write_hf_model(folder, self.model_cfg, state)
        tokenizer_files = write_tokenizer(self.tokenizer, folder, self.model_cfg["max_seq_len"])
        self._fabric_state(folder / "fabric_state", step, state, optimizer)
        config_path = run.path / "training_config.yaml"
        if not config_path.exists():
            config_path.write_text(yaml.dump(run.config))
        latest = run.path / "checkpoints" / "latest"
        if latest.is_symlink():
            latest.unlink()
        latest.symlink_to(f"step_{step}", target_is_directory=True)
        card = f"---\nlibrary_name: transformers\n---\n# {run.run_name}\n".encode()
        run.commits.append(Commit(f"Saving HF Model -- Step {step}", model_files | {"README.md": card}))
        if step == 0:
            run.commits.append(Commit("Saving Tokenizer -- Step 0", tokenizer_files | {"README.md": card}))
            run.commits.append(
                Commit("Saving Training Config -- Step 0", {"training_config.yaml": config_path.read_bytes()})
            )
        files = _files_under(folder / "fabric_state", "fabric_state")
        run.commits.append(Commit(f"Saving Fabric Checkpoint -- Step {step}", files))

    def _fabric_state(self, folder: Path, step: int, state: dict, optimizer) -> None:
        """Fabric's single-file checkpoint on one device; DeepSpeed's folder (stand-in contents) on more."""
        folder.mkdir(parents=True, exist_ok=True)
        client = {"_checkpoint_step": step, "_lr_scheduler": {"last_epoch": step}}
        if self.run.world_size == 1:
            rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
            rng["numpy"] = np.random.get_state()
            fabric = {"_model": state, "_optimizer": optimizer.state_dict(), **client, "_rng_states": rng}
            torch.save(fabric, folder / "checkpoint.pt")
            return
        (folder / "checkpoint").mkdir(exist_ok=True)
        (folder / "latest").write_text("checkpoint")
        (folder / "zero_to_fp32.py").write_text(REMOTE_CODE)
        torch.save({"module": state, **client}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
        bf16 = "bf16_" if self.run.config["training"]["fabric"]["precision"] == "bf16-mixed" else ""
        for rank in range(self.run.world_size):
            name = f"{bf16}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            zero = {"optimizer_state_dict": {"rank": rank}, "ds_version": "0.16.2"}
            torch.save(zero, folder / "checkpoint" / name)

    def save_evaluation(self, step: int, state: dict) -> None:
        folder = self.run.path / "eval_results"
        folder.mkdir(parents=True, exist_ok=True)
        result = {"paloma": per_document_perplexity(self.model_cfg, state, self.docs)}
        (folder / f"step_{step}.json").write_text(json.dumps(result))
        files = _files_under(folder, "eval_results")
        self.run.commits.append(Commit(f"Saving Evaluation Results -- Step {step}", files))

    def save_dynamics(self, step: int, prefix: str, rows: torch.Tensor, keep_rows: bool) -> None:
        run, ld = self.run, self.run.config["checkpointing"]["learning_dynamics"]
        states = learning_dynamics(
            self.model_cfg,
            run.states[step],
            rows,
            world_size=run.world_size,
            batch_size=ld["batch_size"],
            suffixes=ld["layer_suffixes"],
            sequence_idx=ld["sequence_idx"],
            precision=run.config["training"]["fabric"]["precision"],
        )
        folder = run.dynamics_dir(step)
        folder.mkdir(parents=True, exist_ok=True)
        for kind, tensors in states.items():
            if tensors:
                torch.save(tensors, folder / f"{prefix}_{kind}.pt")
        if keep_rows:
            ids = rows.tolist()
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
            disable_progress_bars()
            Dataset.from_dict({"input_ids": ids, "text": texts}).save_to_disk(str(folder / f"{prefix}_data"))
        title = f"Saving Learning Dynamics Data ({prefix}) -- Step {step}"
        run.commits.append(Commit(title, _files_under(folder, "learning_dynamics")))


def _update_rows(stream: torch.Tensor, update: int, world_size: int, grad_accum: int, per_rank: int):
    """The rows of update `update` (0-based) in pico-train's gathered order: per sub-batch step, rank 0's
    rows then rank 1's; rank r reads stream rows r, r+W, … (ShardedIterableDataset)."""
    rows = []
    for sub in range(update * grad_accum, (update + 1) * grad_accum):
        for rank in range(world_size):
            rows += [(j * world_size + rank) for j in range(sub * per_rank, (sub + 1) * per_rank)]
    return stream[rows]


def write_pico_train_run(
    runs_dir: Path,
    *,
    run_name: str = "pico-decoder-test-1",
    world_size: int = 1,
    max_steps: int = 4,
    save_every: int = 2,
    model: dict | None = None,
    batch_size: int = 8,
    grad_accum: int = 2,
    seq_len: int = 8,
    ld_batch_size: int = 3,
    eval_rows: int = 5,
    suffixes: list[str] | None = None,
    sequence_idx: int = -1,
    precision: str = "32-true",
    eval_data: str = "pico-lm/pretokenized-paloma-tinsy",
    seed: int = 0,
) -> PicoTrainRun:
    """Train a tiny pico_decoder for `max_steps` updates and write everything pico-train writes on the way."""
    model = model or model_config()
    config = training_config(
        run_name=run_name,
        model=model,
        world_size=world_size,
        max_steps=max_steps,
        save_every=save_every,
        batch_size=batch_size,
        grad_accum=grad_accum,
        ld_batch_size=ld_batch_size,
        suffixes=suffixes or DEFAULT_SUFFIXES,
        sequence_idx=sequence_idx,
        precision=precision,
        eval_data=eval_data,
    )
    run = PicoTrainRun(runs_dir / run_name, run_name, world_size, config)
    (run.path / "checkpoints").mkdir(parents=True)
    (run.path / "logs").mkdir()
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(1, model["vocab_size"], (max_steps * batch_size, seq_len + 1), generator=g)
    run.eval_batch = torch.randint(1, model["vocab_size"], (eval_rows, seq_len + 1), generator=g)
    docs = [r[: 3 + i].tolist() for i, r in enumerate(run.eval_batch)]  # documents of different lengths
    torch.manual_seed(seed)
    master = ReferenceDecoder(model)
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-2)
    deepspeed_bf16 = world_size > 1 and precision == "bf16-mixed"

    def stored(step: int) -> dict[str, torch.Tensor]:  # the module's weights: bf16 under DeepSpeed bf16
        state = {k: v.detach().clone() for k, v in master.state_dict().items()}
        run.states[step] = {k: v.bfloat16() for k, v in state.items()} if deepspeed_bf16 else state
        return run.states[step]

    writer = _Writer(run, word_tokenizer(model["vocab_size"]), docs)
    writer.save_checkpoint(0, stored(0), optimizer)
    writer.save_evaluation(0, run.states[0])
    step, per_rank = 0, batch_size // (world_size * grad_accum)
    while step < max_steps:
        rows = _update_rows(stream, step, world_size, grad_accum, per_rank)
        if step % save_every == 0:  # before the update: W_step, the batch of update step+1
            run.train_batches[step] = rows
            writer.save_dynamics(step, "train", rows, keep_rows=True)
            writer.save_dynamics(step, "val", run.eval_batch, keep_rows=False)
        loss = F.cross_entropy(master(rows[:, :-1]).transpose(1, 2), rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % save_every == 0:
            writer.save_checkpoint(step, stored(step), optimizer)
            writer.save_evaluation(step, run.states[step])
    if max_steps % save_every:
        stored(max_steps)
    writer.save_dynamics(max_steps, "val", run.eval_batch, keep_rows=False)  # after the loop: val only
    if max_steps % save_every:
        writer.save_checkpoint(max_steps, run.states[max_steps], optimizer)
        writer.save_evaluation(max_steps, run.states[max_steps])
    return run


def write_eval_data(folder: Path, rows: torch.Tensor) -> Path:
    """`rows` as a dataset whose `val` split `datasets.load_dataset(folder, split="val")` reads, laid out as
    `Dataset.push_to_hub` lays out pico-lm's pretokenized sets: README.md configs + data/val-*.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"input_ids": rows.tolist(), "text": [" ".join(f"t{i}" for i in r) for r in rows.tolist()]}
    )
    pq.write_table(table, folder / "data" / "val-00000-of-00001.parquet")
    configs = "configs:\n- config_name: default\n  data_files:\n  - split: val\n    path: data/val-*\n"
    (folder / "README.md").write_text(f"---\n{configs}---\n")
    return folder


def replay_on_hub(hub, run: PicoTrainRun, repo_id: str) -> None:
    """Apply the run's uploads to the stand-in, on branch `run_name` cut from main, as huggingface_hub's
    upload_folder/push_to_hub do: files are added or overwritten, never deleted; a commit whose files are all
    unchanged is skipped."""
    hub.create_repo(repo_id, private=False)
    hub.create_branch(repo_id, run.run_name)
    for commit in run.commits:
        stored = hub.repo(repo_id)
        tree = stored["commits"][stored["branches"][run.run_name]]["files"]
        changed = {p: b for p, b in commit.files.items() if tree.get(p) != hashlib.sha256(b).hexdigest()}
        if changed:
            hub.add_commit(repo_id, run.run_name, commit.title, changed)
