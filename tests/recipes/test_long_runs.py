"""recipes/pretrain.py over long-run features, on real runs: the checkpoint schedule (save_steps,
save_log_spaced), retention of the train state (keep_state_last, keep_state_steps; kill -9 while pruning),
and branching a new run from another run's step."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.analysis import analyze
from pico.checkpoint_schedule import checkpoint_steps
from pico.config import load_config
from pico.data import TokenStream
from pico.data.replay import batch_at
from pico.run_dir import RunDirError, list_steps
from pico.run_lock import resume_point
from tests.recipes.common import launch
from tests.tiny import SEQ, VOCAB, shards, tiny_run, write_shards

STEPS = 20
SCHEDULE = [0, 1, 2, 4, 5, 8, 16, 20]  # save_every 8, save_steps [5], log-spaced below 8, and the last step
KEPT = [4, 16, 20]  # keep_state_last 2 (16, 20) and keep_state_steps [4]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards(tmp_path_factory.mktemp("data"), 160, 8)


def overrides(data, run_dir, *extra):
    """A 20-step run on 160 rows: the schedule and retention above, the eval split and perplexity."""
    train, evals = data
    return tiny_run(
        train,
        run_dir,
        "training.lr=1e-3",
        "training.warmup_steps=2",
        "training.seed=3",
        "checkpointing.save_steps=[5]",
        "checkpointing.save_log_spaced=true",
        "checkpointing.keep_state_last=2",
        "checkpointing.keep_state_steps=[4]",
        f"evaluation.data={evals}",
        "evaluation.batch_size=4",
        *extra,
        steps=STEPS,
        save_every=8,
        evals=evals,
    )


def weights(run_dir, step=STEPS):
    return load_file(Path(run_dir) / "checkpoints" / f"step_{step}" / "model" / "model.safetensors")


def losses(run_dir) -> dict[int, float]:
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("schedule") / "run"
    proc = launch(overrides(data, run_dir))
    return run_dir, proc.stdout


def test_the_run_has_exactly_the_scheduled_steps(run):
    run_dir, _ = run
    cfg = load_config(run_dir / "config.yaml")
    assert checkpoint_steps(cfg.checkpointing, STEPS) == SCHEDULE
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["latest"] + [f"step_{s}" for s in SCHEDULE])
    for step in SCHEDULE:  # every step keeps its model, learning dynamics and evaluation
        d = ckpts / f"step_{step}"
        assert (d / "model" / "model.safetensors").is_file(), step
        splits = {"eval", "weights"} | ({"train"} if step < STEPS else set())  # no batch 21 in the data
        assert {p.name for p in (d / "learning_dynamics").iterdir()} == {f"{s}.safetensors" for s in splits}
        assert json.loads((d / "eval.json").read_text())["step"] == step


def test_only_the_kept_steps_hold_state(run):
    run_dir, stdout = run
    assert list_steps(run_dir, require="state") == KEPT
    assert not list((run_dir / "checkpoints").glob("step_*/.state.deleting"))
    assert "retention: deleted state/ of step_0" in stdout  # each deletion is logged
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"


def test_the_analysis_reads_every_step(run):
    run_dir, _ = run
    rows = analyze([run_dir], progress=False)
    assert sorted({row.step for row in rows}) == SCHEDULE


def test_retention_leaves_training_unchanged(run, data, tmp_path):
    run_dir = tmp_path / "all"
    launch(overrides(data, run_dir, "checkpointing.keep_state_last=null"))
    assert list_steps(run_dir, require="state") == SCHEDULE
    for step in SCHEDULE:
        for name, w in weights(run[0], step).items():
            assert torch.equal(weights(run_dir, step)[name], w), (step, name)


def test_kill_9_while_pruning_loses_nothing(run, data, tmp_path):
    """SIGKILL halfway through deleting step_5's state (when step_16 is published); the resumed run ends as
    the uninterrupted one, and the next pruning clears the half-deleted state."""
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir)
    killed = launch(args, check=False, kill_at="5:pruning")
    assert killed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_16"
    assert (ckpts / "step_5" / ".state.deleting").is_dir() and not (ckpts / "step_5" / "state").exists()
    assert list_steps(run_dir, require="state") == [4, 8, 16]  # every state that is kept is whole
    resumed = launch(args)
    assert "resumed from" in resumed.stdout and "at step 16" in resumed.stdout
    assert list_steps(run_dir, require="state") == KEPT
    assert not list(ckpts.glob("step_*/.state.deleting"))
    for step in SCHEDULE:
        assert (ckpts / f"step_{step}" / "learning_dynamics" / "weights.safetensors").is_file(), step
        for name, w in weights(run[0], step).items():
            assert torch.equal(weights(run_dir, step)[name], w), (step, name)


def test_resuming_a_step_without_state_names_the_nearest_with_state(run):
    run_dir, _ = run
    step_8 = run_dir / "checkpoints" / "step_8"
    with pytest.raises(RunDirError) as e:
        resume_point(run_dir, str(step_8))
    assert str(e.value) == (
        f"checkpointing.resume: {step_8} holds no state/ to start from (checkpointing.keep_state_last keeps "
        f"it only in the newest checkpoints); step_4 has the nearest complete state/ "
        f"(checkpointing.resume={run_dir / 'checkpoints' / 'step_4'})"
    )


def test_a_branch_continues_the_parent_bitwise(run, data, tmp_path):
    """A branch from step_16 that changes nothing but its run_dir: it writes step_16 as its first checkpoint
    (its `latest` starts there) and ends with the parent's weights, bit for bit."""
    parent, _ = run
    branch = tmp_path / "branch"
    proc = launch(overrides(data, branch, f"checkpointing.branch_from={parent}/checkpoints/step_16"))
    assert f"branched from {parent}/checkpoints/step_16 at step 16; changed: nothing" in proc.stdout
    assert list_steps(branch) == [16, 20]
    assert load_config(branch / "config.yaml").checkpointing.branch_from == f"{parent}/checkpoints/step_16"
    for step in (16, 20):
        for name, w in weights(parent, step).items():
            assert torch.equal(weights(branch, step)[name], w), (step, name)
    a = load_file(parent / "checkpoints" / "step_16" / "learning_dynamics" / "train.safetensors")
    b = load_file(branch / "checkpoints" / "step_16" / "learning_dynamics" / "train.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batch of update 17, the same gradients
    assert losses(branch) == {s: v for s, v in losses(parent).items() if s > 16}


def test_a_branch_with_another_lr_follows_the_parent_until_the_change(run, data, tmp_path):
    parent, _ = run
    branch = tmp_path / "cooldown"
    proc = launch(
        overrides(data, branch, f"checkpointing.branch_from={parent}/checkpoints/step_16", "training.lr=2e-4")
    )
    assert "changed: training.lr 0.001 → 0.0002" in proc.stdout
    record = json.loads((branch / "run.json").read_text())
    assert record["starts"] == [
        {
            "step": 16,
            "from": f"{parent}/checkpoints/step_16",
            "changes": {"training.lr": [0.001, 0.0002]},
            "branched": True,
        }
    ]
    mine, theirs = losses(branch), losses(parent)
    assert mine[17] == theirs[17]  # update 17's loss is computed on W_16 and the same batch
    assert all(mine[s] != theirs[s] for s in (18, 19, 20))  # from W_17 on, the lower lr shows
    acc = EventAccumulator(str(branch / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[17] == pytest.approx(
        2e-4 * (1 - (17 - 2) / (STEPS - 2)), rel=1e-6
    )  # the branch's lr, linear decay


def test_a_branch_onto_other_data_continues_at_the_same_position(run, data, tmp_path):
    """The data mixture may change: the branch reads global batch 16 of its own data for update 17."""
    parent, _ = run
    other = write_shards(tmp_path / "other", 240, seed=9)
    branch = tmp_path / "other-data"
    launch(
        overrides(
            data, branch, f"checkpointing.branch_from={parent}/checkpoints/step_16", f"data.path={other}"
        )
    )
    stored = load_file(branch / "checkpoints" / "step_16" / "learning_dynamics" / "train.safetensors")
    with TokenStream(str(other), SEQ, 8, 2, vocab_size=VOCAB) as stream:
        assert torch.equal(stored["input_ids"].long(), stream.global_batch(16))
    versions = json.loads((branch / "data_fingerprint.json").read_text())["versions"]
    assert [v["step"] for v in versions] == [16]  # its data are recorded from its first update on
    assert torch.equal(batch_at(branch, 16), stored["input_ids"].long())
