"""A finished tiny pretraining run to damage or craft copies of (tests/test_safe_loading.py,
tests/test_manifest.py): the recipe run in this process, and re-hashing a step as an attacker would."""

from pathlib import Path

from pico.manifest import hash_file, write_manifest
from tests.recipes.common import recipe_module
from tests.tiny import MODEL, SEQ, write_shards


def args(data, run_dir, *extra):
    """pretrain.py's overrides: 3 steps, checkpoints at 0 and 3 (learning dynamics and eval.json too)."""
    return [
        *MODEL,
        f"data.path={data}",
        f"data.seq_len={SEQ}",
        "data.batch_size=4",
        "data.micro_batch_size=2",
        "training.max_steps=3",
        f"checkpointing.run_dir={run_dir}",
        "checkpointing.save_every=3",
        f"learning_dynamics.eval_data={data}",
        "learning_dynamics.eval_batch_size=4",
        f"evaluation.data={data}",
        "evaluation.batch_size=4",
        *extra,
    ]


def finished_run(root: Path) -> tuple[Path, Path]:
    """(data, run dir) of a finished run under `root`."""
    data = write_shards(root / "train", 64, seed=1)
    recipe_module("pretrain").main(args(data, root / "run"))
    return data, root / "run"


def rehash(step: Path) -> None:
    """Rewrite `step`'s manifest for its files as they are now, as an attacker would."""
    files = [p for p in step.rglob("*") if p.is_file() and p.name != "manifest.json"]
    write_manifest(step, {p.relative_to(step).as_posix(): hash_file(p) for p in files})
