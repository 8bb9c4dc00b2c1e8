"""Config loading: YAML + typed overrides, strict errors naming the key."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pico.checkpoint import CheckpointError, check_model_config, saved_model_config
from pico.config import Config, ConfigError, load_config, load_model_config, save_config
from pico.hub import HubConfig, load_hub_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_and_typed_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: small\ndata:\n  seq_len: 128\ntraining:\n  lr: 3e-4\n")
    cfg = load_config(
        path,
        [
            "training.max_steps=7",
            "training.betas=[0.8, 0.9]",
            "data.wrap=true",
            "learning_dynamics.layers=[attention.q_proj]",
            "model.vocab_size=1000",
            "training.grad_clip=null",
        ],
    )
    assert cfg.model.preset == "small" and cfg.data.seq_len == 128
    assert cfg.training.lr == pytest.approx(3e-4) and isinstance(
        cfg.training.lr, float
    )  # YAML reads 3e-4 as str
    assert cfg.training.max_steps == 7 and cfg.training.betas == [0.8, 0.9] and cfg.data.wrap is True
    assert cfg.learning_dynamics.layers == ["attention.q_proj"] and cfg.training.grad_clip is None
    model = cfg.model_config()
    assert model.d_model == 384 and model.vocab_size == 1000  # preset, then the override
    assert load_config().training.strategy == "auto"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.d_model=48", "training.schedule=cosine"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["training.lrr=1"], "training.lrr: unknown key"),
        (["nonsense.x=1"], "nonsense: unknown key"),
        (["training.max_steps=1.5"], "training.max_steps: expected int"),
        (["training.max_steps=true"], "training.max_steps: expected int"),
        (["data.wrap=3"], "data.wrap: expected bool"),
        (["training.strategy=zero3"], "training.strategy: 'zero3' is not one of"),
        (["training.betas=[0.9, x]"], "training.betas[1]: expected float"),
        (["data.batch_size=10", "data.micro_batch_size=4"], "data.batch_size: 10 is not a multiple"),
        (["model.d_model=100"], "model.d_model=100 is not divisible by model.attention_n_heads"),
        (
            ["model.attention_n_kv_heads=5"],
            "model.attention_n_heads=12 is not divisible by model.attention_n_kv_heads",
        ),
        (["model.preset=huge"], "model.preset='huge' is unknown"),
        (["data.seq_len=4096"], "data.seq_len: 4096 exceeds model.max_seq_len"),
        (["training.max_steps=0"], "training.max_steps: must be positive"),
        (["training.lr"], "training.lr: overrides look like section.key=value"),
        (["lr=1"], "lr=1: overrides look like section.key=value"),
        (["learning_dynamics.layers=[]"], "learning_dynamics.layers: empty"),
        (["training.spike_detection.window=1"], "training.spike_detection: window must be ≥ 2"),
        (["training.spike_detection.threshold=0"], "training.spike_detection: window must be ≥ 2"),
        (["training.spike_detection.windows=9"], "training.spike_detection.windows: unknown key"),
        (["data.allow_changed=3"], "data.allow_changed: expected bool"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(
        ConfigError, match="^" + key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        load_config(None, overrides)


def test_bad_file_and_bad_section(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="^training: expected a mapping"):
        load_config(write(tmp_path, "training: 3\n"))


def test_model_section_is_derived_from_the_model_config():
    import dataclasses

    from pico.config import ModelConfig
    from pico.model import PicoDecoderConfig

    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    assert fields == ["preset"] + [f.name for f in dataclasses.fields(PicoDecoderConfig)]
    assert all(f.default is None for f in dataclasses.fields(ModelConfig)[1:])
    cfg = load_config(None, ["model.norm_eps=1e-5", "model.d_model=48"])
    assert cfg.model_config().norm_eps == 1e-5 and cfg.model_config().d_model == 48


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- training\n- data\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level, got list"):
        load_config(path, ["training.lr=1e-3"])


@pytest.mark.parametrize(
    "metrics, message",
    [
        ("[nope]", "learning_dynamics.metrics: unknown metric 'nope'"),
        ("[per, cka]", "learning_dynamics.metrics: 'cka' compares two tensors"),
    ],
)
def test_in_situ_metrics_are_checked_at_load_time(metrics, message):
    with pytest.raises(ConfigError, match="^" + message):
        load_config(None, [f"learning_dynamics.metrics={metrics}"])


def test_analysis_specs_share_the_loader(tmp_path):
    from pico.analysis import SpecError, load_spec

    assert issubclass(SpecError, ConfigError) and SpecError.kind == "spec error"
    path = tmp_path / "spec.yaml"
    path.write_text("- per\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        load_spec(path)
    with pytest.raises(ConfigError, match="^steps.all=1: overrides look like key=value"):
        load_spec(None, ["steps.all=1"])
    assert load_spec(None, ["steps=[0, 10]"]).steps == (0, 10)


def test_a_forks_run_config_names_its_model_for_resume(tmp_path):
    """A fork's config.yaml has its own section; a step without model/ is checked against its model: alone."""
    cfg = load_config(None, ["model.d_model=48", "model.n_layers=3"])
    save_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    tree["relora"] = {"rank": 8}  # a section only the fork's Config subclass knows
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="relora: unknown key"):
        load_config(tmp_path / "config.yaml")
    assert load_model_config(tmp_path / "config.yaml") == cfg.model_config()
    step = tmp_path / "checkpoints" / "step_5"
    (step / "state").mkdir(parents=True)
    assert saved_model_config(step) == (cfg.model_config(), tmp_path / "config.yaml")
    check_model_config(step, cfg.model_config())
    with pytest.raises(CheckpointError, match=r"config.yaml: .*n_layers 3 ≠ 4"):
        check_model_config(step, load_config(None, ["model.d_model=48", "model.n_layers=4"]).model_config())
    (tmp_path / "config.yaml").write_text("model:\n  d_model: many\n")
    with pytest.raises(CheckpointError, match=r"config.yaml: cannot read the model config \(model.d_model"):
        saved_model_config(step)


def pico_imports(path) -> set[str]:
    """Every pico module a source file imports, at any depth (function-local imports included)."""
    tree = ast.parse(Path(path).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {n for n in names if n.split(".")[0] == "pico"}


def test_the_loader_is_a_leaf_and_the_hub_never_imports_the_run_config():
    """config_loader imports only pico.errors; pico.hub reads its section through it, never pico.config
    (which imports pico.hub.config), so that no import cycle hides in a function body."""
    root = Path(__file__).resolve().parents[1] / "pico"
    assert pico_imports(root / "config_loader.py") == {"pico.errors"}
    for path in (root / "hub").glob("*.py"):
        assert "pico.config" not in pico_imports(path), path
    code = "import sys, pico.config_loader; print(sorted(m for m in sys.modules if m.startswith('pico')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pico', 'pico.config_loader', 'pico.errors']"


def test_hub_section_is_read_alone(tmp_path):
    """`load_hub_config` reads checkpointing.hub of any run's config.yaml, a fork's own sections included."""
    cfg = load_config(None, ["checkpointing.hub={repo_id: me/runs, branch: b1}"])
    save_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    tree["relora"] = {"rank": 8}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert load_hub_config(tmp_path / "config.yaml") == HubConfig("me/runs", "b1", True, True)
    (tmp_path / "config.yaml").write_text("checkpointing: {hub: {repo_id: 'a b'}}\n")
    with pytest.raises(ConfigError, match="^checkpointing.hub.repo_id: "):
        load_hub_config(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("checkpointing: {hub: [me/runs]}\n")
    with pytest.raises(ConfigError, match=r"^checkpointing.hub: expected a mapping, got \['me/runs'\]"):
        load_hub_config(tmp_path / "config.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpointing.hub.repo_id=a b"], "checkpointing.hub.repo_id: "),
        (["checkpointing.hub.branch=a..b"], "checkpointing.hub.branch: 'a..b' is not a legal branch name"),
        (["checkpointing.resume=hf://a b@main"], "checkpointing.resume: "),
        (["checkpointing.resume=hub"], "checkpointing.resume: 'hub' needs checkpointing.hub.repo_id"),
        (["training.betas=[0.9"], r"training.betas=\[0.9: the value is not YAML"),
    ],
)
def test_hub_keys_and_override_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match="^" + message):
        load_config(None, overrides)
