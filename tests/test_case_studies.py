"""recipes/case_studies.sh end to end (base, ReLoRA and MAML on the demo corpus, then the comparison),
shortened by overrides."""

import csv


def test_case_studies_end_to_end(tmp_path, run_demo_script):
    runs = tmp_path / "runs"
    run_demo_script("case_studies.sh", {"ROOT": str(runs)})
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
