"""One-line errors naming task, file and row; recipes/evaluate.py: a step dir, torchrun, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pico.config import ConfigError, load_config
from pico.evaluation import TaskError, TaskSpec, evaluate_tasks, load_tasks
from pico.model import from_pretrained
from tests.evaluation.conftest import SEQ_LEN, arc_docs, hellaswag_docs, truthfulqa_docs, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def bad_files(tmp: Path) -> dict:
    """name -> (TaskSpec, the message's expected fragment) for one defect each."""
    import random

    rng = random.Random(1)
    hs, arc, tqa = hellaswag_docs(3, rng), arc_docs(3, rng), truthfulqa_docs(3, rng)
    no_column = [{k: v for k, v in d.items() if k != "endings"} if i == 2 else d for i, d in enumerate(hs)]
    one_choice = [dict(d, endings=d["endings"][:1]) if i == 1 else d for i, d in enumerate(hs)]
    bad_label = [dict(d, label="7") if i == 2 else d for i, d in enumerate(hs)]
    bad_key = [dict(d, answerKey="Z") if i == 1 else d for i, d in enumerate(arc)]
    bad_mc2 = [
        dict(d, mc2_targets={**d["mc2_targets"], "labels": [1]}) if i == 0 else d for i, d in enumerate(tqa)
    ]
    endings_text = [dict(d, endings="four endings as one string") if i == 1 else d for i, d in enumerate(hs)]
    label_bool = [dict(d, label=True) if i == 0 else d for i, d in enumerate(hs)]
    arc_text = [dict(d, choices={**d["choices"], "text": "ABC"}) if i == 2 else d for i, d in enumerate(arc)]
    mc1_two = [
        dict(d, mc1_targets={**d["mc1_targets"], "labels": [1, 1] + d["mc1_targets"]["labels"][2:]})
        if i == 1
        else d
        for i, d in enumerate(tqa)
    ]
    (tmp / "empty.jsonl").write_text("")
    (tmp / "empty_dir").mkdir()
    (tmp / "broken.jsonl").write_text(json.dumps(hs[0]) + "\n{not json\n")
    return {
        "unknown task": (TaskSpec("lambada"), "unknown task 'lambada'"),
        "missing file": (TaskSpec("hellaswag", str(tmp / "nope.jsonl")), f"hellaswag: {tmp / 'nope.jsonl'}:"),
        "empty file": (
            TaskSpec("blimp", str(tmp / "empty.jsonl")),
            f"blimp: {tmp / 'empty.jsonl'}: no documents",
        ),
        "empty dir": (TaskSpec("arc_easy", str(tmp / "empty_dir")), "arc_easy: "),
        "bad json": (
            TaskSpec("hellaswag", str(tmp / "broken.jsonl")),
            f"{tmp / 'broken.jsonl'} row 1: not a JSON",
        ),
        "missing column": (
            TaskSpec("hellaswag", str(write_jsonl(tmp / "c.jsonl", no_column))),
            f"hellaswag: {tmp / 'c.jsonl'} row 2: missing column 'endings'",
        ),
        "one choice": (
            TaskSpec("hellaswag", str(write_jsonl(tmp / "o.jsonl", one_choice))),
            f"{tmp / 'o.jsonl'} row 1: 1 choice(s), need at least two",
        ),
        "gold out of range": (
            TaskSpec("hellaswag", str(write_jsonl(tmp / "g.jsonl", bad_label))),
            f"{tmp / 'g.jsonl'} row 2: gold label '7' out of range for 4 choices",
        ),
        "answerKey not a label": (
            TaskSpec("arc_challenge", str(write_jsonl(tmp / "k.jsonl", bad_key))),
            f"arc_challenge: {tmp / 'k.jsonl'} row 1: gold label 'Z' out of range",
        ),
        "mc2 labels": (
            TaskSpec("truthfulqa_mc2", str(write_jsonl(tmp / "t.jsonl", bad_mc2))),
            f"truthfulqa_mc2: {tmp / 't.jsonl'} row 0: mc2_targets.labels must be one 0/1 per choice",
        ),
        "endings a string": (
            TaskSpec("hellaswag", str(write_jsonl(tmp / "e.jsonl", endings_text))),
            f"hellaswag: {tmp / 'e.jsonl'} row 1: endings must be a list of strings, got 'four endings as",
        ),
        "label true": (
            TaskSpec("hellaswag", str(write_jsonl(tmp / "b.jsonl", label_bool))),
            f"hellaswag: {tmp / 'b.jsonl'} row 0: gold label True out of range for 4 choices",
        ),
        "choices a string": (
            TaskSpec("arc_easy", str(write_jsonl(tmp / "a.jsonl", arc_text))),
            f"arc_easy: {tmp / 'a.jsonl'} row 2: choices.text must be a list of strings, got 'ABC'",
        ),
        "mc1 two true": (
            TaskSpec("truthfulqa_mc1", str(write_jsonl(tmp / "m.jsonl", mc1_two))),
            f"truthfulqa_mc1: {tmp / 'm.jsonl'} row 1: mc1_targets.labels must be one 0/1 per choice with "
            "exactly one 1, got [1, 1",
        ),
        "paloma missing": (TaskSpec("paloma", str(tmp / "no_parquet")), "paloma: "),
        "limit zero": (TaskSpec("arc_easy", limit=0), "arc_easy: limit must be ≥ 1"),
        "twice": (TaskSpec("blimp"), "blimp: task 'blimp' is listed twice"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown task",
        "missing file",
        "empty file",
        "empty dir",
        "bad json",
        "missing column",
        "one choice",
        "gold out of range",
        "answerKey not a label",
        "mc2 labels",
        "endings a string",
        "label true",
        "choices a string",
        "mc1 two true",
        "paloma missing",
        "limit zero",
        "twice",
    ],
)
def test_bad_input_raises_one_line_naming_task_file_and_row(workspace, tmp_path, case):
    spec, fragment = bad_files(tmp_path)[case]
    specs = [spec, spec] if case == "twice" else [spec]
    with pytest.raises(TaskError) as error:
        load_tasks(specs, workspace["model_dir"], SEQ_LEN)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_mc1_gold_is_the_choice_its_labels_mark(workspace, tmp_path):
    import random

    docs = truthfulqa_docs(4, random.Random(2))
    moved = [
        dict(d, mc1_targets={**d["mc1_targets"], "labels": d["mc1_targets"]["labels"][::-1]}) for d in docs
    ]
    (task,) = load_tasks(
        [TaskSpec("truthfulqa_mc1", str(write_jsonl(tmp_path / "m.jsonl", moved)))],
        workspace["model_dir"],
        SEQ_LEN,
    )
    assert [item.gold for item in task.items] == [len(d["mc1_targets"]["choices"]) - 1 for d in docs]


def test_a_text_token_outside_the_vocabulary_names_the_document(workspace):
    spec = TaskSpec("arc_easy", str(workspace["files"]["arc_easy"]))
    with pytest.raises(
        TaskError, match=r"^arc_easy: .*arc_easy.jsonl row 0: choice 0: token id \d+ is outside"
    ):
        load_tasks([spec], workspace["model_dir"], SEQ_LEN, vocab_size=8)


def test_the_config_checks_tasks_with_the_same_check_naming_its_keys():
    cases = {
        ("evaluation.tasks=[lambada]",): "evaluation.tasks[0]: unknown task 'lambada' (known: ",
        ("evaluation.data=d", "evaluation.tasks=[paloma]"): (
            "evaluation.tasks[0]: task 'paloma' is listed twice (also evaluation.data)"
        ),
        (
            "evaluation.tasks=[blimp, {name: blimp, limit: 3}]",
        ): "evaluation.tasks[1]: task 'blimp' is listed twice",
        ("evaluation.tasks=[{name: blimp, limit: 0}]",): "evaluation.tasks[0]: limit must be ≥ 1, got 0",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as error:
            load_config(None, list(overrides))
        assert str(error.value).startswith(message), (overrides, str(error.value))


def test_hub_dataset_unreachable_is_a_clean_error(workspace, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        TaskError, match=r"^arc_easy: allenai/ai2_arc \(ARC-Easy\): .*Hub split test does not load"
    ):
        load_tasks([TaskSpec("arc_easy", limit=2)], workspace["model_dir"], SEQ_LEN)


def test_tasks_other_than_paloma_need_a_tokenizer():
    with pytest.raises(TaskError, match="^blimp, hellaswag: need a tokenizer"):
        load_tasks([TaskSpec("blimp"), TaskSpec("hellaswag")], None, SEQ_LEN)


def test_a_tokenizer_without_a_special_token_refuses_only_an_empty_context(workspace, tmp_path):
    """No BOS/EOS to condition an empty context on: no tasks and contexts load as before (a run's tokenizer
    beside its data may have none), blimp's empty contexts are one line naming the document."""
    tree = json.loads((workspace["root"] / "tokenizer.json").read_text())
    tree["added_tokens"] = [dict(token, special=False) for token in tree["added_tokens"]]
    plain = tmp_path / "tokenizer.json"
    plain.write_text(json.dumps(tree))
    assert load_tasks([], plain, SEQ_LEN) == []
    arc = [TaskSpec("arc_easy", str(workspace["files"]["arc_easy"]))]
    (task,), (same,) = load_tasks(arc, plain, SEQ_LEN), load_tasks(arc, workspace["model_dir"], SEQ_LEN)
    assert [(c.tolist(), x.tolist()) for c, x in task.requests] == [
        (c.tolist(), x.tolist()) for c, x in same.requests
    ]
    with pytest.raises(TaskError) as error:
        load_tasks([TaskSpec("blimp", str(workspace["files"]["blimp"]))], plain, SEQ_LEN)
    assert re.fullmatch(
        r"blimp: \S+ row 0: tokenizer: no BOS/EOS token to condition an empty context on", str(error.value)
    ), str(error.value)


def test_limit_takes_the_first_documents_and_blimp_limits_each_paradigm(workspace):
    files = workspace["files"]
    arc, blimp = load_tasks(
        [
            TaskSpec("arc_easy", str(files["arc_easy"]), limit=5),
            TaskSpec("blimp", str(files["blimp"]), limit=4),
        ],
        workspace["model_dir"],
        SEQ_LEN,
    )
    (full,) = load_tasks([TaskSpec("arc_easy", str(files["arc_easy"]))], workspace["model_dir"], SEQ_LEN)
    assert arc.items == full.items[:5]
    assert [i.subset for i in blimp.items] == ["invented_agreement"] * 4 + ["invented_agreement_2"] * 4


def run_recipe(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    """recipes/evaluate.py in a subprocess (2 gloo ranks under torchrun), pico from this worktree."""
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        if torchrun
        else [sys.executable]
    )
    return subprocess.run(
        [*launcher, str(REPO / "recipes" / "evaluate.py"), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def step_dir(workspace, tmp_path_factory) -> Path:
    """A run's checkpoint step dir whose model/ is the exported model."""
    step = tmp_path_factory.mktemp("run") / "checkpoints" / "step_10"
    shutil.copytree(workspace["model_dir"], step / "model")
    return step


@pytest.mark.parametrize("torchrun", [False, True], ids=["one process", "torchrun 2 ranks"])
def test_recipe_prints_a_table_and_writes_the_json(workspace, step_dir, tmp_path, torchrun):
    files, output = workspace["files"], tmp_path / "results.json"
    proc = run_recipe(
        "--model",
        str(step_dir),
        "--task",
        f"blimp={files['blimp']}",
        "--task",
        f"truthfulqa_mc2={files['truthfulqa_mc2']}",
        "--limit",
        "6",
        "--output",
        str(output),
        torchrun=torchrun,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(output.read_text())
    tasks = load_tasks(
        [
            TaskSpec("blimp", str(files["blimp"]), 6),
            TaskSpec("truthfulqa_mc2", str(files["truthfulqa_mc2"]), 6),
        ],
        workspace["model_dir"],
        SEQ_LEN,
    )
    expected = evaluate_tasks(from_pretrained(workspace["model_dir"]), tasks, torch.device("cpu"))
    assert results["blimp"]["subsets"] == expected["blimp"]["subsets"] and results["blimp"]["n"] == 12
    assert results["truthfulqa_mc2"]["mc2"] == pytest.approx(expected["truthfulqa_mc2"]["mc2"], abs=1e-12)
    assert "blimp           | acc" in proc.stdout and "truthfulqa_mc2  | mc2" in proc.stdout
    stderr = results["truthfulqa_mc2"]["mc2_stderr"]
    assert stderr == pytest.approx(expected["truthfulqa_mc2"]["mc2_stderr"], abs=1e-12) and stderr > 0
    assert f"mc2 {results['truthfulqa_mc2']['mc2']:.4f} ± {stderr:.4f} | n 6" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "lambada"], "evaluation error: --task lambada: unknown task 'lambada'"),
        (
            ["--task", "hellaswag=/nonexistent/hs.jsonl"],
            "evaluation error: hellaswag: /nonexistent/hs.jsonl: no such file or directory",
        ),
        (
            ["--task", "blimp", "--task", "blimp"],
            "evaluation error: --task blimp: task 'blimp' is listed twice",
        ),
    ],
)
def test_recipe_exits_2_with_one_line_on_bad_input(step_dir, args, message):
    proc = run_recipe("--model", str(step_dir), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_recipe_rejects_a_model_path_that_is_no_model(tmp_path):
    proc = run_recipe("--model", str(tmp_path), "--task", "blimp")
    assert (
        proc.returncode == 2
        and proc.stderr.startswith(f"config error: --model {tmp_path}: neither a step dir")
        and len(proc.stderr.strip().splitlines()) == 1
    )


def test_recipe_checks_the_output_path_before_scoring(step_dir, tmp_path):
    missing = tmp_path / "missing" / "x.json"
    for output, message in (
        (missing, f"config error: --output {missing}: no directory {missing.parent}"),
        (tmp_path, f"config error: --output {tmp_path}: a directory; name the JSON file, e.g. "),
    ):
        proc = run_recipe("--model", str(step_dir), "--task", "blimp=/nonexistent", "--output", str(output))
        lines = proc.stderr.strip().splitlines()  # the output's error, not the task's: nothing ran before
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_recipe_answers_a_run_directory_with_its_step_dirs(step_dir, tmp_path):
    run = step_dir.parents[1]
    fork_step = tmp_path / "checkpoints" / "step_4"
    (fork_step / "state").mkdir(parents=True)  # a fork's step: no model/ (docs/checkpoints.md)
    for model, message in (
        (run, f"--model {run}: a run directory; evaluate one of its steps: {step_dir}"),
        (fork_step, f"--model {fork_step}: a step dir without model/ (its run exported no HF model: a fork"),
    ):
        proc = run_recipe("--model", str(model), "--task", "blimp")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {message}")
