"""The README's main job (recipes/demo.sh), end to end on the real demo corpus, shortened by overrides."""

import csv
import json


def test_demo_job_end_to_end(tmp_path, run_demo_script):
    run_dir = tmp_path / "run"
    proc = run_demo_script("demo.sh", {"RUN_DIR": str(run_dir)})
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
