"""The run configuration: its sections as dataclasses, and their validation (docs/configuration.md).

Reading (YAML, `section.key=value` overrides, typed dataclasses, ConfigError) is pico.config_loader's; the
`checkpointing.hub` section and its checks are pico.hub.config's.
"""

from __future__ import annotations

import dataclasses
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from pico.config_loader import ConfigError, build, load_tree, section
from pico.evaluation import TaskError, TaskSpec, check_specs
from pico.hub.config import HubConfig, check_hub_config
from pico.metrics import METRICS
from pico.model.config import PicoDecoderConfig
from pico.run_dir import DEFAULT_LAYERS

# The `model` section: `preset` plus every PicoDecoderConfig field as an optional override, derived from
# PicoDecoderConfig so that a new model field is one edit there.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("preset", str | None, field(default="tiny"))]
    + [
        (f.name, typing.get_type_hints(PicoDecoderConfig)[f.name] | None, field(default=None))
        for f in dataclasses.fields(PicoDecoderConfig)
    ],
)
ModelConfig.__doc__ = "`preset` fills the PicoDecoderConfig fields; any field set here overrides the preset."


@dataclass
class DataConfig:
    """Pretokenized training data and how it is batched."""

    # The keys a resumed run may change (each section says its own; docs/checkpoints.md, "Changing settings
    # on resume"); the data position in the checkpoint counts global samples of these data, batch and order.
    changeable_on_resume: ClassVar = ("micro_batch_size", "wrap", "prefetch", "allow_changed")

    path: str = "pico-lm/pretokenized-dolma"
    seq_len: int = 2048
    batch_size: int = 1024
    micro_batch_size: int = 8
    shuffle_seed: int | None = None
    wrap: bool = False
    prefetch: int = 2
    allow_changed: bool = False


@dataclass
class SpikeDetectionConfig:
    """Loss spikes: a loss above the mean of the last `window` losses by `threshold` standard deviations."""

    changeable_on_resume: ClassVar = ("enabled", "window", "threshold")  # they decide what is saved, no more

    enabled: bool = False
    window: int = 100
    threshold: float = 6.0


@dataclass
class TrainingConfig:
    """Optimiser, schedule, parallelism and numerics."""

    # All but `seed`, which made the initial weights (the checkpoint holds the RNG state from then on), and
    # `block_lr_ratio`, which makes the optimizer's parameter groups.
    changeable_on_resume: ClassVar = (
        "max_steps",
        "lr",
        "warmup_steps",
        "schedule",
        "min_lr_ratio",
        "weight_decay",
        "betas",
        "eps",
        "grad_clip",
        "strategy",
        "precision",
        "activation_checkpointing",
        "compile",
        "nan_policy",
        "decay_steps",
        "decay_ratio",
        "decay_shape",
        "preempt_signals",
        "preempt_timeout",
    )

    max_steps: int = 200_000
    lr: float = 3e-4
    block_lr_ratio: float = 1.0  # the attention and SwiGLU matrices train at this fraction of lr
    warmup_steps: int = 2500
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None  # wsd: the decay's length; null: decay_ratio · max_steps
    decay_ratio: float = 0.2  # wsd: the decay's share of max_steps, when decay_steps is null
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # wsd: the decay's shape
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 42
    nan_policy: Literal["skip", "stop"] = "stop"
    spike_detection: SpikeDetectionConfig = field(default_factory=SpikeDetectionConfig)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preempt_timeout: float = 25.0  # seconds from the signal to exit: the Hub upload wait ends there

    def wsd_decay_steps(self) -> int:
        """The length of the WSD schedule's decay: `decay_steps`, else `decay_ratio · max_steps` rounded."""
        return (
            self.decay_steps
            if self.decay_steps is not None
            else max(1, round(self.decay_ratio * self.max_steps))
        )


@dataclass
class CheckpointingConfig:
    """Where the run directory lives, how often to checkpoint, and what to resume from."""

    changeable_on_resume: ClassVar = (  # run_dir, resume, overwrite, branch_from: START_KEYS
        "save_every",
        "save_steps",
        "save_log_spaced",
        "keep_state_last",
        "keep_state_steps",
        "hub",
    )

    run_dir: str = "runs/pico"
    save_every: int = 1000
    save_steps: list[int] = field(default_factory=list)  # more steps to checkpoint
    save_log_spaced: bool = False  # also 1, 2, 4, ... below save_every (Pythia's early checkpoints)
    keep_state_last: int | None = None  # state/ only in the newest N checkpoints (and keep_state_steps)
    keep_state_steps: list[int] = field(default_factory=list)
    resume: str = "auto"  # auto | never | <step dir> | hub | hf://<repo_id>[@<revision>]
    branch_from: str | None = None  # a new run starts at this step dir of another run
    overwrite: bool = False
    hub: HubConfig = field(default_factory=HubConfig)


@dataclass
class LearningDynamicsConfig:
    """What learning dynamics are captured at every checkpoint step."""

    changeable_on_resume: ClassVar = (
        "enabled",
        "layers",
        "positions",
        "eval_data",
        "eval_batch_size",
        "metrics",
        "dtype",
    )

    enabled: bool = True
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    positions: Literal["last", "all"] = "last"
    eval_data: str | None = None
    eval_batch_size: int = 64
    metrics: list[str] = field(default_factory=list)
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class EvaluationConfig:
    """What is evaluated at every checkpoint step: perplexity on `data` (the `paloma` task) and `tasks`."""

    changeable_on_resume: ClassVar = ("data", "batch_size", "max_batches", "tasks")

    data: str | None = None
    batch_size: int = 16
    max_batches: int | None = None
    tasks: list[TaskSpec] = field(default_factory=list)

    def task_specs(self) -> list[TaskSpec]:
        """The tasks to run: `data` as the paloma task, then `tasks`. `max_batches` caps the rows globally
        (its first max_batches × batch_size rows, whatever the world size), which the scorer then shards."""
        limit = None if self.max_batches is None else self.max_batches * self.batch_size
        paloma = [TaskSpec("paloma", self.data, limit, self.batch_size)] if self.data else []
        return paloma + self.tasks


@dataclass
class LoggingConfig:
    """Console and tensorboard logging."""

    changeable_on_resume: ClassVar = ("log_every",)

    log_every: int = 10


@dataclass
class Config:
    """The resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    learning_dynamics: LearningDynamicsConfig = field(default_factory=LearningDynamicsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """The config as plain nested dicts (what `config.yaml` holds)."""
        return dataclasses.asdict(self)

    def model_config(self) -> PicoDecoderConfig:
        """Build the `PicoDecoderConfig` this run trains; invalid combinations raise ConfigError."""
        fields = {k: v for k, v in dataclasses.asdict(self.model).items() if k != "preset" and v is not None}
        try:
            if self.model.preset is None:
                return PicoDecoderConfig(**fields)
            return PicoDecoderConfig.preset(self.model.preset, **fields)
        except ValueError as e:  # PicoDecoderConfig's checks, one line naming the field: "model.d_model=..."
            raise ConfigError(str(e)) from None


def _validate(cfg: Config) -> None:
    """Cross-field checks that need more than one key."""
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "data.batch_size": cfg.data.batch_size,
        "data.micro_batch_size": cfg.data.micro_batch_size,
        "training.max_steps": cfg.training.max_steps,
        "checkpointing.save_every": cfg.checkpointing.save_every,
        "logging.log_every": cfg.logging.log_every,
        "learning_dynamics.eval_batch_size": cfg.learning_dynamics.eval_batch_size,
        "evaluation.batch_size": cfg.evaluation.batch_size,
        "training.lr": cfg.training.lr,
        "training.block_lr_ratio": cfg.training.block_lr_ratio,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = {
        "training.warmup_steps": cfg.training.warmup_steps,
        "training.eps": cfg.training.eps,
        "data.shuffle_seed": cfg.data.shuffle_seed or 0,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.data.batch_size % cfg.data.micro_batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not a multiple of "
            f"data.micro_batch_size={cfg.data.micro_batch_size}"
        )
    if len(cfg.training.betas) != 2 or not all(0 <= b < 1 for b in cfg.training.betas):
        raise ConfigError(f"training.betas: expected two values in [0, 1), got {cfg.training.betas}")
    if not 0 <= cfg.training.min_lr_ratio <= 1:
        raise ConfigError(f"training.min_lr_ratio: must be in [0, 1], got {cfg.training.min_lr_ratio}")
    spikes = cfg.training.spike_detection
    if spikes.window < 2 or spikes.threshold <= 0:
        raise ConfigError(
            f"training.spike_detection: window must be ≥ 2 and threshold positive, got "
            f"window={spikes.window}, threshold={spikes.threshold}"
        )
    if cfg.training.grad_clip is not None and cfg.training.grad_clip <= 0:
        raise ConfigError(f"training.grad_clip: must be positive or null, got {cfg.training.grad_clip}")
    model = cfg.model_config()
    if cfg.data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    _validate_evaluation(cfg.evaluation)
    _validate_learning_dynamics(cfg.learning_dynamics)
    _validate_checkpointing(cfg.checkpointing)
    _validate_schedule(cfg.training)
    _validate_long_runs(cfg.training, cfg.checkpointing)


def _validate_evaluation(e: EvaluationConfig) -> None:
    """max_batches is positive; task names are registered and configured once, limits and batch sizes
    positive (the evaluation package's `check_specs`, naming the config key)."""
    if e.max_batches is not None and e.max_batches < 1:
        raise ConfigError(f"evaluation.max_batches: must be positive or null, got {e.max_batches}")
    keys = ["evaluation.data"] * bool(e.data) + [f"evaluation.tasks[{i}]" for i in range(len(e.tasks))]
    try:
        check_specs(e.task_specs(), keys)  # evaluation.data is the paloma task
    except TaskError as err:
        raise ConfigError(str(err)) from None


def _validate_learning_dynamics(ld: LearningDynamicsConfig) -> None:
    """In-situ metrics exist and take one tensor; capture names at least one layer."""
    for name in ld.metrics:
        if name not in METRICS:
            known = ", ".join(sorted(METRICS))
            raise ConfigError(f"learning_dynamics.metrics: unknown metric {name!r}; registered: {known}")
        if METRICS[name].comparative:
            raise ConfigError(
                f"learning_dynamics.metrics: {name!r} compares two tensors; in-situ metrics take "
                "one (per, condition_number, gini, hoyer, norm, ...); compare checkpoints with "
                "pico.analysis"
            )
    if ld.enabled and not ld.layers:
        raise ConfigError(
            "learning_dynamics.layers: empty; set learning_dynamics.enabled=false to capture nothing"
        )
    for i, suffix in enumerate(ld.layers):
        if not suffix.strip(" ."):
            raise ConfigError(f"learning_dynamics.layers[{i}]: {suffix!r} names no module")


def _validate_checkpointing(ck: CheckpointingConfig) -> None:
    """overwrite goes with resume: never; the run directory is no file; the Hub settings are well-formed."""
    if ck.overwrite and ck.resume != "never":
        raise ConfigError(
            f"checkpointing.overwrite: true needs checkpointing.resume=never, got {ck.resume!r}"
        )
    run_dir = Path(ck.run_dir).expanduser()
    for path in (run_dir, *run_dir.parents):  # the nearest existing path must be a directory
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"checkpointing.run_dir: {path} is a file, not a directory")
            break
    check_hub_config(ck.hub, ck.resume)


def _validate_schedule(t: TrainingConfig) -> None:
    """The WSD decay fits after warmup; its keys are not set for another schedule."""
    if t.schedule != "wsd":
        if t.decay_steps is not None:
            raise ConfigError(f"training.decay_steps: only for training.schedule: wsd, got {t.schedule!r}")
        return
    if not 0 < t.decay_ratio <= 1:
        raise ConfigError(f"training.decay_ratio: must be in (0, 1], got {t.decay_ratio}")
    key = "training.decay_steps" if t.decay_steps is not None else "training.decay_ratio"
    if not 1 <= t.wsd_decay_steps() <= t.max_steps - t.warmup_steps:
        raise ConfigError(
            f"{key}: a decay of {t.wsd_decay_steps()} steps does not fit between warmup_steps="
            f"{t.warmup_steps} and max_steps={t.max_steps} (1 to {t.max_steps - t.warmup_steps} steps)"
        )


def _validate_long_runs(t: TrainingConfig, ck: CheckpointingConfig) -> None:
    """Preemption signals are catchable; scheduled and kept steps lie in the run; branch_from starts a run."""
    catchable = sorted(set(signal.Signals.__members__) - {"SIGKILL", "SIGSTOP"})
    for name in t.preempt_signals:
        if name not in catchable:
            raise ConfigError(
                f"training.preempt_signals: {name!r} is not a signal a process can handle "
                "(e.g. SIGTERM, SIGUSR1)"
            )
    if t.preempt_timeout <= 0:
        raise ConfigError(f"training.preempt_timeout: must be positive, got {t.preempt_timeout}")
    for key, steps in (("save_steps", ck.save_steps), ("keep_state_steps", ck.keep_state_steps)):
        for step in steps:
            if not 0 <= step <= t.max_steps:
                raise ConfigError(
                    f"checkpointing.{key}: step {step} is outside the run (0 to max_steps={t.max_steps})"
                )
    if ck.keep_state_last is not None and ck.keep_state_last < 1:
        raise ConfigError(
            f"checkpointing.keep_state_last: must be at least 1 (the step `latest` names) or null, "
            f"got {ck.keep_state_last}"
        )
    if ck.branch_from is not None and ck.resume not in ("auto", "never"):
        raise ConfigError(
            f"checkpointing.branch_from: starts a new run, so checkpointing.resume must be auto or never, "
            f"got {ck.resume!r}"
        )


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), cls: type[Config] = Config
) -> Config:
    """Load a YAML config (or the defaults), apply `section.key=value` overrides, validate;
    raise ConfigError. `cls`: a Config subclass whose extra dataclass fields are a fork's own sections."""
    cfg = build(cls, load_tree(path, overrides), "")
    _validate(cfg)
    return cfg


def load_model_config(path: str | Path) -> PicoDecoderConfig:
    """The PicoDecoderConfig of the `model:` section of YAML config `path`; other sections (a fork's own
    included) are not read, so any run's config.yaml names its model. Raises ConfigError."""
    model = build(ModelConfig, section(load_tree(path), "model"), "model")
    return Config(model=model).model_config()


START_KEYS = (  # how a run starts
    "checkpointing.run_dir",
    "checkpointing.resume",
    "checkpointing.overwrite",
    "checkpointing.branch_from",
)


def resume_changes(old: dict, cfg: Config, where: str) -> dict[str, list]:
    """{key: [old value, new value]} of the settings that `cfg` changes from `old` (the resumed run's
    config, read from `where`), each a key its section lists in `changeable_on_resume`. A ConfigError names
    the first other key that differs, with both values, or a section only one side has. Not compared: the
    `model:` section (pico.checkpoint.check_model_config compares the resolved model) and START_KEYS."""
    sections = {f.name for f in dataclasses.fields(cfg)} - {"model"}
    odd = sorted(sections ^ (set(old) - {"model"}))
    if odd:
        raise ConfigError(
            f"{odd[0]}: a config section of {'this recipe' if odd[0] in sections else where} only (a run of "
            "another recipe?); resume it with the recipe that trained it"
        )
    changes = {}
    for name in sorted(sections):
        changes |= _section_changes(getattr(cfg, name), {} if old[name] is None else old[name], name, where)
    return changes


def _section_changes(section_cfg, old: dict, prefix: str, where: str) -> dict[str, list]:
    """`resume_changes` of one section (a dataclass instance); a key `old` lacks counts as its default."""
    if not isinstance(old, dict):
        raise ConfigError(f"{prefix}: expected a mapping in {where}, got {old!r}")
    changes, changeable = {}, getattr(section_cfg, "changeable_on_resume", ())
    for f in dataclasses.fields(section_cfg):
        key, value = f"{prefix}.{f.name}", getattr(section_cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes |= _section_changes(value, old.get(f.name, {}), key, where)
            continue
        new = _plain(value)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        before = old.get(f.name, _plain(default))
        if before == new or key in START_KEYS:
            continue
        if f.name not in changeable:
            raise ConfigError(
                f"{key}: {before!r} in {where}, {new!r} now; it may not change on resume "
                '(docs/checkpoints.md, "Changing settings on resume"); start a new run in another '
                "checkpointing.run_dir"
            )
        changes[key] = [before, new]
    return changes


def _plain(value):
    """A config value as config.yaml holds it (dataclasses as mappings)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
