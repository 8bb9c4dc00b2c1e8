"""The test suite's pico-train writer writes what pico-train's code writes: checked here against independent
float64 recomputations and explicit index formulas, so that reader tests can trust it."""

import json
import runpy

import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import load_from_disk
from safetensors.torch import load_file

from tests.hub.standin import LocalHub
from tests.pico_train_format import (
    REMOTE_CODE_MARKER,
    module_prefix,
    reference_model,
    replay_on_hub,
    write_pico_train_run,
)

KINDS = ("activations", "weights", "gradients")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One device (uneven sub-batches of 3), two devices (even train sub-batches, padded eval), and a run
    whose max_steps (5) is not a multiple of save_every (2)."""
    root = tmp_path_factory.mktemp("pico_train")
    return {
        1: write_pico_train_run(root / "one", world_size=1, ld_batch_size=3),
        2: write_pico_train_run(root / "two", world_size=2, ld_batch_size=4),
        "odd": write_pico_train_run(root / "odd", world_size=1, max_steps=5),
    }


def load(run, step, name):
    return torch.load(run.dynamics_dir(step) / name, weights_only=True)


def unprefixed(tensors: dict, world_size: int) -> dict:
    prefix = module_prefix(world_size)
    assert all(k.startswith(prefix) for k in tensors), sorted(tensors)
    return {k[len(prefix) :]: v for k, v in tensors.items()}


def true_outputs(run, step, rows, position=-1) -> dict:
    """Every Linear's output at `position` for `rows`, W_N, one float64 forward: what a hook should store."""
    model = reference_model(run.config["model"], {k: v.double() for k, v in run.states[step].items()})
    outs = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o[:, position]))
    model(rows[:, :-1])
    return outs


def split_grads(run, step, rows, shards) -> dict:
    """Σ over sub-batches k of the mean over ranks of ∇ mean CE of rows shards[k][r], float64."""
    model = reference_model(run.config["model"], {k: v.double() for k, v in run.states[step].items()})
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for sub_batch in shards:
        for ranks_rows in sub_batch:
            model.zero_grad()
            ids = rows[ranks_rows]
            F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:]).backward()
            for n, p in model.named_parameters():
                total[n] += p.grad / len(sub_batch)
    return {n.removesuffix(".weight"): g for n, g in total.items()}


def test_each_step_holds_what_the_trainer_writes_and_the_final_step_val_only(runs):
    for key in (1, 2):
        run = runs[key]
        for step in (0, 2):
            names = {p.name for p in run.dynamics_dir(step).iterdir()}
            assert names == {f"{s}_{k}.pt" for s in ("train", "val") for k in KINDS} | {"train_data"}
        assert {p.name for p in run.dynamics_dir(4).iterdir()} == {f"val_{k}.pt" for k in KINDS}
        assert not list(run.path.rglob("val_data"))
        config = json.loads((run.step_dir(4) / "config.json").read_text())
        assert config["model_type"] == "pico_decoder" and config["auto_map"]["AutoModelForCausalLM"]
        assert all(k.startswith("pico_decoder.") for k in load_file(run.step_dir(4) / "model.safetensors"))
        assert (run.path / "checkpoints" / "latest").resolve() == run.step_dir(4).resolve()
        assert sorted(p.name for p in (run.path / "eval_results").iterdir()) == [
            "step_0.json",
            "step_2.json",
            "step_4.json",
        ]
        saved = yaml.safe_load((run.path / "training_config.yaml").read_text())
        assert saved["training"]["fabric"]["num_devices"] * saved["training"]["fabric"]["num_nodes"] == key
        assert saved["checkpointing"]["learning_dynamics"]["sequence_idx"] == -1
    odd = runs["odd"]  # max_steps 5, save_every 2: steps 0, 2, 4 in the loop, then 5: val and the model
    assert {p.name for p in odd.dynamics_dir(4).iterdir()} >= {"train_weights.pt", "val_weights.pt"}
    assert {p.name for p in odd.dynamics_dir(5).iterdir()} == {f"val_{k}.pt" for k in KINDS}
    assert (odd.step_dir(5) / "model.safetensors").is_file()


def test_weights_are_w_n_of_the_step_and_the_train_data_is_its_batch(runs):
    for key in (1, 2):
        run = runs[key]
        for step in (0, 2, 4):
            model = load_file(run.step_dir(step) / "model.safetensors")
            for split in ("train", "val") if step < 4 else ("val",):
                weights = unprefixed(load(run, step, f"{split}_weights.pt"), key)
                for name, w in weights.items():
                    torch.testing.assert_close(w, model[f"pico_decoder.{name}.weight"], rtol=0, atol=0)
        w0, w2 = (unprefixed(load(run, s, "val_weights.pt"), key) for s in (0, 2))
        assert all((w0[n] - w2[n]).abs().max() > 1e-4 for n in w0)  # training moved every module
        for step in (0, 2):
            data = load_from_disk(str(run.dynamics_dir(step) / "train_data"))
            assert torch.equal(torch.tensor(data["input_ids"]), run.train_batches[step])
            assert data["text"][0] == " ".join(f"t{i}" for i in data["input_ids"][0])


def test_several_devices_store_each_rows_module_output_in_dataset_order(runs):
    run = runs[2]
    for step, split, rows in ((0, "train", run.train_batches[0]), (2, "val", run.eval_batch)):
        stored = unprefixed(load(run, step, f"{split}_activations.pt"), 2)
        truth = true_outputs(run, step, rows)
        assert len(stored) == 6
        for name, acts in stored.items():
            assert acts.shape == (len(rows), truth[name].shape[-1])
            torch.testing.assert_close(acts.double(), truth[name], rtol=1e-5, atol=1e-6)


def test_one_device_stores_each_sub_batch_transposed_and_re_cut(runs):
    run = runs[1]  # learning_dynamics.batch_size 3: sub-batches of rows 0-2, 3-5, 6-7
    rows = run.train_batches[0]
    stored = unprefixed(load(run, 0, "train_activations.pt"), 1)
    truth = true_outputs(run, 0, rows)
    for name, acts in stored.items():
        assert (acts.double() - truth[name]).abs().max() > 0.05  # not the module's outputs
        for start in (0, 3, 6):
            true, got = truth[name][start : start + 3], acts[start : start + 3].double()
            b, out = true.shape
            for i in range(b):
                for j in range(out):
                    flat = i * out + j  # element (i, j) of the re-cut is element flat of the transpose
                    assert got[i, j] == pytest.approx(true[flat % b, flat // b].item(), abs=1e-6)


def test_gradients_sum_sub_batch_means_averaged_over_ranks(runs):
    two, one = runs[2], runs[1]
    rows = two.train_batches[0]  # 8 rows, 2 ranks (rows r, r+2, ...), sub-batches of 2 per rank: K = 2
    shards = [[[0, 2], [1, 3]], [[4, 6], [5, 7]]]
    stored = unprefixed(load(two, 0, "train_gradients.pt"), 2)
    expected = split_grads(two, 0, rows, shards)
    batch_mean = split_grads(two, 0, rows, [[list(range(8))]])
    for name, g in stored.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.double(), 2 * batch_mean[name], rtol=1e-4, atol=1e-6)  # even: K × mean
    # eval: 5 rows padded to 6 by wrapping (rank 1 reads row 0 again), per rank 3 rows: sub-batches 2 and 1
    shards = [[[0, 2], [1, 3]], [[4], [0]]]
    stored = unprefixed(load(two, 0, "val_gradients.pt"), 2)
    expected = split_grads(two, 0, two.eval_batch, shards)
    batch_mean = split_grads(two, 0, two.eval_batch, [[list(range(5))]])
    for name, g in stored.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-4, atol=1e-6)
        assert (g.double() - 2 * batch_mean[name]).norm() > 1e-3 * g.norm()  # uneven: not K × mean
    shards = [[[0, 1, 2]], [[3, 4, 5]], [[6, 7]]]  # one device: plain sum of the three sub-batch means
    stored = unprefixed(load(one, 2, "train_gradients.pt"), 1)
    expected = split_grads(one, 2, one.train_batches[2], shards)
    for name, g in stored.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-4, atol=1e-6)


def test_substring_suffixes_and_sequence_idx(tmp_path):
    run = write_pico_train_run(
        tmp_path, world_size=2, max_steps=2, ld_batch_size=4, suffixes=["embedding_proj"], sequence_idx=0
    )
    stored = load(run, 0, "train_activations.pt")
    assert sorted(stored) == [
        "_forward_module.module.de_embedding_proj",
        "_forward_module.module.embedding_proj",
    ]
    assert sorted(load(run, 0, "train_gradients.pt")) == sorted(stored)
    truth = true_outputs(run, 0, run.train_batches[0], position=0)
    for name, acts in unprefixed(stored, 2).items():
        torch.testing.assert_close(acts.double(), truth[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2])
def test_bf16_mixed_dtypes(tmp_path, world_size):
    run = write_pico_train_run(
        tmp_path, world_size=world_size, max_steps=2, ld_batch_size=4, precision="bf16-mixed"
    )
    acts, weights, grads = (load(run, 0, f"train_{k}.pt") for k in KINDS)
    assert {t.dtype for t in acts.values()} == {
        torch.bfloat16
    }  # autocast (1 device), a bf16 module (DeepSpeed)
    assert {t.dtype for t in grads.values()} == {torch.float32}
    assert {t.dtype for t in weights.values()} == {torch.float32 if world_size == 1 else torch.bfloat16}
    model = load_file(run.step_dir(0) / "model.safetensors")
    assert {t.dtype for t in model.values()} == {torch.float32}
    for name, w in unprefixed(weights, world_size).items():
        assert torch.equal(model[f"pico_decoder.{name}.weight"], w.float())


def test_paloma_number_is_the_mean_of_per_document_perplexities(runs):
    run = runs[1]
    model = reference_model(run.config["model"], {k: v.double() for k, v in run.states[2].items()})
    ppls = []
    for i, row in enumerate(run.eval_batch):
        ids = row[: 3 + i]  # the writer's documents
        nll = -model(ids[None, :-1])[0].log_softmax(-1).gather(-1, ids[1:, None]).mean()
        ppls.append(nll.exp().item())
    saved = json.loads((run.path / "eval_results" / "step_2.json").read_text())
    assert saved == {"paloma": pytest.approx(sum(ppls) / len(ppls), rel=1e-5)}


def test_remote_code_file_marks_and_refuses_being_run(runs):
    path = runs[1].step_dir(0) / "pico_decoder.py"
    assert not (path.parent / REMOTE_CODE_MARKER).exists()
    with pytest.raises(RuntimeError, match="remote code was run"):
        runpy.run_path(str(path))
    assert (path.parent / REMOTE_CODE_MARKER).exists()
    (path.parent / REMOTE_CODE_MARKER).unlink()


def titles(hub, repo, branch):
    return [c.title for c in reversed(hub.list_commits(repo, branch))]


def test_hub_replay_one_commit_per_split_per_step_never_deleting(runs, tmp_path):
    hub, repo = LocalHub(tmp_path / "standin"), "pico-lm/pico-decoder-test"
    hub.set_faults()
    run = runs[2]
    replay_on_hub(hub, run, repo)

    def step(n, train=True):
        ld = "Saving Learning Dynamics Data"
        model = [f"Saving {t} -- Step {n}" for t in ("HF Model", "Fabric Checkpoint", "Evaluation Results")]
        return model, [f"{ld} (train) -- Step {n}"] * train + [f"{ld} (val) -- Step {n}"]

    (m0, ld0), (m2, ld2), (m4, ld4) = step(0), step(2), step(4, train=False)
    first = [m0[0], "Saving Tokenizer -- Step 0", "Saving Training Config -- Step 0", *m0[1:]]
    assert titles(hub, repo, run.run_name) == ["initial commit", *first, *ld0, *m2, *ld2, *m4, *ld4]
    stored = hub.repo(repo)
    history = {c["title"]: c["files"] for c in stored["commits"].values()}
    commit = stored["branches"][run.run_name]
    while stored["commits"][commit]["parent"] is not None:  # never a file deleted
        parent = stored["commits"][commit]["parent"]
        assert set(stored["commits"][parent]["files"]) <= set(stored["commits"][commit]["files"])
        commit = parent
    final = history["Saving Learning Dynamics Data (val) -- Step 4"]
    step2_train = history["Saving Learning Dynamics Data (train) -- Step 2"]
    assert (
        final["learning_dynamics/train_activations.pt"]
        == step2_train["learning_dynamics/train_activations.pt"]
    )
    train2 = history["Saving Learning Dynamics Data (train) -- Step 2"]
    val0 = history["Saving Learning Dynamics Data (val) -- Step 0"]
    assert train2["learning_dynamics/val_gradients.pt"] == val0["learning_dynamics/val_gradients.pt"]
    odd = runs["odd"]  # max_steps 5: the final val commit comes before the step's model commit
    replay_on_hub(hub, odd, "pico-lm/odd")
    assert titles(hub, "pico-lm/odd", odd.run_name)[-4:] == [
        "Saving Learning Dynamics Data (val) -- Step 5",
        "Saving HF Model -- Step 5",
        "Saving Fabric Checkpoint -- Step 5",
        "Saving Evaluation Results -- Step 5",
    ]
