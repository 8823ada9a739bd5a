"""Hyperparameter search: an Optuna study over the train config, one MLflow child
run per trial.

- The search space lives in conf/tune/: a tree that mirrors the config, whose
  leaves say how to sample that key (``{type: float, log: true, factor: 10}``
  samples log-uniformly from value/10 to value*10 around the composed config's
  own value; ``low``/``high`` give absolute bounds; ``choices`` a categorical).
- Trials train on the train split and are scored on the validation split (best
  epoch); the test split is emptied before the first trial, so no trial can read it.
- The study lives in an RDB storage (SQLite by default), so a killed search
  resumes and several processes can share one study. ``n_trials`` is the study's
  target of finished (complete or pruned) trials, whoever ran them.
- A trial whose loss goes NaN (or that runs out of device memory) is recorded as
  failed and the study goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from . import data, engine, tracking, training
from .config import SEARCH_TYPES, ConfigError, TrainSettings, TuneSettings, train_settings
from .stages import UserError

# Heartbeats and the matplotlib plots are marked experimental; they work and are used on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Failures that say something about the sampled values, not about the code.
TRIAL_FAILURES = (engine.NonFiniteLossError, torch.OutOfMemoryError)
STATE_TAG = "optuna.state"
RUN_ID_ATTR = "mlflow_run_id"


class StudyError(UserError):
    """A study or storage that does not exist or cannot be used."""


# --------------------------------------------------------------------------- search space


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # dotted config path, also the Optuna parameter name
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


_LEAF_KEYS = {"type", "low", "high", "log", "step", "factor", "choices"}


def parse_space(space: dict | None, config: dict) -> list[Param]:
    """The conf/tune tree -> parameters, checked against the train config."""
    leaves: list[tuple[str, dict]] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            raise ConfigError(f"tune.space.{path}: expected a mapping, got {node!r}")
        if "type" in node:
            leaves.append((path, node))
            return
        for key, child in node.items():
            walk(child, f"{path}.{key}" if path else str(key))

    walk(space or {}, "")
    if not leaves:
        raise ConfigError("tune.space is empty: there is nothing to search; pick a space "
                          "(tune=default or tune=seed) or add parameters under tune.space")
    return [_param(key, spec, config) for key, spec in leaves]


def _param(key: str, spec: dict, config: dict) -> Param:
    where = f"tune.space.{key}"
    unknown = set(spec) - _LEAF_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_LEAF_KEYS))}")
    kind = spec["type"]
    if kind not in SEARCH_TYPES:
        raise ConfigError(f"{where}.type must be one of {', '.join(SEARCH_TYPES)}, got {kind!r}")
    current = get_dotted(config, key, where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not choices:
            raise ConfigError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
        return Param(key, kind, choices=tuple(choices))
    log = bool(spec.get("log", False))
    if "factor" in spec:
        factor = float(spec["factor"])
        if not isinstance(current, (int, float)) or current <= 0 or factor <= 1:
            raise ConfigError(f"{where}: 'factor' needs a positive config value and a factor "
                              f"> 1; got value {current!r} and factor {factor}")
        low, high = current / factor, current * factor
    elif "low" in spec and "high" in spec:
        low, high = float(spec["low"]), float(spec["high"])
    else:
        raise ConfigError(f"{where}: give 'low' and 'high', or 'factor' (around the config's "
                          "value)")
    if not low < high or (log and low <= 0):
        raise ConfigError(f"{where}: need low < high (and low > 0 with log), got {low}..{high}")
    return Param(key, kind, low, high, log, spec.get("step"))


def get_dotted(config: dict, key: str, where: str = "") -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where or key}: the config has no key {key!r}")
        node = node[part]
    return node


def with_values(config: dict, values: dict[str, Any]) -> dict:
    """A copy of ``config`` with dotted keys set (keys must exist: no silent typos)."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        get_dotted(out, key)
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out


# --------------------------------------------------------------------------- study


def describe_storage(url: str) -> str:
    """The storage URL without its password, for logs and params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all; open_storage will say so
        return url


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_trial_callback: Callable | None = None,
                 must_exist: bool = False) -> optuna.storages.RDBStorage:
    """Any SQLAlchemy URL; SQLite waits on locks instead of failing at once, since
    the heartbeat thread and other workers write to the same file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises ArgumentError
        raise StudyError(f"storage {url!r} is not a SQLAlchemy URL ({err}); e.g. "
                         "sqlite:///optuna.db or postgresql://user@host/db") from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}
        path = parsed.database
        if must_exist and (not path or not Path(path).is_file()):
            raise StudyError(f"no Optuna storage at {url} (file {path!r} does not exist)")
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period, heartbeat_stale_trial_callback=stale_trial_callback)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        raise StudyError(f"cannot open storage {describe_storage(url)}: "
                         f"{type(err).__name__}: {err}") from None


def load_study(name: str, storage_url: str) -> optuna.Study:
    """An existing study, read-only use (finetune's from_study)."""
    storage = open_storage(storage_url, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = optuna.get_all_study_names(storage)
        raise StudyError(f"no study {name!r} in {describe_storage(storage_url)}; studies there: "
                         f"{', '.join(known) or 'none'}") from None


def best_params(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict[str, Any]]:
    try:
        best = study.best_trial
    except ValueError:
        raise StudyError(f"study {study.study_name!r} has no complete trial yet") from None
    return best, dict(best.params)


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    kwargs = dict(settings.pruners.get(settings.pruner) or {})
    classes = {"median": optuna.pruners.MedianPruner,
               "percentile": optuna.pruners.PercentilePruner,
               "hyperband": optuna.pruners.HyperbandPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "threshold": optuna.pruners.ThresholdPruner,
               "none": optuna.pruners.NopPruner}
    if settings.pruner == "hyperband":
        kwargs.setdefault("max_resource", settings.epochs)  # one resource = one epoch
    try:
        return classes[settings.pruner](**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tune.pruners.{settings.pruner}: {err}") from None


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def state_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
             TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
    return {f"trials_{name}": sum(t.state == state for t in trials)
            for state, name in names.items()}


def mark_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback: a trial whose process died is failed in Optuna; close its
    MLflow run too, which nobody else will."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tracking.close_killed_run(run_id, {STATE_TAG: "failed",
                                           "failure": "process killed (heartbeat stopped)"})
    print(f"trial {trial.number} of a killed process marked failed", flush=True)


class StopAfterFailures:
    """Count this process's trials and stop it after ``limit`` failed ones: a space
    where every trial diverges would otherwise never reach n_trials finished ones."""

    def __init__(self, limit: int):
        self.limit, self.failed, self.ran = limit, 0, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran += 1
        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.failed >= self.limit:
                print(f"stopping: {self.failed} failed trials in this process "
                      "(tune.max_failed_trials)", flush=True)
                study.stop()


# --------------------------------------------------------------------------- trials


class PruningLogger:
    """engine.EpochLogger: log the epoch to the trial's MLflow run, report val_acc
    to Optuna, and raise TrialPruned out of ``fit`` when the pruner says so."""

    def __init__(self, trial: optuna.Trial, run_id: str):
        self.trial = trial
        self.run_metrics = tracking.EpochMetricLogger(run_id)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run_metrics.log_epoch(epoch, metrics)
        self.trial.report(metrics["val_acc"], step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} "
                                     f"(val_acc {metrics['val_acc']:.4f})")


def without_test_set(splits: data.CifarSplits) -> data.CifarSplits:
    """Trials choose hyperparameters: they must never see the test split."""
    return dataclasses.replace(splits, test_images=splits.test_images[:0],
                               test_labels=splits.test_labels[:0])


def fit_trial(settings: TrainSettings, splits: data.CifarSplits, device: torch.device,
              logger) -> engine.TrainState:
    # The one training path: seeded before the network is built, so every trial starts
    # from the same weights and trials differ by their hyperparameters only.
    return training.train(settings, splits, device, logger=logger)[1]


class Objective:
    """Validation accuracy (best epoch) of one trial's training."""

    def __init__(self, config: dict, space: list[Param], splits: data.CifarSplits,
                 device: torch.device, epochs: int, precision: str):
        """``device`` and ``precision`` (resolved: fp32, bf16 or fp16) are the study
        process's, decided once by ``pipeline.prepare_machine``."""
        if len(splits.val_labels) == 0:
            raise ConfigError("tune needs a validation split: data.val_size must be > 0")
        self.config, self.space, self.splits, self.device = config, space, splits, device
        self.epochs, self.precision = epochs, precision

    def __call__(self, trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in self.space}
        settings = train_settings(with_values(self.config, {**params, "train.epochs": self.epochs,
                                                            "train.precision": self.precision}))
        pruned = None
        with tracking.nested_run(f"trial {trial.number}",
                                 tags={"optuna.trial_number": trial.number}) as run:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            tracking.log_params({**params, "trial_number": trial.number,
                                 "train.epochs": self.epochs})
            try:
                state = fit_trial(settings, self.splits, self.device,
                                  PruningLogger(trial, run.info.run_id))
            except optuna.TrialPruned as err:
                pruned = err
                tracking.set_tags({STATE_TAG: "pruned"})
            except Exception as err:
                tracking.set_tags({STATE_TAG: "failed",
                                   "failure": f"{type(err).__name__}: {err}"[:5000]})
                raise  # the run ends FAILED; Optuna records FAIL (TRIAL_FAILURES) or stops
            else:
                tracking.set_tags({STATE_TAG: "complete"})
                tracking.log_metrics({"best_val_acc": state.best_val_acc,
                                      "best_epoch": state.best_epoch})
        if pruned is not None:
            raise pruned
        return state.best_val_acc


# --------------------------------------------------------------------------- the search


def make_sampler(settings: TuneSettings, trials_so_far: int) -> optuna.samplers.TPESampler:
    # The seed moves on with the study, so a resumed search does not re-draw the
    # random start-up values its first process already tried.
    return optuna.samplers.TPESampler(seed=settings.sampler_seed + trials_so_far,
                                      n_startup_trials=settings.startup_trials)


def open_study(settings: TuneSettings) -> optuna.Study:
    storage = open_storage(settings.storage, settings.heartbeat_interval, settings.grace_period,
                           mark_killed)
    try:
        study = optuna.create_study(study_name=settings.study_name, storage=storage,
                                    direction="maximize", load_if_exists=True,
                                    pruner=make_pruner(settings))
    except ValueError as err:  # e.g. an existing study with another direction
        raise StudyError(f"study {settings.study_name!r}: {err}") from None
    study.sampler = make_sampler(settings, len(study.get_trials(deepcopy=False)))
    return study


def optimize(study: optuna.Study, objective: Objective, settings: TuneSettings) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; returns how many
    this process ran."""
    missing = settings.n_trials - finished_count(study)
    if missing <= 0:
        print(f"study {study.study_name!r} already has {finished_count(study)} finished "
              f"trials (n_trials={settings.n_trials}); nothing to run", flush=True)
        return 0
    print(f"study {study.study_name!r}: {finished_count(study)} finished trials, running "
          f"up to {missing} more", flush=True)
    failures = StopAfterFailures(settings.max_failed_trials)
    # gc after each trial: a failed trial's model and optimizer leave device memory at once.
    study.optimize(objective, timeout=settings.timeout, catch=TRIAL_FAILURES, gc_after_trial=True,
                   callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED),
                              failures])
    return failures.ran


def log_summary(study: optuna.Study) -> dict[str, Any]:
    """On the active (parent) run: trial counts, best trial, trials table and plots."""
    counts = state_counts(study)
    tracking.log_metrics(counts)
    summary: dict[str, Any] = dict(counts)
    trials = study.trials_dataframe()
    if len(trials):
        tracking.log_text(trials.to_csv(index=False), "trials.csv")
    if counts["trials_complete"]:
        best = study.best_trial
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params)
        tracking.log_metrics({"best_val_acc": best.value, "best_trial": best.number})
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracking.set_tags({"best_trial": best.number,
                         "best_trial_run_id": best.user_attrs.get(RUN_ID_ATTR, "")})
        tracking.log_text(json.dumps({"value": best.value, "trial": best.number,
                                      "params": best.params}, indent=2), "best_params.json")
    _log_plots(study, counts["trials_complete"])
    return summary


def _log_plots(study: optuna.Study, complete: int) -> None:
    from optuna.visualization import matplotlib as plots

    figures = {"plots/optimization_history.png": (plots.plot_optimization_history, 1),
               # importances compare trials: below two complete ones there is nothing to compare
               "plots/param_importances.png": (plots.plot_param_importances, 2)}
    for artifact, (plot, needs) in figures.items():
        if complete < needs:
            print(f"skipping {artifact}: needs {needs} complete trial(s), have {complete}",
                  flush=True)
            continue
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            print(f"skipping {artifact}: {err}", flush=True)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 5)  # room for the legend Optuna puts outside the axes
        figure.tight_layout()
        tracking.log_figure(figure, artifact)


def study_tags(settings: TuneSettings) -> dict[str, Any]:
    return {"tune.study_name": settings.study_name,
            "tune.storage": describe_storage(settings.storage)}
