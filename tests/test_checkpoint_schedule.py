"""The checkpoint schedule, retention of the train state (on hand-made run directories, with the Hub
stand-in), their config keys, and the WSD schedule against float64 formulas."""

import importlib
import math
import sys
from pathlib import Path

import pytest

import pico.hub.api
from pico.checkpoint import verify
from pico.checkpoint_schedule import Retention, checkpoint_steps, is_checkpoint_step
from pico.config import ConfigError, load_config
from pico.hub import Uploader
from pico.run_dir import list_steps, step_dir
from tests.hub.standin import LocalHub
from tests.hub.test_upload import make_steps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))  # as `python recipes/pretrain.py` runs
pretrain = importlib.import_module("pretrain")


def checkpointing(*overrides, max_steps=143_000):
    return load_config(None, [f"training.max_steps={max_steps}", *overrides]).checkpointing


def test_pythia_grid_has_154_checkpoints():
    ck = checkpointing("checkpointing.save_every=1000", "checkpointing.save_log_spaced=true")
    steps = checkpoint_steps(ck, 143_000)
    assert len(steps) == 154
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-2:] == [142_000, 143_000] and all(s % 1000 == 0 for s in steps[11:])


def test_schedule_always_has_step_0_and_the_last_step():
    ck = checkpointing("checkpointing.save_every=4", "checkpointing.save_steps=[3, 9]", max_steps=10)
    assert checkpoint_steps(ck, 10) == [0, 3, 4, 8, 9, 10]
    assert not is_checkpoint_step(5, ck, 10)
    assert checkpoint_steps(checkpointing("checkpointing.save_every=100", max_steps=10), 10) == [0, 10]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["checkpointing.save_steps=[20]"],
            "checkpointing.save_steps: step 20 is outside the run (0 to max_steps=10)",
        ),
        (
            ["checkpointing.keep_state_steps=[-1]"],
            "checkpointing.keep_state_steps: step -1 is outside the run",
        ),
        (["checkpointing.keep_state_last=0"], "checkpointing.keep_state_last: must be at least 1"),
        (
            ["training.preempt_signals=[SIGKILL]"],
            "training.preempt_signals: 'SIGKILL' is not a signal a process",
        ),
        (
            ["training.preempt_signals=[SIGFOO]"],
            "training.preempt_signals: 'SIGFOO' is not a signal a process",
        ),
        (["training.preempt_timeout=0"], "training.preempt_timeout: must be positive"),
        (["training.decay_steps=3"], "training.decay_steps: only for training.schedule: wsd, got 'linear'"),
        (["training.schedule=wsd", "training.decay_ratio=0"], "training.decay_ratio: must be in (0, 1]"),
        (
            ["training.schedule=wsd", "training.warmup_steps=4", "training.decay_steps=7"],
            "training.decay_steps: a decay of 7 steps does not fit between warmup_steps=4 and max_steps=10",
        ),
        (
            [
                "checkpointing.branch_from=runs/a/checkpoints/step_4",
                "checkpointing.resume=runs/b/checkpoints/step_2",
            ],
            "checkpointing.branch_from: starts a new run, so checkpointing.resume must be auto or never",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training.max_steps=10", "training.warmup_steps=0", *overrides])
    assert str(e.value).startswith(message)


def wsd_float64(step, *, warmup, max_steps, decay, shape, floor):
    """The WSD factor written out: warmup, 1 until max_steps - decay, then the decay shape to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    x = min(1.0, max(0.0, (step - (max_steps - decay)) / decay))  # the fraction of the decay done
    return floor + (1 - floor) * ((1 - x) if shape == "linear" else (1 - math.sqrt(x)))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize("length", ["training.decay_steps=30", "training.decay_ratio=0.25"])
def test_wsd_against_float64(shape, length):
    t = load_config(
        None,
        [
            "training.schedule=wsd",
            "training.max_steps=120",
            "training.warmup_steps=10",
            "training.min_lr_ratio=0.1",
            f"training.decay_shape={shape}",
            length,
        ],
    ).training
    decay = 30  # decay_steps, or 0.25 · 120
    assert t.wsd_decay_steps() == decay
    factor = pretrain.lr_lambda(t)
    for step in range(121):
        want = wsd_float64(step, warmup=10, max_steps=120, decay=decay, shape=shape, floor=0.1)
        assert factor(step) == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert factor(89) == factor(90) == 1.0 and factor(120) == pytest.approx(0.1)  # stable, then the floor


def test_the_other_schedules_are_unchanged():
    """linear and cosine as before WSD existed: the float64 formulas of docs/configuration.md."""
    for schedule, decay in (
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ):
        t = load_config(
            None, [f"training.schedule={schedule}", "training.max_steps=50", "training.warmup_steps=5"]
        ).training
        factor = pretrain.lr_lambda(t)
        for step in range(5, 51):
            assert factor(step) == decay((step - 5) / 45), (schedule, step)


def with_state(run_dir, steps, latest):
    make_steps(run_dir, steps)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{latest}\n")
    return run_dir


def test_retention_keeps_the_newest_n_the_listed_steps_and_latest(tmp_path):
    run = with_state(
        tmp_path / "run", (0, 1, 2, 4, 8, 12, 16), latest=12
    )  # step_16: left by an earlier attempt
    ck = checkpointing("checkpointing.keep_state_last=2", "checkpointing.keep_state_steps=[1]", max_steps=16)
    retention = Retention(run, ck, Uploader(run, None))
    assert retention.prune() == [0, 2, 4]
    assert list_steps(run, require="state") == [1, 8, 12, 16]  # newer than latest: not touched
    assert list_steps(run, require="model") == [0, 1, 2, 4, 8, 12, 16]
    assert retention.prune() == []  # nothing more to drop
    assert Retention(run, checkpointing(max_steps=16), Uploader(run, None)).prune() == []  # null: keep all
    (step_dir(run, 0) / ".state.deleting" / "x").mkdir(parents=True)  # a crash's leftover
    (run / "checkpoints" / "latest").write_text("step_16\n")
    assert retention.prune() == [8]
    assert not (step_dir(run, 0) / ".state.deleting").exists()


def test_retention_waits_for_the_hub_upload_of_state(tmp_path, monkeypatch):
    standin = LocalHub(tmp_path / "standin")
    standin.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    run = with_state(tmp_path / "run", (0, 1, 2), latest=2)
    ck = checkpointing("checkpointing.keep_state_last=1", max_steps=2)
    uploader = Uploader(run, "me/pico-runs")
    retention = Retention(run, ck, uploader)
    assert retention.prune() == []  # steps 0 and 1 are not on the Hub yet
    assert uploader.start().finish(timeout=30) == []
    assert retention.prune() == [0, 1]
    assert [f for f in standin.list_files("me/pico-runs", "run/step_0") if f.startswith("state/")]
    other = with_state(tmp_path / "other", (0, 1, 2), latest=2)  # no state goes to the Hub: no wait
    assert Retention(other, ck, Uploader(other, "me/pico-runs", upload_state=False)).prune() == [0, 1]


def test_a_step_whose_state_retention_deleted_still_verifies_and_uploads(tmp_path, monkeypatch):
    """Its manifest still lists state/; `verify` accepts the step without it (saying so), the uploader
    commits it without state/, and damage to what is left is still found."""
    standin = LocalHub(tmp_path / "standin")
    standin.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    run = with_state(tmp_path / "run", (0, 1, 2), latest=2)
    ck = checkpointing("checkpointing.keep_state_last=1", max_steps=2)
    uploader = Uploader(run, "me/pico-runs", upload_state=False)
    assert Retention(run, ck, uploader).prune() == [0, 1]
    lines = []
    assert verify(run, echo=lines.append) == []
    assert [("no state/" in line) for line in lines] == [True, True, False], lines
    (step_dir(run, 1) / ".state.deleting").mkdir()  # a crash in drop_state's rmtree: not a fault
    (step_dir(run, 1) / ".state.deleting" / "__0_0.distcp").write_text("partly deleted")
    assert verify(run, echo=lines.append) == []
    uploader.enqueue(0)
    uploader.enqueue(1)
    assert uploader.start().finish(timeout=30) == []
    files = standin.list_files("me/pico-runs", "run/step_1")
    assert "model.safetensors" in files and not [f for f in files if "state" in f], files
    (step_dir(run, 0) / "eval.json").write_text("{}")
    assert [p for p in verify(run) if "step_0/eval.json: " in p], verify(run)
    state = step_dir(run, 2) / "state"
    next(p for p in state.iterdir() if p.suffix == ".distcp").unlink()  # a state/ only partly there: a fault
    assert [p for p in verify(run) if "step_2/state/" in p and "missing" in p], verify(run)
