"""Evaluation tasks in the pretraining recipe: one config entry, run at every checkpoint, checked first."""

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.data.demo import train_tokenizer
from tests.recipes.common import launch
from tests.tiny import tiny_run, write_shards

VERBS = ("walks", "sings", "reads", "sleeps")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random shards with a tokenizer.json beside them, and BLiMP pairs in the dataset's own schema."""
    root = tmp_path_factory.mktemp("tasks")
    train = write_shards(root / "train", 64, seed=1)
    sentences = [f"The {who} {verb} today." for who in ("cat", "dog", "bird") for verb in VERBS]
    train_tokenizer(sentences, 300).save(str(train / "tokenizer.json"))
    pairs = [
        {
            "sentence_good": s,
            "sentence_bad": s.replace("s today", " today"),
            "field": "syntax",
            "linguistics_term": "agreement",
            "UID": "regular_plural_subject_verb_agreement_1",
            "pair_id": i,
        }
        for i, s in enumerate(sentences)
    ]
    blimp = root / "blimp.jsonl"
    blimp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return train, blimp


def args(data, run_dir, *extra):
    """A tiny run whose model knows the tokenizer's 320 ids."""
    train, _ = data
    extra = ("model.vocab_size=320", "learning_dynamics.enabled=false", *extra)
    return tiny_run(train, run_dir, *extra, steps=2, micro_batch_size=4, save_every=1)


def test_tasks_run_at_every_checkpoint(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(args(data, run_dir, f"evaluation.tasks=[{{name: blimp, path: {data[1]}}}]"))
    assert "blimp" in proc.stdout
    for step in (0, 1, 2):
        result = json.loads((run_dir / "checkpoints" / f"step_{step}" / "eval.json").read_text())
        assert result["step"] == step and result["blimp"]["n"] == 12
        assert 0 <= result["blimp"]["acc"] <= 1
        assert set(result["blimp"]["subsets"]) == {"regular_plural_subject_verb_agreement_1"}
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/blimp/acc")] == [0, 1, 2]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{name: blimp, path: MISSING}", "evaluation error: blimp"),
        ("[blimpp]", "config error: evaluation.tasks[0]: unknown task 'blimpp'"),
    ],
)
def test_bad_task_fails_before_step_0(data, tmp_path, entry, message):
    missing = tmp_path / "nothing.jsonl"
    proc = launch(
        args(data, tmp_path / "run", f"evaluation.tasks={entry.replace('MISSING', str(missing))}"),
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_without_tokenizer_a_text_task_is_refused(data, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(data[0], train, ignore=shutil.ignore_patterns("tokenizer.json"))
    extra = [f"data.path={train}", f"evaluation.tasks=[{{name: blimp, path: {data[1]}}}]"]
    proc = launch(args(data, tmp_path / "run", *extra), check=False)
    assert proc.returncode == 2 and "need a tokenizer" in proc.stderr.strip().splitlines()[-1]
