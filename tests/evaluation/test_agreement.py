"""pico's tasks against lm-evaluation-harness's own task definitions on the same files and model."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pico.evaluation import TaskSpec, evaluate_tasks, load_tasks, score_requests
from pico.model import from_pretrained
from tests.evaluation.conftest import SEQ_LEN

lm_eval = pytest.importorskip("lm_eval")
TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
from lm_eval.api.metrics import mean_stderr, unweighted_mean_stderr  # noqa: E402  (after the import skip)

CHOICE_TASKS = ["blimp", "hellaswag", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]
# harness task name -> (its YAML, the split key it evaluates, that split's name, file in the workspace)
HARNESS = {
    "h_blimp_a": ("blimp/_template_yaml", "validation_split", "train", "blimp_a"),
    "h_blimp_b": ("blimp/_template_yaml", "validation_split", "train", "blimp_b"),
    "h_hellaswag": ("hellaswag/hellaswag.yaml", "validation_split", "validation", "hellaswag"),
    "h_arc_easy": ("arc/arc_easy.yaml", "test_split", "test", "arc_easy"),
    "h_arc_challenge": ("arc/arc_challenge.yaml", "test_split", "test", "arc_challenge"),
    "h_truthfulqa_mc1": (
        "truthfulqa/truthfulqa_mc1.yaml",
        "validation_split",
        "validation",
        "truthfulqa_mc1",
    ),
    "h_truthfulqa_mc2": (
        "truthfulqa/truthfulqa_mc2.yaml",
        "validation_split",
        "validation",
        "truthfulqa_mc2",
    ),
}


@pytest.fixture(scope="module")
def harness(workspace, tmp_path_factory) -> dict:
    """{harness task: (aggregate results, samples by doc_id)} from HFLM on the exported model, CPU, fp32."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = tmp_path_factory.mktemp("harness_tasks")
    for name, (yaml, split_key, split, key) in HARNESS.items():
        file = workspace["files"][key]
        splits = {k: "null" for k in ("training_split", "validation_split", "test_split")} | {
            split_key: split
        }
        (include / f"{name}.yaml").write_text(
            f"include: {TASKS_DIR / yaml}\ntask: {name}\ntag: []\n"
            f"dataset_path: {'parquet' if file.suffix == '.parquet' else 'json'}\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {file}\n"
            + "".join(f"{k}: {v}\n" for k, v in splits.items())
        )
    model = HFLM(pretrained=str(workspace["model_dir"]), device="cpu", dtype="float32", batch_size=16)
    out = simple_evaluate(
        model=model,
        tasks=list(HARNESS),
        log_samples=True,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
    )
    return {
        name: (out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"]))
        for name in HARNESS
    }


@pytest.fixture(scope="module")
def pico(workspace) -> dict:
    """{task: (loaded task, per-request log-likelihoods, metrics)} from pico on the same files."""
    files, model_dir = workspace["files"], workspace["model_dir"]
    tasks = load_tasks(
        [TaskSpec(name, str(files[name]), batch_size=7) for name in CHOICE_TASKS], model_dir, SEQ_LEN
    )
    model = from_pretrained(model_dir)
    results = evaluate_tasks(model, tasks, torch.device("cpu"))
    return {
        t.name: (t, score_requests(model, t.requests, torch.device("cpu"), SEQ_LEN), results[t.name])
        for t in tasks
    }


def harness_requests(samples: list[dict]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The (context, continuation) strings and log-likelihoods of every request, document by document."""
    args = [tuple(a) for s in samples for a in s["arguments"]]
    lls = np.array([r[0][0] for s in samples for r in s["resps"]])
    return args, lls


@pytest.mark.parametrize(
    "task, harness_tasks",
    [
        ("blimp", ["h_blimp_a", "h_blimp_b"]),
        ("hellaswag", ["h_hellaswag"]),
        ("arc_easy", ["h_arc_easy"]),
        ("arc_challenge", ["h_arc_challenge"]),
        ("truthfulqa_mc1", ["h_truthfulqa_mc1"]),
        ("truthfulqa_mc2", ["h_truthfulqa_mc2"]),
    ],
)
def test_same_requests_and_loglikelihoods_as_the_harness(pico, harness, task, harness_tasks):
    loaded, lls, _ = pico[task]
    args, reference = [], []
    for name in harness_tasks:
        a, r = harness_requests(harness[name][1])
        args, reference = args + a, reference + list(r)
    ours = [(item.context, " " + choice) for item in loaded.items for choice in item.choices]
    assert ours == args
    assert len(lls) == len(reference) > 0
    np.testing.assert_allclose(lls.numpy(), np.array(reference), rtol=0, atol=1e-4)


@pytest.mark.parametrize("task", ["hellaswag", "arc_easy", "arc_challenge"])
def test_acc_and_acc_norm_equal_the_harness(pico, harness, task):
    ours, theirs = pico[task][2], harness[f"h_{task}"][0]
    assert ours["n"] == len(harness[f"h_{task}"][1])
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-12)
    assert ours["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"], rel=1e-12)
    assert (
        ours["acc"] != ours["acc_norm"] or task != "hellaswag"
    )  # the length normalisation decides some docs


def test_truthfulqa_mc1_and_mc2_equal_the_harness(pico, harness):
    assert pico["truthfulqa_mc1"][2]["mc1"] == harness["h_truthfulqa_mc1"][0]["acc,none"]
    assert pico["truthfulqa_mc2"][2]["mc2"] == pytest.approx(
        harness["h_truthfulqa_mc2"][0]["acc,none"], abs=1e-6
    )
    assert 0 < pico["truthfulqa_mc2"][2]["mc2"] < 1
    theirs = {name: harness[f"h_truthfulqa_{name}"][0]["acc_stderr,none"] for name in ("mc1", "mc2")}
    assert pico["truthfulqa_mc1"][2]["mc1_stderr"] == pytest.approx(theirs["mc1"], rel=1e-12)
    assert pico["truthfulqa_mc2"][2]["mc2_stderr"] == pytest.approx(theirs["mc2"], abs=1e-6)  # as mc2


def test_blimp_per_paradigm_field_and_overall_equal_the_harness(pico, harness):
    result = pico["blimp"][2]
    per_uid = {"invented_agreement": "h_blimp_a", "invented_agreement_2": "h_blimp_b"}
    for uid, name in per_uid.items():
        assert result["subsets"][uid]["acc"] == harness[name][0]["acc,none"]
        assert result["subsets"][uid]["n"] == len(harness[name][1])
    assert result["fields"]["morphology"]["acc"] == result["subsets"]["invented_agreement"]["acc"]
    # the harness's blimp group: unweighted mean over paradigms
    assert result["acc"] == pytest.approx(
        np.mean([harness[n][0]["acc,none"] for n in per_uid.values()]), abs=1e-12
    )
    assert result["n"] == 24
    for uid, name in per_uid.items():
        assert result["subsets"][uid]["acc_stderr"] == pytest.approx(
            harness[name][0]["acc_stderr,none"], rel=1e-12
        )
    # the harness's group stderr of an unweighted mean (lm_eval.api.group, weight_by_size false)
    group = unweighted_mean_stderr([harness[n][0]["acc_stderr,none"] for n in per_uid.values()])
    assert result["acc_stderr"] == pytest.approx(group, rel=1e-12)


@pytest.mark.parametrize("task", CHOICE_TASKS)
def test_stderr_is_the_harness_mean_stderr_of_the_per_document_values(pico, task):
    """Each stderr against lm_eval.api.metrics.mean_stderr on the per-document values, recomputed from the
    requests' log-likelihoods."""
    loaded, lls, result = pico[task]
    per_doc = np.split(lls.numpy(), np.cumsum([len(item.choices) for item in loaded.items])[:-1])
    correct = [float(np.argmax(ll) == item.gold) for ll, item in zip(per_doc, loaded.items)]
    if task == "truthfulqa_mc2":
        p = [np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum() for ll in per_doc]
        mass = [float(q[np.array(item.labels) == 1].sum()) for q, item in zip(p, loaded.items)]
        assert result["mc2_stderr"] == pytest.approx(mean_stderr(mass), rel=1e-12)
    elif task == "truthfulqa_mc1":
        assert result["mc1_stderr"] == pytest.approx(mean_stderr(correct), rel=1e-12)
    elif task == "blimp":
        for uid, sub in result["subsets"].items():
            kept = [c for c, item in zip(correct, loaded.items) if item.subset == uid]
            assert sub["acc_stderr"] == pytest.approx(mean_stderr(kept), rel=1e-12)
    else:
        lengths = [np.array([len(c) for c in item.choices], dtype=float) for item in loaded.items]
        normed = [
            float(np.argmax(ll / n) == item.gold) for ll, n, item in zip(per_doc, lengths, loaded.items)
        ]
        assert result["acc_stderr"] == pytest.approx(mean_stderr(correct), rel=1e-12)
        assert result["acc_norm_stderr"] == pytest.approx(mean_stderr(normed), rel=1e-12)
        assert 0 < result["acc_stderr"] < 0.5


def test_context_is_truncated_from_the_left_like_the_harness(pico):
    task = pico["truthfulqa_mc1"][0]
    assert all(len(c) + len(x) > SEQ_LEN + 1 for c, x in task.requests)  # the primer alone exceeds seq_len
