"""Typed settings: the one place where Hydra's DictConfig becomes plain objects.

Stages call ``train_settings(cfg)`` once; everything below them takes these
dataclasses or plain values. Unknown keys are an error, so a misspelt override
(``optim.learning_rate=...``) fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .hardware import DEVICES, PRECISIONS
from .tta import TTA_VIEWS


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message says which key and why."""


@dataclass(frozen=True)
class ModelSettings:
    name: str
    max_params: int = 5_000_000
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSettings:
    root: str = "./data"
    download: bool = True
    md5_file: str | None = None
    val_size: int = 5000
    split_seed: int = 0
    train_subset: int = 0
    repeats: int = 1
    loader: str = "albumentations"
    num_workers: int = 2


@dataclass(frozen=True)
class AugmentSettings:
    name: str = "standard"
    params: dict[str, Any] = field(default_factory=dict)
    tensor: dict[str, Any] | None = None


@dataclass(frozen=True)
class OptimSettings:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    lookahead_ramp: bool = False  # alpha ramps from 1 to lookahead_alpha (cubic) over the run
    norm_lr_scale: float = 1.0  # BatchNorm parameters train this many times faster
    norm_decay: bool = False  # decay BatchNorm parameters too (at the weights' lr * wd)
    muon_lr: float = 0.24  # name=muon: the conv filters' step (orthogonalised, scale-free)
    muon_momentum: float = 0.6


@dataclass(frozen=True)
class ScheduleSettings:
    name: str = "onecycle"
    pct_start: float = 0.25
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4


@dataclass(frozen=True)
class LoopSettings:
    epochs: int = 50
    batch_size: int = 512
    label_smoothing: float = 0.1
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: float = 0.0
    patience: int = 0
    ema_decay: float = 0.0
    eval_batch_size: int = 1024
    device: str = "auto"
    threads: int = 0  # torch's CPU threads; 0 = every core this process may use
    checkpoint_dir: str = "checkpoints"
    progress: bool = True
    tta: str = "none"


@dataclass(frozen=True)
class RegistrySettings:
    model_name: str = "cifar10-resnet"
    register: bool = True


@dataclass(frozen=True)
class TrainSettings:
    model: ModelSettings
    data: DataSettings
    augment: AugmentSettings
    optim: OptimSettings
    schedule: ScheduleSettings
    train: LoopSettings
    registry: RegistrySettings
    seed: int = 0
    experiment_name: str = "cifar10-resnet"
    resume: str | None = None
    recipe: str | None = None


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts, without Hydra's own node."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


def _build(cls, section: str, values: Any):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"config section {section!r}: {err}") from None


def train_settings(cfg: DictConfig | dict) -> TrainSettings:
    values = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    sections = {"model": ModelSettings, "data": DataSettings, "augment": AugmentSettings,
                "optim": OptimSettings, "schedule": ScheduleSettings, "train": LoopSettings,
                "registry": RegistrySettings}
    built = {name: _build(cls, name, values.pop(name, {})) for name, cls in sections.items()}
    settings = _build(TrainSettings, "top level", {**values, **built})
    validate(settings)
    return settings


def validate(s: TrainSettings) -> None:
    """Checks that need no data: they run before anything is read or logged."""
    if s.train.epochs < 1:
        raise ConfigError(f"train.epochs must be a positive integer, got {s.train.epochs}")
    if s.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be positive, got {s.train.batch_size}")
    if s.data.val_size < 0 or s.data.train_subset < 0 or s.data.repeats < 1:
        raise ConfigError("data.val_size and data.train_subset must be >= 0 and data.repeats >= 1")
    if s.data.loader not in ("albumentations", "tensor"):
        raise ConfigError(f"data.loader must be 'albumentations' or 'tensor', got {s.data.loader!r}")
    if s.data.loader == "tensor" and s.augment.tensor is None:
        raise ConfigError(f"augment={s.augment.name} has no batched version; "
                          "use data.loader=albumentations")
    _check_machine("train", s.train.device, s.train.precision)
    if s.train.tta not in TTA_VIEWS:  # else a long run would fail at its very end
        raise ConfigError(f"train.tta must be a view set ({', '.join(TTA_VIEWS)}), "
                          f"got {s.train.tta!r}")
    if s.train.threads < 0:
        raise ConfigError(f"train.threads must be >= 0 (0 = every usable core), "
                          f"got {s.train.threads}")
    if not 0.0 <= s.train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {s.train.label_smoothing}")
    if s.optim.lr <= 0 or s.optim.norm_lr_scale <= 0:
        raise ConfigError(f"optim.lr and optim.norm_lr_scale must be positive, "
                          f"got {s.optim.lr} and {s.optim.norm_lr_scale}")


def _check_machine(section: str, device: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{section}.precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {precision!r}")
    if str(device).split(":")[0] not in DEVICES:
        raise ConfigError(f"{section}.device must be auto, cpu, cuda, cuda:N or mps, "
                          f"got {device!r}")


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; lists stay whole."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------- other stages
# tune and finetune add a section to the train config; eval_tta, promote and report
# have small configs of their own. Each section is typed here, once, like train's.

PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "threshold", "none")
SEARCH_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class TuneSettings:
    study_name: str
    storage: str
    space: dict[str, Any] | None = None
    n_trials: int = 20
    timeout: float | None = None
    epochs: int = 10
    max_failed_trials: int = 5
    sampler_seed: int = 0
    startup_trials: int = 5
    pruner: str = "median"
    pruners: dict[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat_interval: int | None = 60
    grace_period: int | None = None

    def __post_init__(self):
        _as_text(self, "study_name", "storage")
        if self.n_trials < 1 or self.epochs < 1 or self.max_failed_trials < 1:
            raise ConfigError("tune.n_trials, tune.epochs and tune.max_failed_trials must be "
                              f"positive, got {self.n_trials}, {self.epochs}, "
                              f"{self.max_failed_trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"tune.timeout must be positive seconds or null, got {self.timeout}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"tune.pruner must be one of {', '.join(PRUNERS)}, "
                              f"got {self.pruner!r}")
        if not self.study_name or not self.storage:
            raise ConfigError("tune.study_name and tune.storage must not be empty")


@dataclass(frozen=True)
class FinetuneSettings:
    model_uri: str
    from_study: str | None = None
    storage: str = "sqlite:///optuna.db"

    def __post_init__(self):
        _as_text(self, "model_uri", "from_study", "storage")


@dataclass(frozen=True)
class EvalSettings:
    model_uri: str
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 500

    def __post_init__(self):
        _as_text(self, "model_uri")
        _check_machine("eval", self.device, self.precision)
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class PromoteSettings:
    metric: str = "val_acc"
    version: str | None = None
    force: bool = False
    alias: str = "champion"
    previous_alias: str = "previous"

    def __post_init__(self):
        _as_text(self, "metric", "version", "alias", "previous_alias")


def _as_text(settings, *names: str) -> None:
    """Hydra reads `study_name=2024` as an int and `nan` as a float: names are text."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and not isinstance(value, str):
            object.__setattr__(settings, name, str(value))


def section_settings(cls, section: str, values: Any):
    """One config section as ``cls``; unknown keys are an error, as in train_settings."""
    return _build(cls, section, values)
