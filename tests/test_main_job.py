"""The README's main job (recipes/demo.sh), end to end on the real demo corpus, shortened by overrides."""

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_job_end_to_end(tmp_path, tarball):
    run_dir = tmp_path / "run"
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    shutil.copy(tarball, tmp_path / "cache" / "downloads")  # the demo's own download, done once per session
    env = {
        **os.environ,
        "PICO_CACHE": str(tmp_path / "cache"),
        "RUN_DIR": str(run_dir),
        "NPROC_PER_NODE": "2",
    }
    overrides = [
        "training.max_steps=4",
        "checkpointing.save_every=2",
        "data.batch_size=8",
        "data.micro_batch_size=2",
        "learning_dynamics.eval_batch_size=8",
        "evaluation.max_batches=1",
        "logging.log_every=1",
    ]
    proc = subprocess.run(
        ["bash", "recipes/demo.sh", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "held-out loss at step_4" in out and "unigram entropy of the held-out text" in out
    assert f"tensorboard --logdir {run_dir}" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    model_dir = run_dir / "checkpoints" / "step_4" / "model"
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert tokenizer.eos_token == "<|endoftext|>" and config["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("ROMEO: what light")["input_ids"]) == "ROMEO: what light"
    rows = list(csv.DictReader(open(run_dir / "analysis" / "default" / "metrics.csv")))
    assert {int(r["step"]) for r in rows} == {0, 2, 4}
    assert {"per", "condition_number"} <= {r["metric"] for r in rows}
    assert list((run_dir / "analysis" / "default" / "plots").glob("*.png"))
