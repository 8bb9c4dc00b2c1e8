"""recipes/case_studies.sh end to end (base, ReLoRA and MAML on the demo corpus, then the comparison),
shortened by overrides."""

import csv
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_case_studies_end_to_end(tmp_path, tarball):
    runs = tmp_path / "runs"
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    shutil.copy(tarball, tmp_path / "cache" / "downloads")  # the demo's own download, done once per session
    env = {**os.environ, "PICO_CACHE": str(tmp_path / "cache"), "ROOT": str(runs), "NPROC_PER_NODE": "2"}
    overrides = [
        "training.max_steps=4",
        "checkpointing.save_every=2",
        "data.batch_size=8",
        "data.micro_batch_size=2",
        "learning_dynamics.eval_batch_size=8",
        "evaluation.max_batches=1",
    ]
    proc = subprocess.run(
        ["bash", "recipes/case_studies.sh", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("base", "relora", "maml"):
        assert (runs / run / "checkpoints" / "latest").read_text().strip() == "step_4", run
    rows = list(csv.DictReader(open(runs / "relora" / "analysis" / "case_studies" / "metrics.csv")))
    assert {r["metric"] for r in rows} >= {"per", "condition_number"}
    assert {int(r["step"]) for r in rows} == {0, 2, 4}
    assert {r["component"] for r in rows if r["data_type"] == "gradients"} == {
        "attention.v_proj",
        "attention.o_proj",
    }
    assert any(r["data_type"] == "eval" and r["metric"] == "perplexity" for r in rows)
    plots = list((runs / "base" / "analysis" / "case_studies" / "plots" / "runs").glob("*.png"))
    assert plots, "the comparison plots, one line per run"
