"""Evaluate a checkpoint on downstream tasks as lm-evaluation-harness scores them; prints a table + JSON.

    python recipes/evaluate.py --model runs/demo/checkpoints/step_300 --task blimp=data/blimp --task hellaswag
    ./torchrun.sh recipes/evaluate.py --model <step dir | HF dir | Hub id> --task paloma=data/eval --limit 100
    python recipes/evaluate.py --model hf://pico-lm/pico-decoder-tiny@pico-decoder-tiny-1 --step 100 \
        --task hellaswag    # a step of a run on the Hub (pico's or pico-train's)

Each rank holds the whole model and scores its share of the batches; rank 0 prints, writes.
Bad input exits 2 with one line `<kind>: <message>`.
"""

import argparse
import json
from pathlib import Path

import torch

from pico.distributed import cleanup, init_distributed, is_main
from pico.errors import ConfigError, exit_on
from pico.evaluation import TASKS, TaskSpec, evaluate_tasks, format_results, load_tasks
from pico.hub import fetch_model, parse_hf_uri
from pico.model import from_pretrained
from pico.run_dir import CHECKPOINTS, MODEL, STATE, list_steps, step_dir


def model_dir(model: str, step: int | None = None) -> Path:
    """The HF Llama dir of a step dir (its model/), an HF model dir, a Hub id (downloaded), or the model of
    `step` of a run's branch `hf://<repo>@<branch>` (pico's or pico-train's; docs/hub.md)."""
    if model.startswith("hf://"):
        return fetch_model(*parse_hf_uri(model), step=step)
    if step is not None:
        raise ConfigError(f"--step {step}: only with --model hf://<repo>@<branch>")
    path = Path(model).expanduser()
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    if (path / STATE).is_dir():
        raise ConfigError(
            f"--model {model}: a step dir without model/ (its run exported no HF model: a fork whose "
            "modules the Llama layout cannot express, docs/checkpoints.md)"
        )
    if (path / CHECKPOINTS).is_dir():
        raise ConfigError(f"--model {model}: a run directory; evaluate one of its steps: {step_dirs(path)}")
    if path.exists() or model.count("/") != 1:
        raise ConfigError(f"--model {model}: neither a step dir (with model/config.json) nor an HF model dir")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, auth
        raise ConfigError(
            f"--model {model}: not a local dir, and the Hub download failed ({type(e).__name__})"
        ) from e


def step_dirs(run_dir: Path) -> str:
    """The step dirs of `run_dir` holding a model/, for a message: all of them, or the first and last few."""
    dirs = [str(step_dir(run_dir, step)) for step in list_steps(run_dir, require=MODEL)]
    return ", ".join(dirs if len(dirs) <= 6 else [*dirs[:3], f"... ({len(dirs) - 5} more)", *dirs[-2:]])


def check_output(output: str) -> None:
    """Raise a ConfigError unless the JSON file `output` can be written: before any scoring, not after."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise ConfigError(f"--output {output}: a directory; name the JSON file, e.g. {path / 'eval.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {output}: no directory {path.parent}")


def task_spec(text: str, limit: int | None, batch_size: int | None) -> TaskSpec:
    """`name` or `name=path` as a TaskSpec."""
    name, _, path = text.partition("=")
    return TaskSpec(name, path or None, limit, batch_size)


@exit_on()  # bad input (the model, a task, a document): one line `<kind>: <message>`, exit 2
def main(argv=None) -> None:
    """Parse, load the model and tasks (exit 2 on bad input), evaluate, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="step dir, HF model dir, Hub id or hf://<repo>@<branch>"
    )
    parser.add_argument("--step", type=int, help="with hf://<repo>@<branch>: the step (default: the newest)")
    parser.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME[=PATH]",
        help=f"one of {', '.join(TASKS)}; PATH: jsonl/parquet file or dir (default: the Hub)",
    )
    parser.add_argument("--limit", type=int, help="first N documents of each task (BLiMP: of each paradigm)")
    parser.add_argument("--batch-size", type=int, help="rows per forward (default: 4096 tokens per batch)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"])
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.output:
        check_output(args.output)

    dist = init_distributed()
    directory = model_dir(args.model, args.step)
    model = from_pretrained(directory).to(dist.device)
    tokenizer = directory if (directory / "tokenizer.json").is_file() else None
    specs = [task_spec(t, args.limit, args.batch_size) for t in args.task]
    keys = [f"--task {t}" for t in args.task]
    tasks = load_tasks(specs, tokenizer, model.config.max_seq_len, keys=keys)
    results = evaluate_tasks(model, tasks, dist.device, precision=args.precision)
    if is_main():
        print(f"model {directory} | max_seq_len {model.config.max_seq_len} | ranks {dist.world_size}")
        print("\n".join(format_results(results)))
        if args.output:
            Path(args.output).expanduser().write_text(json.dumps(results, indent=2) + "\n")
    cleanup()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
