"""One trial: the training path on the train split, scored on the validation split
(best epoch), logged as an MLflow child run, pruned on the way by Optuna."""

from __future__ import annotations

import dataclasses

import optuna
import torch

from .. import data, engine, tracking, training
from ..config import ConfigError, TrainSettings, train_settings
from .space import Param, with_values

# Failures that say something about the sampled values, not about the code.
TRIAL_FAILURES = (engine.NonFiniteLossError, torch.OutOfMemoryError)
STATE_TAG = "optuna.state"
STUDY_TAG = tracking.STUDY_TAG
RUN_ID_ATTR = "mlflow_run_id"


def trial_run_id(trial) -> str | None:
    """The MLflow run of ``trial`` (an optuna Trial or FrozenTrial); None for a trial
    whose run was never made."""
    return trial.user_attrs.get(RUN_ID_ATTR)


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
            raise optuna.TrialPruned(
                f"pruned after epoch {epoch} (val_acc {metrics['val_acc']:.4f})"
            )


def without_test_set(splits: data.CifarSplits) -> data.CifarSplits:
    """Trials choose hyperparameters: they must never see the test split."""
    return dataclasses.replace(
        splits, test_images=splits.test_images[:0], test_labels=splits.test_labels[:0]
    )


def fit_trial(
    settings: TrainSettings, splits: data.CifarSplits, device: torch.device, logger
) -> engine.TrainState:
    # The one training path: seeded before the network is built, so every trial starts
    # from the same weights and trials differ by their hyperparameters only.
    return training.train(settings, splits, device, logger=logger)[1]


class Objective:
    """Validation accuracy (best epoch) of one trial's training."""

    def __init__(
        self,
        config: dict,
        space: list[Param],
        splits: data.CifarSplits,
        device: torch.device,
        epochs: int,
        precision: str,
    ):
        """``device`` and ``precision`` (resolved: fp32, bf16 or fp16) are the study
        process's, decided once by ``pipeline.prepare_machine``."""
        if len(splits.val_labels) == 0:
            raise ConfigError("tune needs a validation split: data.val_size must be > 0")
        self.config, self.space, self.splits, self.device = config, space, splits, device
        self.epochs, self.precision = epochs, precision

    def __call__(self, trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in self.space}
        settings = train_settings(
            with_values(
                self.config,
                {**params, "train.epochs": self.epochs, "train.precision": self.precision},
            )
        )
        pruned = None
        with tracking.nested_run(
            f"trial {trial.number}",
            tags={"optuna.trial_number": trial.number, STUDY_TAG: trial.study.study_name},
        ) as run:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            tracking.log_params(
                {**params, "trial_number": trial.number, "train.epochs": self.epochs}
            )
            try:
                state = fit_trial(
                    settings, self.splits, self.device, PruningLogger(trial, run.info.run_id)
                )
            except optuna.TrialPruned as err:
                pruned = err
                tracking.set_tags({STATE_TAG: "pruned"})
            except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the run ends KILLED, Optuna's FAIL
                tracking.set_tags({STATE_TAG: "failed", "failure": "stopped from outside"})
                raise
            except Exception as err:
                tracking.set_tags(
                    {STATE_TAG: "failed", "failure": f"{type(err).__name__}: {err}"[:5000]}
                )
                raise  # the run ends FAILED; Optuna records FAIL (TRIAL_FAILURES) or stops
            else:
                tracking.set_tags({STATE_TAG: "complete"})
                tracking.log_metrics(
                    {"best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch}
                )
        if pruned is not None:
            raise pruned
        return state.best_val_acc
