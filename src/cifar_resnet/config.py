"""Typed settings: the one place where Hydra's DictConfig becomes plain objects.

Over 300 lines on purpose: every stage's settings and the one generic type check,
so that a key's type and range are checked in one place. The defaults are the
YAML's under conf/ (none here).

Stages call ``train_settings(cfg)`` once; everything below them takes these
dataclasses or plain values. Unknown keys are an error, so a misspelt override
(``optim.learning_rate=...``) fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .batch_augment import BatchAugment
from .errors import UserError
from .hardware import DEVICES, PRECISIONS
from .tta import TTA_VIEWS


class ConfigError(UserError, ValueError):
    """A configuration that cannot be trained; the message says which key and why."""


@dataclass(frozen=True)
class ModelSettings:
    name: str
    max_params: int
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class DataSettings:
    root: str
    download: bool
    md5_file: str | None
    val_size: int
    split_seed: int
    train_subset: int
    repeats: int
    loader: str
    num_workers: int


@dataclass(frozen=True)
class AugmentSettings:
    name: str
    # The Albumentations pipeline's arguments (augment.py), for data.loader=albumentations;
    # null where the augmentation has no per-image version.
    params: dict[str, Any] | None
    # batch_augment.BatchAugment's, for data.loader=tensor; null where it has no batched one.
    tensor: dict[str, Any] | None


@dataclass(frozen=True)
class OptimSettings:
    name: str
    lr: float
    momentum: float
    nesterov: bool
    betas: tuple[float, float]
    weight_decay: float
    lookahead_k: int
    lookahead_alpha: float
    lookahead_ramp: bool  # alpha ramps from 1 to lookahead_alpha (cubic) over the run
    lookahead_buffers: bool  # BN running statistics are pulled and synced too
    norm_lr_scale: float  # BatchNorm parameters train this many times faster
    norm_decay: bool  # decay BatchNorm parameters too (at the weights' lr * wd)
    muon_lr: float  # name=muon: the conv filters' step (orthogonalised, scale-free)
    muon_momentum: float
    stem_bias_schedule: str  # freeze | anneal: how a whitened net's stem bias trains
    sam_rho: float  # SAM's radius: each step's gradient is taken at w + e(w); 0 = off
    sam_adaptive: bool  # ASAM: the radius is relative to each weight's size


@dataclass(frozen=True)
class ScheduleSettings:
    name: str
    pct_start: float
    anneal_strategy: str
    div_factor: float
    final_div_factor: float


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    batch_size: int
    label_smoothing: float
    precision: str
    channels_last: bool
    compile: bool
    grad_clip: float
    patience: int
    ema_decay: float
    eval_batch_size: int
    device: str
    threads: int  # torch's CPU threads; 0 = every core this process may use
    deterministic: bool  # PyTorch's deterministic algorithms (slower on CUDA)
    sync_bn: bool  # under torchrun: SyncBatchNorm (CUDA only) instead of per-process BN
    dist_timeout_minutes: float  # under torchrun: how long a collective waits for a rank
    test: bool  # read the test set once at the end; false: a run that only chooses settings
    checkpoint_dir: str
    keep_checkpoints: bool  # after the run FINISHED (its files are in MLflow)
    progress: bool
    tta: str


@dataclass(frozen=True)
class RegistrySettings:
    model_name: str
    register: bool


@dataclass(frozen=True)
class TrainSettings:
    model: ModelSettings
    data: DataSettings
    augment: AugmentSettings
    optim: OptimSettings
    schedule: ScheduleSettings
    train: LoopSettings
    registry: RegistrySettings
    seed: int
    experiment_name: str
    resume: str | None
    recipe: str | None
    settings_from_run: str | None  # a final fit's val_acc comes from this run


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
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    hints = _field_types(cls)
    typed = {
        name: _typed(_key(section, name), value, hints[name]) for name, value in values.items()
    }
    try:
        return cls(**typed)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"config section {section!r}: {err}") from None


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _key(section: str, name: str) -> str:
    return name if section == "top level" else f"{section}.{name}"


_INVALID = object()


def _typed(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's annotation wants it (an int for a float field becomes a
    float, a list for a tuple field a tuple), or a ConfigError naming the key, the value
    and what is allowed."""
    converted = _convert(value, annotation)
    if converted is _INVALID:
        hint = ""
        if _without_none(annotation) is str and isinstance(value, (bool, float)):
            # Hydra reads an unquoted 1.10 or true as a number or a bool, not as text.
            hint = f"; quote it to keep it text: {key}='...'"
        raise ConfigError(f"{key} must be {_describe(annotation)}, got {_show(value)}{hint}")
    return converted


def _convert(value: Any, annotation: Any) -> Any:
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _INVALID
        for option in args:
            if option is not type(None) and (done := _convert(value, option)) is not _INVALID:
                return done
        return _INVALID
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else _INVALID
    if annotation is bool:  # never 0/1 or "yes": Hydra has already typed true and false
        return value if isinstance(value, bool) else _INVALID
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return _INVALID  # value != value: nan passes every range check
        return float(value)
    if annotation is str:
        # Hydra reads promote.version=3 or study_name=2024 as ints; as names they are text,
        # and str() of an int loses nothing (Hydra never reads 007 as an int).
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) else _INVALID
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return _INVALID
        inner = args[1] if args else Any
        items = {k: _convert(v, inner) for k, v in value.items()}
        return _INVALID if _INVALID in items.values() else items
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            return _INVALID
        items = tuple(_convert(v, args[0]) for v in value)
        return _INVALID if _INVALID in items else items
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _INVALID
        items = tuple(_convert(v, a) for v, a in zip(value, args))
        return _INVALID if _INVALID in items else items
    raise TypeError(f"config.py has no check for fields annotated {annotation!r}")


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _describe(annotation: Any) -> str:
    """What a field annotated ``annotation`` accepts, in words."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [_describe(a) for a in typing.get_args(annotation) if a is not type(None)]
        if type(None) in typing.get_args(annotation):
            options.append("null")
        return " or ".join(options)
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        return f"a list, each {_describe(typing.get_args(annotation)[0])}"
    if typing.get_origin(annotation) is tuple:
        kinds = sorted({_describe(a) for a in typing.get_args(annotation)})
        return f"a list of {len(typing.get_args(annotation))}, each {' or '.join(kinds)}"
    if dataclasses.is_dataclass(annotation):
        return f"a {annotation.__name__} mapping"
    args = typing.get_args(annotation)
    if (
        typing.get_origin(annotation) is dict
        and len(args) == 2
        and typing.get_origin(args[1]) is dict
    ):
        return "a mapping of mappings"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        dict: "a mapping",
    }.get(typing.get_origin(annotation) or annotation, repr(annotation))


def _show(value: Any) -> str:
    """A value as it would be written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def train_settings(cfg: DictConfig | dict) -> TrainSettings:
    """The train config (a composed DictConfig or its plain dict) as TrainSettings.

    Raises ConfigError, before anything is read or logged, for an unknown key, a value
    of the wrong type (``train.epochs=1.5``) or out of range (``train.epochs=0``): the
    message names the key, the value and what is allowed.
    """
    values = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    sections = ("model", "data", "augment", "optim", "schedule", "train", "registry")
    built = {name: _build(SECTIONS[name], name, values.pop(name, {})) for name in sections}
    settings = _build(TrainSettings, "top level", {**values, **built})
    validate(settings)
    return settings


def validate(s: TrainSettings) -> None:
    """Checks that need no data: they run before anything is read or logged.

    Raises ConfigError naming the first key out of range."""
    if s.train.epochs < 1:
        raise ConfigError(f"train.epochs must be a positive integer, got {s.train.epochs}")
    if s.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be positive, got {s.train.batch_size}")
    if s.settings_from_run and s.data.val_size > 0:
        raise ConfigError(
            f"settings_from_run={s.settings_from_run} is for a final fit on all "
            f"the training images (data.val_size=0); with data.val_size="
            f"{s.data.val_size} the run has a val_acc of its own"
        )
    if s.data.val_size < 0 or s.data.train_subset < 0 or s.data.repeats < 1:
        raise ConfigError("data.val_size and data.train_subset must be >= 0 and data.repeats >= 1")
    if s.data.loader not in ("albumentations", "tensor"):
        raise ConfigError(
            f"data.loader must be 'albumentations' or 'tensor', got {s.data.loader!r}"
        )
    if s.data.loader == "tensor" and s.augment.tensor is None:
        raise ConfigError(
            f"augment={s.augment.name} has no batched version; use data.loader=albumentations"
        )
    if s.data.loader == "albumentations" and s.augment.params is None:
        raise ConfigError(
            f"augment={s.augment.name} has no per-image (Albumentations) version; "
            "use data.loader=tensor"
        )
    if s.data.loader == "tensor":
        _check_batch_augment(s.augment.tensor)
    _check_machine("train", s.train.device, s.train.precision)
    if s.train.tta not in TTA_VIEWS:  # else a long run would fail at its very end
        raise ConfigError(
            f"train.tta must be a view set ({', '.join(TTA_VIEWS)}), got {s.train.tta!r}"
        )
    if s.train.threads < 0:
        raise ConfigError(
            f"train.threads must be >= 0 (0 = every usable core), got {s.train.threads}"
        )
    if not 0.0 <= s.train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {s.train.label_smoothing}")
    if s.optim.lr <= 0 or s.optim.norm_lr_scale <= 0:
        raise ConfigError(
            f"optim.lr and optim.norm_lr_scale must be positive, "
            f"got {s.optim.lr} and {s.optim.norm_lr_scale}"
        )
    # Ranges that torch or the loop would otherwise refuse only after the data is read.
    _require(s.model.max_params >= 1, "model.max_params", s.model.max_params, ">= 1")
    _require(s.data.num_workers >= 0, "data.num_workers", s.data.num_workers, ">= 0")
    _require(s.train.eval_batch_size >= 1, "train.eval_batch_size", s.train.eval_batch_size, ">= 1")
    _require(s.train.patience >= 0, "train.patience", s.train.patience, ">= 0 (0 = off)")
    _require(s.train.grad_clip >= 0, "train.grad_clip", s.train.grad_clip, ">= 0 (0 = off)")
    _require(
        s.train.dist_timeout_minutes > 0,
        "train.dist_timeout_minutes",
        s.train.dist_timeout_minutes,
        "> 0",
    )
    _require(
        0 <= s.train.ema_decay < 1, "train.ema_decay", s.train.ema_decay, "in [0, 1) (0 = off)"
    )
    o = s.optim
    _require(0 <= o.momentum <= 1, "optim.momentum", o.momentum, "in [0, 1]")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "in [0, 1) each")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _require(o.lookahead_k >= 0, "optim.lookahead_k", o.lookahead_k, ">= 0 (0 = off)")
    _require(0 < o.lookahead_alpha <= 1, "optim.lookahead_alpha", o.lookahead_alpha, "in (0, 1]")
    _require(o.muon_lr > 0, "optim.muon_lr", o.muon_lr, "> 0")
    _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", o.muon_momentum, "in [0, 1)")
    _require(0 <= o.sam_rho < float("inf"), "optim.sam_rho", o.sam_rho, ">= 0 and finite (0 = off)")
    if o.sam_adaptive and o.sam_rho == 0:
        raise ConfigError("optim.sam_adaptive=true needs optim.sam_rho > 0 (ASAM's: about 0.5)")
    _require(
        o.stem_bias_schedule in ("freeze", "anneal"),
        "optim.stem_bias_schedule",
        o.stem_bias_schedule,
        "'freeze' or 'anneal'",
    )
    c = s.schedule
    _require(0 <= c.pct_start <= 1, "schedule.pct_start", c.pct_start, "in [0, 1]")
    _require(
        c.anneal_strategy in ("cos", "linear"),
        "schedule.anneal_strategy",
        c.anneal_strategy,
        "'cos' or 'linear'",
    )
    _require(c.div_factor > 0, "schedule.div_factor", c.div_factor, "> 0")
    _require(c.final_div_factor > 0, "schedule.final_div_factor", c.final_div_factor, "> 0")


def _check_batch_augment(values: dict[str, Any]) -> None:
    """augment.tensor's keys, types and ranges, checked by building the BatchAugment that
    the tensor path will build: ConfigError naming the key, as for any other section."""
    try:
        _build(BatchAugment, "augment.tensor", values)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"augment.tensor.{err}") from None


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {_show(value)}")


def _check_machine(section: str, device: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"{section}.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if str(device).split(":")[0] not in DEVICES:
        raise ConfigError(
            f"{section}.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"
        )


def recipe_line(requested: str | None, recipe: str | None, device: object) -> str:
    """What a stage prints about its recipe: ``recipe auto -> fast (device cpu)`` where
    it chose one for the device (``requested`` "auto"), ``recipe fast`` where the config
    named it, ``recipe none (~recipe: the base config)`` where it dropped it."""
    if requested:
        return f"recipe {requested} -> {recipe} (device {device})"
    return f"recipe {recipe}" if recipe else "recipe none (~recipe: the base config)"


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
    space: dict[str, Any] | None
    n_trials: int | None  # this process's trials (any state); None: no cap of its own
    max_trials: int | None  # the whole study's: complete + pruned + running, all workers
    timeout: float | None
    epochs: int
    max_failed_trials: int
    sampler_seed: int | None  # trial n samples with seed + n; None: the OS's randomness
    startup_trials: int
    constant_liar: bool
    pruner: str
    pruners: dict[str, dict[str, Any]]
    heartbeat_interval: int | None
    grace_period: int | None

    def __post_init__(self):
        if self.epochs < 1 or self.max_failed_trials < 1:
            raise ConfigError(
                "tune.epochs and tune.max_failed_trials must be positive, got "
                f"{self.epochs}, {self.max_failed_trials}"
            )
        for name in ("n_trials", "max_trials"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"tune.{name}", value, ">= 1 or null")
        if self.n_trials is None and self.max_trials is None and self.timeout is None:
            raise ConfigError(
                "tune needs a limit: set tune.n_trials (this process), tune.max_trials "
                "(the whole study) or tune.timeout (seconds)"
            )
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"tune.timeout must be positive seconds or null, got {self.timeout}")
        if self.pruner not in PRUNERS:
            raise ConfigError(
                f"tune.pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}"
            )
        if not self.study_name or not self.storage:
            raise ConfigError("tune.study_name and tune.storage must not be empty")
        _require(self.startup_trials >= 0, "tune.startup_trials", self.startup_trials, ">= 0")
        for name in ("heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"tune.{name}", value, ">= 1 second or null")


@dataclass(frozen=True)
class FinetuneSettings:
    model_uri: str
    from_study: str | None
    storage: str


@dataclass(frozen=True)
class EvalSettings:
    model_uri: str
    device: str
    precision: str
    batch_size: int

    def __post_init__(self):
        _check_machine("eval", self.device, self.precision)
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class PromoteSettings:
    metric: str
    version: str | None
    force: bool
    # Ranking on a test_* metric picks the champion on the data its figure is reported on.
    allow_test_selection: bool
    alias: str
    previous_alias: str


def section_settings(cls, section: str, values: Any):
    """One config section as ``cls``; unknown keys are an error, as in train_settings.

    Raises ConfigError for a key ``cls`` does not have, a missing required key, or a
    value of the wrong type or out of range (the message names the key and the value).
    """
    return _build(cls, section, values)


# Each section's dataclass, by its name in the composed configs; keys without a dot are
# TrainSettings' own (seed, experiment_name, ...).
SECTIONS = {
    "model": ModelSettings,
    "data": DataSettings,
    "augment": AugmentSettings,
    "optim": OptimSettings,
    "schedule": ScheduleSettings,
    "train": LoopSettings,
    "registry": RegistrySettings,
    "tune": TuneSettings,
    "finetune": FinetuneSettings,
    "eval": EvalSettings,
    "promote": PromoteSettings,
}


def key_type(key: str) -> type:
    """The type a config key holds, from its dataclass field, without Optional:
    ``key_type("train.epochs") is int``, ``key_type("finetune.from_study") is str``.

    Raises KeyError for a key that no section declares.
    """
    section, _, name = key.rpartition(".")
    cls = SECTIONS[section] if section else TrainSettings
    annotation = _without_none(_field_types(cls)[name])
    return typing.get_origin(annotation) or annotation
