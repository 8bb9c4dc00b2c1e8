"""Learning dynamics re-captured from Hugging Face checkpoints that recorded none (docs/analysis.md,
"Checkpoint suites").

Each model, a local directory or `repo_id@revision` on the Hub, is loaded (a Llama model through
transformers, pico-train's `pico_decoder` as a PicoDecoder), run forward/backward once on a fixed eval batch
under pico.capture, and written as one step of a run directory in pico's learning-dynamics format, which
pico.analysis then reads as any run. One model is in memory at a time.

Names: a Llama model's modules are hooked under their own names (`model.layers.3.self_attn.v_proj`) and stored
under pico's (`layers.3.attention.v_proj`), translated by pico.model.hf's one table, so that one spec reads a
pico run and a Llama suite alike and the analysis puts them side by side.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pico.analysis.spec import AnalysisSpec, SpecError
from pico.capture import capture, capture_weights
from pico.components import COMPONENTS
from pico.data import DataError, build_index, read_batch, split_rows
from pico.data.shards import COLUMN
from pico.errors import AnalysisError
from pico.hub import api
from pico.hub.api import HubError, check_repo_id
from pico.learning_dynamics import SplitDynamics, write_learning_dynamics
from pico.model import PicoDecoder
from pico.model.hf import llama_config, llama_to_pico_name
from pico.model.pico_train import pico_config
from pico.run_dir import (
    CONFIG,
    DEFAULT_LAYERS,
    MODEL,
    STATE,
    checkpoints_dir,
    module_matches,
    new_step_dir,
    publish_step,
    recapture_file,
    write_atomic,
)
from pico.training import chunked_cross_entropy, train_step

MODEL_TYPES = ("llama", "pico_decoder")  # config.json's model_type: what can be re-captured
# What a revision's download holds: the config and the safetensors weights (one file or shards), nothing else.
MODEL_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_STEP_NAME = re.compile(r"step_?(\d+)")  # a revision or folder named step1000 or step_1000
_LAYER = re.compile(r"^layers\.\d+\.")


@dataclass(frozen=True)
class ModelRef:
    """One `--model`: a local directory, or a Hub repo at a revision."""

    arg: str
    repo_id: str | None = None
    revision: str | None = None


def parse_model(arg: str) -> ModelRef:
    """A local model directory, else `repo_id@revision` on the Hub; anything else is one line naming it."""
    if Path(arg).is_dir():
        return ModelRef(arg)
    repo_id, at, revision = arg.partition("@")
    if not at or not revision:
        raise AnalysisError(f"--model {arg}: no such directory, and not repo_id@revision")
    check_repo_id(repo_id)
    return ModelRef(arg, repo_id, revision)


def parse_steps(text: str | None) -> list[int] | None:
    """`--steps 0,1000,2000` as integers (None stays None)."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise AnalysisError(f"--steps {text}: expected comma-separated step numbers, e.g. 0,1000") from None


def _named_step(ref: ModelRef) -> int | None:
    """The step in the revision's (or folder path's) last part named `step<N>` or `step_<N>`, if any."""
    parts = Path(ref.revision if ref.repo_id else ref.arg).parts
    found = [int(m[1]) for part in parts if (m := _STEP_NAME.fullmatch(part))]
    return found[-1] if found else None


def model_steps(refs: list[ModelRef], steps: list[int] | None = None) -> list[int]:
    """The step of each model: `steps` (increasing, one per model), else the step every model's revision or
    path names (`step<N>`, `step_<N>`), else its position in the list."""
    if steps is not None:
        if len(steps) != len(refs):
            raise AnalysisError(f"--steps: {len(steps)} steps for {len(refs)} models")
        if steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise AnalysisError(f"--steps: {steps} are not increasing non-negative step numbers")
        return list(steps)
    named = [_named_step(ref) for ref in refs]
    if all(n is None for n in named):
        return list(range(len(refs)))
    if None in named:
        raise AnalysisError(
            f"--model {refs[named.index(None)].arg}: its name holds no step<N> or step_<N>, unlike the "
            "others; give --steps"
        )
    if len(set(named)) < len(named):
        twice = next(n for n in named if named.count(n) > 1)
        raise AnalysisError(f"--model: two models are named step {twice}; give --steps")
    return named


def spec_layers(spec: AnalysisSpec) -> tuple[str, ...]:
    """The module suffixes (pico names) to capture for `spec`: those its components name (a compound
    component's modules), plus DEFAULT_LAYERS when its top-level components are every captured module."""
    comps = list(spec.components or ()) + [c for m in spec.metrics for c in (m.components or ())]
    names = [s for c in comps for s in (COMPONENTS[c.name].modules if c.name in COMPONENTS else (c.name,))]
    return tuple(dict.fromkeys((DEFAULT_LAYERS if spec.components is None else ()) + tuple(names)))


def check_eval_only(spec: AnalysisSpec) -> None:
    """A re-captured step holds the eval split only (there is no training batch): asking for the train
    split is a SpecError."""
    for where, splits in [("splits", spec.splits)] + [
        (f"metrics[{i}].splits", m.splits) for i, m in enumerate(spec.metrics)
    ]:
        if splits and "train" in splits:
            raise SpecError(f"{where}: a re-captured model has the eval split only; use [eval]")


def fetch_model(ref: ModelRef, files: list[str] = MODEL_FILES) -> Path:
    """The folder holding `files` of the model: a local directory as it is, a Hub revision downloaded
    (through pico.hub.api, into the huggingface_hub cache)."""
    if ref.repo_id is None:
        return Path(ref.arg)
    try:
        return api.connect().download(ref.repo_id, ref.revision, files)
    except HubError as e:  # HubUnavailable stays HubUnavailable: offline, the line names the model
        raise type(e)(f"--model {ref.arg}: cannot fetch it ({e})") from None


def model_type(folder: Path, where: str) -> str:
    """config.json's `model_type`, one of MODEL_TYPES; anything else is one line naming the model."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{where}: no readable config.json ({type(e).__name__})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in MODEL_TYPES:
        raise AnalysisError(
            f"{where}: model_type {kind!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    return kind


def skeleton(folder: Path, where: str) -> nn.Module:
    """The model of `folder`'s config.json on the meta device (no weights read): its modules and limits."""
    kind = model_type(folder, where)
    try:
        with torch.device("meta"):
            if kind == "pico_decoder":
                config = json.loads((folder / "config.json").read_text())
                return PicoDecoder(pico_config(config, source=f"{where} config.json"))
            from transformers import LlamaConfig, LlamaForCausalLM

            return LlamaForCausalLM(LlamaConfig.from_pretrained(folder))
    except (OSError, ValueError) as e:  # a config.json that describes no model
        raise AnalysisError(f"{where}: {' '.join(str(e).split())[:300]}") from None


def load_model(folder: Path, where: str) -> nn.Module:
    """The model in `folder` in float32 on the CPU: Llama through transformers' LlamaForCausalLM, pico-train's
    `pico_decoder` as a PicoDecoder (its remote code is never run)."""
    kind = model_type(folder, where)
    if not any((folder / name).is_file() for name in MODEL_FILES[1:3]):
        raise AnalysisError(f"{where}: no model.safetensors (only safetensors checkpoints are read)")
    try:
        if kind == "pico_decoder":
            return PicoDecoder.from_pretrained(folder)
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar over models is ours; transformers' per file is noise
        try:
            return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError, RuntimeError) as e:  # a broken checkpoint: bad config, weights, shapes
        raise AnalysisError(f"{where}: cannot load it ({' '.join(str(e).split())[:300]})") from None


def pico_names(model: nn.Module) -> dict[str, str]:
    """{the model's own module name: pico's name} of every module with a weight and a pico counterpart:
    pico.model.hf's table (Llama -> pico) for a Llama model, the names themselves for a PicoDecoder."""
    names = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if isinstance(model, PicoDecoder):
            names[name] = name
            continue
        try:
            names[name] = llama_to_pico_name(f"{name}.weight").removesuffix(".weight")
        except KeyError:  # a module without a pico counterpart
            continue
    return names


def select_modules(model: nn.Module, layers) -> dict[str, str]:
    """{own name: pico name} of the modules whose pico names end with one of `layers` (on dot boundaries);
    a suffix that matches none is a SpecError (with the pico name, when it is one of the model's own)."""
    names = pico_names(model)
    chosen = {own: pico for own, pico in names.items() if any(module_matches(pico, s) for s in layers)}
    for suffix in layers:
        if any(module_matches(pico, suffix) for pico in chosen.values()):
            continue
        own = next((own for own in names if module_matches(own, suffix)), None)
        hint = f"; specs use pico's names: {_LAYER.sub('', names[own])!r}" if own else ""
        raise SpecError(
            f"components: no module of {type(model).__name__} is {suffix!r} in pico's names "
            f"(e.g. {next(iter(names.values()), '<none>')!r}){hint}"
        )
    return chosen


def _forward_backward(model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the batch-mean next-token loss on `rows` (N, T+1); returns the loss and the per-token
    losses (N, T) it is the mean of."""
    if isinstance(model, PicoDecoder):  # the computation of a pico run's own eval split
        per_token = []
        return train_step(model, [rows], token_losses=per_token), per_token[0]
    inputs, labels = split_rows(rows)  # (N, T) each
    head = model.lm_head
    if head._forward_hooks:  # a capture of the output layer needs its output: the logits
        logits = model(input_ids=inputs, use_cache=False).logits  # (N, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    else:  # pico's fused, chunked output layer + loss: the (N·T, V) logits never exist whole
        hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state  # (N, T, C)
        losses = chunked_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten(), "none")
    loss = losses.mean()
    loss.backward()
    return loss.detach(), losses.detach().float().view_as(labels)


@contextmanager
def _grads_of(model: nn.Module, modules: list[str]):
    """Inside the block only the weights of `modules` require gradients: backward computes no other weight's
    gradient, and holds none (a model's worth of memory); the flags are restored on exit."""
    wanted = {id(model.get_submodule(name).weight) for name in modules}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def capture_eval(model: nn.Module, rows: torch.Tensor, layers) -> tuple[float, SplitDynamics, dict]:
    """(loss, eval split, weights) of one forward/backward of the batch-mean loss on `rows` (N, T+1) under
    pico's capture of the modules `layers` names (pico suffixes); tensors keyed by pico names."""
    names = select_modules(model, layers)
    model.zero_grad(set_to_none=True)
    with _grads_of(model, list(names)), capture(model, list(names), positions="last") as cap:
        loss, losses = _forward_backward(model, rows)
        gradients = cap.gradients()  # {own name: (out, in)}
    model.zero_grad(set_to_none=True)

    def renamed(tensors: dict) -> dict:
        return {names[own]: t for own, t in tensors.items()}

    dynamics = SplitDynamics(renamed(cap.activations()), renamed(gradients), rows.cpu(), losses.cpu())
    return loss.item(), dynamics, renamed(capture_weights(model, list(names)))


def _limits(model: nn.Module) -> tuple[int, int]:
    """(vocabulary size, positions) of a PicoDecoder or a transformers model."""
    c = model.config
    return c.vocab_size, getattr(c, "max_seq_len", None) or c.max_position_embeddings


def _check_batch(model: nn.Module, rows: torch.Tensor, where: str) -> None:
    """Every eval row fits the model: no more tokens than its positions, no id outside its vocabulary."""
    vocab, positions = _limits(model)
    if rows.shape[1] - 1 > positions:
        raise AnalysisError(
            f"{where}: eval rows of {rows.shape[1] - 1} tokens exceed its {positions} positions"
        )
    if int(rows.max()) >= vocab:
        raise AnalysisError(
            f"{where}: eval data holds token id {int(rows.max())}, its vocabulary has {vocab}"
        )


def row_length(path: str) -> int:
    """Tokens per row (seq_len + 1) of pretokenized data: the length of its first row."""
    index = build_index(path)
    file, group = int(index.rg_file[0]), int(index.rg_id[0])
    try:
        with index.fs.open(index.files[file], "rb") as f:
            return len(pq.ParquetFile(f).read_row_group(group, columns=[COLUMN]).column(0)[0])
    except Exception as e:  # pyarrow's and fsspec's own errors, without the path
        raise DataError(f"{index.name(file)}: cannot read its first row ({type(e).__name__}: {e})") from None


def write_step(output: Path, step: int, dynamics: SplitDynamics, weights: dict, config: dict) -> None:
    """`<output>/checkpoints/step_<step>/`: the eval split, the weights and `model/config.json` (compound
    components read the head counts there), published atomically."""
    tmp = new_step_dir(output, step)
    write_learning_dynamics(tmp, {"eval": dynamics}, weights, step=step)
    (tmp / MODEL).mkdir()
    (tmp / MODEL / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    publish_step(checkpoints_dir(output), tmp, step)


def _check_output(output: Path) -> None:
    """`--output` is a new directory or an earlier --output: never a run whose steps it would replace."""
    if (output / CONFIG).exists() or any(checkpoints_dir(output).glob(f"step_*/{STATE}")):
        raise AnalysisError(
            f"--output {output}: a training run's directory; re-captured steps need their own"
        )
    if checkpoints_dir(output).is_dir() and not recapture_file(output).is_file():
        raise AnalysisError(
            f"--output {output}: holds checkpoints that were not re-captured; use a new directory"
        )


def _record(output: Path, rows: torch.Tensor, eval_data: str) -> dict:
    """The contents of `<output>/recapture.json`: an earlier one, whose steps must have seen the same eval
    batch, or a new one."""
    digest = hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()
    path = recapture_file(output)
    if not path.is_file():
        batch = {"eval_data": str(eval_data), "eval_batch_size": rows.shape[0], "seq_len": rows.shape[1] - 1}
        return {**batch, "eval_batch_sha256": digest, "positions": "last", "names": "pico", "steps": {}}
    record = json.loads(path.read_text())
    if record.get("eval_batch_sha256") != digest:
        raise AnalysisError(
            f"--output {output}: its steps were re-captured on another eval batch "
            f"({record.get('eval_data')}, {record.get('eval_batch_size')} rows); use another --output"
        )
    return record


def recapture(
    models,
    *,
    eval_data: str,
    output,
    eval_batch_size: int = 64,
    steps: list[int] | None = None,
    layers=DEFAULT_LAYERS,
    device="cpu",
    progress: bool = True,
) -> Path:
    """Re-capture the learning dynamics of each model (a directory or `repo_id@revision`) on the first
    `eval_batch_size` rows of `eval_data` into the run directory `output`, one step dir per model, one model
    in memory at a time; returns `output`. Bad input fails before any model runs."""
    from tqdm.auto import tqdm

    refs, output = [parse_model(str(m)) for m in models], Path(output)
    numbers = model_steps(refs, steps)
    _check_output(output)
    if eval_batch_size < 1:
        raise AnalysisError(f"--eval-batch-size {eval_batch_size}: must be at least 1")
    rows = read_batch(eval_data, eval_batch_size, row_length(eval_data) - 1)  # (N, T+1)
    record = _record(output, rows, eval_data)
    for ref in refs:  # each model is reachable, has the modules, fits the batch: checked before any runs
        where = f"--model {ref.arg}"
        shape = skeleton(fetch_model(ref, MODEL_FILES[:1]), where)
        select_modules(shape, layers)
        _check_batch(shape, rows, where)
    for ref, step in tqdm(list(zip(refs, numbers)), desc="re-capture", unit="model", disable=not progress):
        where, folder = f"--model {ref.arg}", fetch_model(ref)
        model = load_model(folder, where).to(device)
        _check_batch(model, rows, where)
        loss, dynamics, weights = capture_eval(model, rows.to(device), layers)
        is_pico = isinstance(model, PicoDecoder)
        config = llama_config(model.config) if is_pico else json.loads((folder / "config.json").read_text())
        del model  # one model in memory at a time
        write_step(output, step, dynamics, weights, config)
        record["steps"][str(step)] = {"model": ref.arg, "loss": loss}
        write_atomic(recapture_file(output), json.dumps(record, indent=2) + "\n")
    return output
