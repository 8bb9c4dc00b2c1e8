"""recipes/pretrain.py end to end with real processes: single, DDP, FSDP2, resume, crashes, two nodes, NaN."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.recipes.common import ROOT, launch
from tests.tiny import SEQ, STEPS, VOCAB, shards, tiny_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards(tmp_path_factory.mktemp("data"), 160, 24)


def overrides(data, run_dir, *extra):
    """The tiny run with both eval splits, in-situ metrics and the paloma task on the eval shards."""
    train, evals = data
    return tiny_run(
        train,
        run_dir,
        "training.lr=1e-3",
        "training.warmup_steps=2",
        "training.seed=3",
        "learning_dynamics.metrics=[per, norm]",
        f"evaluation.data={evals}",
        "evaluation.batch_size=4",
        *extra,
        evals=evals,
    )


def losses(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}, acc


def weights(run_dir, step=STEPS):
    return load_file(Path(run_dir) / "checkpoints" / f"step_{step}" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    launch(overrides(data, run_dir))
    return run_dir


def test_run_directory_follows_the_documented_layout(single):
    ckpts = single / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0", "step_3", "step_6"]
    assert (single / "config.yaml").is_file() and list((single / "tensorboard").iterdir())
    assert (single / "data_fingerprint.json").is_file()
    for step in (0, 3, 6):
        d = ckpts / f"step_{step}"
        assert (d / "model" / "config.json").is_file() and (d / "model" / "model.safetensors").is_file()
        assert (d / "state" / ".metadata").is_file()
        result = json.loads((d / "eval.json").read_text())
        assert result["step"] == step and result["paloma"]["tokens"] == 24 * SEQ
        for split, rows in (("train", 8), ("eval", 4)):
            with safe_open(d / "learning_dynamics" / f"{split}.safetensors", "pt") as f:
                meta = f.metadata()
                assert (meta["step"], meta["split"], meta["positions"], meta["world_size"]) == (
                    str(step),
                    split,
                    "last",
                    "1",
                )
                assert f.get_tensor("input_ids").shape == (rows, SEQ + 1)
                assert ("losses" in f.keys()) == (split == "eval")  # per-token losses: the eval split's
                assert f.get_tensor("activations.layers.0.attention.v_proj").shape == (
                    rows,
                    16,
                )  # 2 KV heads × 8
                assert f.get_tensor("activations.layers.1.swiglu.w_2").shape == (rows, 32)
                assert f.get_tensor("gradients.layers.1.swiglu.w_2").shape == (32, 64)
                assert len([k for k in f.keys() if k.startswith("gradients.")]) == 6  # 3 suffixes × 2 layers
        with safe_open(d / "learning_dynamics" / "weights.safetensors", "pt") as f:
            assert f.get_tensor("weights.layers.1.attention.o_proj").shape == (32, 32)


def test_learning_dynamics_follow_the_w_n_rule(single, data):
    """step_N's weights are W_N, its train split is the batch of update N+1 and its input_ids are
    that batch."""
    model_w = weights(single, 3)
    ld = load_file(single / "checkpoints" / "step_3" / "learning_dynamics" / "weights.safetensors")
    torch.testing.assert_close(
        ld["weights.layers.1.attention.o_proj"],
        model_w["model.layers.1.self_attn.o_proj.weight"],
        rtol=0,
        atol=0,
    )
    train = load_file(single / "checkpoints" / "step_3" / "learning_dynamics" / "train.safetensors")
    rows = np.concatenate(
        [pq.read_table(p)["input_ids"].to_pylist() for p in sorted(data[0].glob("*.parquet"))]
    )
    assert torch.equal(train["input_ids"], torch.as_tensor(rows[24:32]))  # global batch 3 = samples 24..31


def test_tensorboard_has_training_eval_and_in_situ_scalars(single):
    loss, acc = losses(single)
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(np.isfinite(list(loss.values())))
    tags = set(acc.Tags()["scalars"])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/paloma/perplexity"} <= tags
    assert "dynamics/per/train/gradients/layers.0.attention.v_proj" in tags
    assert "dynamics/norm/eval/activations/layers.1.swiglu.w_2" in tags
    assert [e.step for e in acc.Scalars("eval/paloma/perplexity")] == [0, 3, 6]


def test_exported_model_loads_in_transformers(single):
    transformers = pytest.importorskip("transformers")
    from pico.model import PicoDecoder

    path = single / "checkpoints" / f"step_{STEPS}" / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = PicoDecoder.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, data, tmp_path, strategy):
    run_dir = tmp_path / "run"
    launch(overrides(data, run_dir, f"training.strategy={strategy}"), nproc=2)
    ref, _ = losses(single)
    got, _ = losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    for name, w in weights(single).items():
        torch.testing.assert_close(weights(run_dir)[name], w, rtol=0, atol=1e-5)
    for split in ("train", "eval"):  # captured under DDP / FSDP2 equals the single-process capture
        a = load_file(single / "checkpoints" / "step_3" / "learning_dynamics" / f"{split}.safetensors")
        b = load_file(run_dir / "checkpoints" / "step_3" / "learning_dynamics" / f"{split}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_resume_is_bitwise_exact(single, data, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir)
    killed = launch(args, check=False, kill_at="3:done")
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"
    resumed = launch(args)
    assert "resumed from" in resumed.stdout
    for name, w in weights(single).items():
        assert torch.equal(weights(run_dir)[name], w), name
    for split in ("train", "eval", "weights"):
        a = load_file(single / "checkpoints" / "step_6" / "learning_dynamics" / f"{split}.safetensors")
        b = load_file(run_dir / "checkpoints" / "step_6" / "learning_dynamics" / f"{split}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), split


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_on_several_ranks_is_bitwise_exact(data, tmp_path, strategy, nproc):
    """A run killed after step_3 and resumed on as many ranks ends bitwise equal to the uninterrupted run
    on them: at 4 ranks too, where a resumed run's first update must reduce its gradients as later ones."""
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    args = overrides(data, run_dir, f"training.strategy={strategy}")
    launch(overrides(data, ref, f"training.strategy={strategy}"), nproc=nproc)
    killed = launch(args, nproc=nproc, check=False, kill_at="3:done")
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert "resumed from" in launch(args, nproc=nproc).stdout
    for name, w in weights(ref).items():
        assert torch.equal(weights(run_dir)[name], w), name
    for split in ("train", "eval", "weights"):
        a = load_file(ref / "checkpoints" / "step_6" / "learning_dynamics" / f"{split}.safetensors")
        b = load_file(run_dir / "checkpoints" / "step_6" / "learning_dynamics" / f"{split}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), split


def test_kill_while_writing_a_checkpoint_loses_nothing(single, data, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir)
    killed = launch(args, check=False, kill_at="3:writing")
    assert killed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0"  # the half-written step_3 is not named
    assert not (ckpts / "step_3").exists() and (ckpts / ".tmp_step_3" / "state").is_dir()
    launch(args)
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}" and not (ckpts / ".tmp_step_3").exists()
    for name, w in weights(single).items():
        assert torch.equal(weights(run_dir)[name], w), name


def test_kill_during_a_background_write_loses_nothing(single, data, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir)
    killed = launch(args, check=False, kill_at="3:background")
    assert killed.returncode != 0
    assert f"step      4/{STEPS}" in killed.stdout  # training went on while step_3 was being written
    assert "saved       3 | step_3: blocked " in killed.stdout and "s, eval " in killed.stdout
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0" and not (ckpts / "step_3").exists()
    resumed = launch(args)
    assert "resumed from" in resumed.stdout and "at step 0" in resumed.stdout
    for name, w in weights(single).items():
        assert torch.equal(weights(run_dir)[name], w), name


def test_checkpoint_timing_is_logged(single):
    _, acc = losses(single)
    for tag in ("checkpoint/blocking_seconds", "checkpoint/eval_seconds", "checkpoint/write_seconds"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 3, STEPS], tag
        assert all(e.value >= 0 for e in acc.Scalars(tag)), tag
    assert max(e.value for e in acc.Scalars("checkpoint/eval_seconds")) > 0  # evaluation ran


def test_resume_onto_another_world_size(single, data, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir, "training.strategy=fsdp")
    launch(args, nproc=2, check=False, kill_at="3:done")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"
    launch(args)  # one process picks up the 2-rank FSDP state
    for name, w in weights(single).items():
        torch.testing.assert_close(weights(run_dir)[name], w, rtol=0, atol=1e-5)


def test_two_node_rendezvous(single, data, tmp_path):
    from tests.distributed import free_port

    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": "pico-test",
    }
    cmd = ["./torchrun.sh", "recipes/pretrain.py", *overrides(data, run_dir)]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    for name, w in weights(single).items():
        torch.testing.assert_close(weights(run_dir)[name], w, rtol=0, atol=1e-5)


def test_capture_leaves_training_unchanged(single, data, tmp_path):
    run_dir = tmp_path / "run"
    launch(overrides(data, run_dir, "learning_dynamics.enabled=false"))
    assert not (run_dir / "checkpoints" / "step_3" / "learning_dynamics").exists()
    for name, w in weights(single).items():
        assert torch.equal(weights(run_dir)[name], w), name


@pytest.mark.parametrize(
    "extra, key",
    [
        (["training.lrr=1"], "training.lrr: unknown key"),
        (["data.micro_batch_size=3"], "data.batch_size: 8 is not a multiple of data.micro_batch_size=3"),
        (["training.precision=fp16"], "training.precision: 'fp16' is not one of"),
    ],
)
def test_bad_config_exits_2_naming_the_key(data, tmp_path, extra, key):
    proc = launch(overrides(data, tmp_path / "run", *extra), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"config error: {key}")
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_world_size_exits_2(data, tmp_path):
    proc = launch(overrides(data, tmp_path / "run", "data.micro_batch_size=8"), nproc=2, check=False)
    assert proc.returncode != 0
    assert "data.batch_size=8 must be a multiple of data.micro_batch_size=8 × world size 2" in proc.stderr


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_policy(data, tmp_path, policy):
    run_dir = tmp_path / "run"
    proc = launch(
        overrides(
            data,
            run_dir,
            "training.lr=1e30",
            "training.warmup_steps=0",
            "training.grad_clip=null",
            f"training.nan_policy={policy}",
            "learning_dynamics.enabled=false",
            "evaluation.data=null",
        ),
        check=False,
    )
    assert "non-finite" in proc.stdout
    _, acc = losses(run_dir)
    skipped = acc.Scalars("train/nonfinite_steps")
    if policy == "skip":
        assert proc.returncode == 0 and skipped[-1].value >= 1
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    else:
        assert proc.returncode == 3 and skipped[-1].value == 1
        stopped = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert stopped == f"step_{skipped[-1].step}"  # the last finite weights are saved
        w = weights(run_dir, skipped[-1].step)
        assert all(torch.isfinite(t).all() for t in w.values())
