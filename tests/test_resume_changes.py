"""Changing settings on resume (docs/checkpoints.md, "Changing settings on resume"): each config section says
which of its keys a resumed run may change; those apply from the resume step on and run.json records them,
the others (and another recipe's run) are refused with one line. The forks declare their own sections' rules.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pico.checkpoint import load_checkpoint
from pico.config import (
    START_KEYS,
    CheckpointingConfig,
    Config,
    DataConfig,
    EvaluationConfig,
    LearningDynamicsConfig,
    LoggingConfig,
    TrainingConfig,
    load_config,
    resume_changes,
)
from pico.config_loader import ConfigError
from pico.data import TokenStream
from pico.hub.config import HubConfig
from recipes.maml_modules import MamlConfig
from recipes.relora_modules import ReLoRAConfig
from tests.recipes.common import launch, recipe_module
from tests.tiny import MODEL, SEQ, tiny_run, write_shards

LR = 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("data") / "train", 64, seed=1)


def run_args(data, run_dir, *extra, steps=3):
    """A constant LR (no warmup), so that an update's size is proportional to training.lr."""
    constant = ["training.schedule=constant", "training.warmup_steps=0", f"training.lr={LR}"]
    return tiny_run(data, run_dir, *constant, *extra, steps=steps, batch_size=4, save_every=3)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A pretrain.py run of 3 steps (checkpoints at 0 and 3); tests resume copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    launch(run_args(data, run_dir))
    return run_dir


def copy(run, to):
    return shutil.copytree(run, to)


def starts(run):
    return json.loads((run / "run.json").read_text())["starts"]


@pytest.mark.parametrize(
    "section",
    [DataConfig, TrainingConfig, CheckpointingConfig, LearningDynamicsConfig, EvaluationConfig, LoggingConfig]
    + [HubConfig, ReLoRAConfig, MamlConfig],
)
def test_every_key_a_section_lets_change_is_one_of_its_keys(section):
    assert set(section.changeable_on_resume) <= {f.name for f in dataclasses.fields(section)}


def test_resume_changes_follow_each_sections_rules():
    cfg = load_config(None, ["training.lr=2e-3", "data.micro_batch_size=4", "checkpointing.hub.branch=b"])
    old = Config().to_dict()
    assert resume_changes(old, cfg, "old.yaml") == {
        "training.lr": [3e-4, 2e-3],
        "data.micro_batch_size": [8, 4],
        "checkpointing.hub.branch": [None, "b"],
    }
    del old["logging"]["log_every"]  # a key the run's config lacks (an older pico) counts as its default
    old["model"]["d_model"] = 1  # the model: pico.checkpoint.check_model_config compares the resolved one
    old["checkpointing"]["run_dir"] = "elsewhere"  # START_KEYS: how a run starts
    assert "checkpointing.run_dir" in START_KEYS and resume_changes(old, load_config(), "old.yaml") == {}
    for override, line in (
        ("data.batch_size=8", "data.batch_size: 1024 in old.yaml, 8 now; it may not change on resume"),
        ("data.shuffle_seed=3", "data.shuffle_seed: None in old.yaml, 3 now; it may not change on resume"),
        ("training.seed=1", "training.seed: 42 in old.yaml, 1 now; it may not change on resume"),
    ):
        with pytest.raises(ConfigError, match=rf"^{line.replace('(', '.').replace(')', '.')} "):
            resume_changes(Config().to_dict(), load_config(None, [override]), "old.yaml")


def test_a_changed_lr_applies_from_the_resume_step_and_is_recorded(finished, data, tmp_path):
    """Resumed from step_3 with training.lr 2x: update 4 is twice that of the resume with the old LR (AdamW's
    update is linear in the LR), the LR logged is the new one, and run.json and config.yaml say so."""
    deltas = {}
    for lr in (LR, 2 * LR):
        run = copy(finished, tmp_path / f"lr{lr}")
        launch(run_args(data, run, f"training.lr={lr}", steps=4))
        w3 = load_file(run / "checkpoints" / "step_3" / "model" / "model.safetensors")
        w4 = load_file(run / "checkpoints" / "step_4" / "model" / "model.safetensors")
        deltas[lr] = {k: w4[k] - w3[k] for k in w3}
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        assert {e.step: e.value for e in acc.Scalars("train/lr")}[4] == pytest.approx(lr, rel=1e-6)
    for key, delta in deltas[LR].items():
        torch.testing.assert_close(deltas[2 * LR][key], 2 * delta, rtol=1e-3, atol=3e-7)  # 2 ulps of 1.0
    assert starts(run) == [
        {"step": 0, "from": None, "changes": {}},
        {
            "step": 3,
            "from": str(run / "checkpoints" / "step_3"),
            "changes": {"training.max_steps": [3, 4], "training.lr": [LR, 2 * LR]},
        },
    ]
    assert load_config(run / "config.yaml").training.lr == 2 * LR


def test_optimizer_settings_come_from_the_config_and_state_from_the_checkpoint(finished, data):
    pretrain = recipe_module("pretrain")
    new = ["training.lr=5e-3", "training.betas=[0.8, 0.9]", "training.eps=1e-6", "training.weight_decay=0.3"]
    cfg = load_config(None, run_args(data, finished, *new))
    model = pretrain.build_model(cfg.model_config(), cfg.training.seed, torch.device("cpu"))
    optimizer = pretrain.build_optimizer(model, cfg.training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretrain.lr_lambda(cfg.training))
    stream = TokenStream.from_config(cfg.data, 0, 1, cfg.model_config().vocab_size, torch.device("cpu"))
    assert load_checkpoint(finished / "checkpoints" / "step_3", model, optimizer, scheduler, stream) == 3
    stream.close()
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    assert decays == [0.3, 0.0] and scheduler.base_lrs == [5e-3, 5e-3]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (5e-3, (0.8, 0.9), 1e-6)
    assert all(state["step"].item() == 3 for state in optimizer.state.values())  # the checkpoint's moments


def test_another_recipe_cannot_resume_a_run(finished, data, tmp_path):
    maml_args = [*MODEL, "model.vocab_size=65", "maml.n_way=8", "maml.head_hidden=16", "maml.inner_steps=1"]
    run = copy(finished, tmp_path / "run")
    proc = launch([*run_args(data, run), *maml_args], recipe="recipes/maml.py", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"run error: {run}/run.json: a run of pretrain.py, which maml.py cannot resume; resume it with "
        "pretrain.py, or start a new run in another checkpointing.run_dir"
    ]
    maml = tmp_path / "maml"
    launch([*run_args(data, maml), *maml_args], recipe="recipes/maml.py")
    before = (maml / "checkpoints" / "latest").read_text()
    proc = launch([*run_args(data, maml), *maml_args[:2], "training.max_steps=5"], check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"run error: {maml}/run.json: a run of maml.py (config sections maml), which pretrain.py cannot "
        "resume; resume it with maml.py, or start a new run in another checkpointing.run_dir"
    ]
    assert (maml / "checkpoints" / "latest").read_text() == before  # `latest` stays where maml.py left it


FORKS = {  # recipe → (its extra arguments, a key it lets change, a key it refuses: (override, line))
    "relora": (
        ["training.schedule=cosine", "relora.r=4", "relora.reset_every=2", "relora.restart_warmup_steps=1"],
        ("relora.reset_every=3", "relora.reset_every", [2, 3]),
        ("relora.alpha=8", "relora.alpha: 32.0 in {run}/config.yaml, 8.0 now; it may not change on resume"),
    ),
    "maml": (
        [*MODEL, "model.vocab_size=65", "maml.n_way=8", "maml.head_hidden=16", "maml.inner_steps=1"],
        ("maml.hybrid_ratio=1.0", "maml.hybrid_ratio", [0.5, 1.0]),
        (
            "maml.head_hidden=8",
            "maml.head_hidden: 16 in {run}/config.yaml, 8 now; it may not change on resume",
        ),
    ),
}


@pytest.mark.parametrize("fork", FORKS)
def test_forks_say_which_of_their_keys_may_change(data, tmp_path, fork):
    extra, (changed, key, values), (refused, line) = FORKS[fork]
    run = tmp_path / "run"
    args = [*tiny_run(data, run, *extra, steps=2, batch_size=4, save_every=2), f"data.seq_len={SEQ}"]
    launch(args, recipe=f"recipes/{fork}.py")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    proc = launch([*args, refused, "training.max_steps=3"], recipe=f"recipes/{fork}.py", check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("config error: " + line.format(run=run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"} == before
    launch([*args, changed, "training.max_steps=3"], recipe=f"recipes/{fork}.py")
    assert starts(run)[-1]["changes"] == {"training.max_steps": [2, 3], key: values}
