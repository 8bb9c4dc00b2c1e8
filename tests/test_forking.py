"""docs/forking.md's commands, run verbatim (with OVERRIDES for a micro model), so the walkthrough
cannot rot."""

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.tiny import shards, tiny_run

ROOT = Path(__file__).resolve().parents[1]


def test_forking_walkthrough_runs(tmp_path):
    blocks = re.findall(r"^```bash\n(.*?)^```$", (ROOT / "docs" / "forking.md").read_text(), re.S | re.M)
    assert len(blocks) == 3, "fork, train, compare"
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info"))
    train, evals = shards(tmp_path, 96, 8)
    overrides = tiny_run(
        train,
        None,  # the commands name the run directories
        "training.warmup_steps=1",
        f"evaluation.data={evals}",
        "evaluation.batch_size=4",
        steps=4,
        save_every=2,
        evals=evals,
        eval_batch_size=8,
    )
    env = {**os.environ, "OVERRIDES": " ".join(overrides), "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    for block in blocks:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    fork = (repo / "recipes" / "pretrain_layernorm.py").read_text()
    assert fork.count("torch.nn.LayerNorm") == 3
    shown = re.search(
        r"^```python\n(def build_model.*?)^```$", (ROOT / "docs" / "forking.md").read_text(), re.S | re.M
    )
    assert shown[1] in fork  # the function the walkthrough shows is the one the edit produced
    from safetensors.torch import load_file  # the two variants trained different weights

    step_4 = "checkpoints/step_4"
    a = load_file(repo / "runs" / "rmsnorm" / step_4 / "learning_dynamics" / "weights.safetensors")
    b = load_file(repo / "runs" / "layernorm" / step_4 / "learning_dynamics" / "weights.safetensors")
    assert not all((a[k] == b[k]).all() for k in a)
    assert (
        repo / "runs" / "rmsnorm" / step_4 / "model"
    ).is_dir()  # the LayerNorm variant has no Llama export
    assert not (repo / "runs" / "layernorm" / step_4 / "model").exists()
    rows = list(csv.DictReader(open(repo / "runs" / "layernorm" / "analysis" / "norms" / "metrics.csv")))
    assert {r["metric"] for r in rows} == {"cka@rmsnorm"}
    assert {int(r["step"]) for r in rows} == {0, 2, 4}
    assert all(0 <= float(r["value"]) <= 1 + 1e-9 for r in rows)
    assert list((repo / "runs" / "layernorm" / "analysis" / "norms" / "plots").glob("*.png"))
    assert (repo / "runs" / "rmsnorm" / "analysis" / "default" / "metrics.csv").is_file()
