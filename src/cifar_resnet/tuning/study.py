"""The search: sampler, pruner, the optimisation loop and its caps, and what the study
leaves in MLflow (summary, plots, tags)."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import tracking
from ..config import ConfigError, TuneSettings
from .objective import STATE_TAG, STUDY_TAG, TRIAL_FAILURES, Objective, trial_run_id
from .storage import StudyError, describe_storage, open_storage

# Heartbeats and the matplotlib plots are marked experimental; they work and are used on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# What tune.max_trials counts, over every worker: a trial another worker is running
# counts, so workers do not all start one more when the study is nearly full.
COUNTED = (*FINISHED, TrialState.RUNNING)


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    kwargs = dict(settings.pruners.get(settings.pruner) or {})
    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }
    if settings.pruner == "hyperband":
        kwargs.setdefault("max_resource", settings.epochs)  # one resource = one epoch
    try:
        return classes[settings.pruner](**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tune.pruners.{settings.pruner}: {err}") from None


def finished_count(study: optuna.Study) -> int:
    """Complete and pruned trials of ``study``, from every worker."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def state_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
    }
    return {
        f"trials_{name}": sum(t.state == state for t in trials) for state, name in names.items()
    }


def mark_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback: a trial whose process died is failed in Optuna; close its
    MLflow run too, which nobody else will."""
    run_id = trial_run_id(trial)
    if run_id:
        tracking.close_killed_run(
            run_id, {STATE_TAG: "failed", "failure": "process killed (heartbeat stopped)"}
        )
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
                print(
                    f"stopping: {self.failed} failed trials in this process "
                    "(tune.max_failed_trials)",
                    flush=True,
                )
                study.stop()


def make_sampler(settings: TuneSettings, trial_number: int) -> optuna.samplers.TPESampler:
    """The TPE sampler for trial ``trial_number`` (int) of the study: seeded with
    ``tune.sampler_seed + trial_number`` (from the OS when the seed is None).

    Trial numbers are handed out by the storage, one per trial whichever worker asks, so
    workers sharing a study never draw the same start-up values, a resumed study does not
    repeat the draws of its first trials, and one worker alone is reproducible.
    """
    seed = None if settings.sampler_seed is None else settings.sampler_seed + trial_number
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=settings.startup_trials,
        constant_liar=settings.constant_liar,
    )


def seeded_per_trial(objective: Objective, settings: TuneSettings) -> Callable:
    """``objective`` run with the sampler ``make_sampler`` gives its trial's number. The
    trial reads ``study.sampler`` at each suggest, so setting it first is enough."""

    def run(trial: optuna.Trial) -> float:
        trial.study.sampler = make_sampler(settings, trial.number)
        return objective(trial)

    return run


def open_study(settings: TuneSettings) -> optuna.Study:
    """Create the study ``tune.study_name`` in ``tune.storage``, or load it when it
    exists (another worker's, or a killed run's: its stale running trials are failed
    first). Raises StudyError when the storage cannot be opened or the study exists
    with another direction."""
    storage = open_storage(
        settings.storage, settings.heartbeat_interval, settings.grace_period, mark_killed
    )
    try:
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            pruner=make_pruner(settings),
        )
    except ValueError as err:  # e.g. an existing study with another direction
        raise StudyError(f"study {settings.study_name!r}: {err}") from None
    # Until optimize's first trial, which takes the sampler of its own number.
    study.sampler = make_sampler(settings, len(study.get_trials(deepcopy=False)))
    optuna.storages.fail_stale_trials(study)  # a killed worker's trial no longer counts
    return study


def optimize(study: optuna.Study, objective: Objective, settings: TuneSettings) -> int:
    """Run trials until this process has run ``tune.n_trials``, the study holds
    ``tune.max_trials`` complete, pruned or running ones (every worker's), ``tune.timeout``
    seconds have passed or ``tune.max_failed_trials`` have failed here, whichever comes
    first. Returns how many trials this process ran. A trial that raises one of
    TRIAL_FAILURES is recorded failed; any other exception propagates."""
    counts = state_counts(study)
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    room = []  # trials each cap leaves this worker
    if settings.n_trials is not None:
        room.append(settings.n_trials)
    if settings.max_trials is not None:
        room.append(settings.max_trials - counted)
    where = (
        f"study {study.study_name!r}: {finished_count(study)} finished trials, "
        f"{counts['trials_running']} running"
    )
    if room and min(room) <= 0:
        print(f"{where}, max_trials={settings.max_trials}; nothing to run", flush=True)
        return 0
    ahead = f"up to {min(room)} more" if room else f"for {settings.timeout} s"
    print(f"{where}; this worker runs {ahead}", flush=True)
    failures = StopAfterFailures(settings.max_failed_trials)
    callbacks: list[Callable] = [failures]
    if settings.max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(settings.max_trials, states=COUNTED))
    # gc after each trial: a failed trial's model and optimizer leave device memory at once.
    with _no_traceback_for_stops():
        study.optimize(
            seeded_per_trial(objective, settings),
            n_trials=settings.n_trials,
            timeout=settings.timeout,
            catch=TRIAL_FAILURES,
            gc_after_trial=True,
            callbacks=callbacks,
        )
    return failures.ran


class _DropStopTracebacks(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C or SIGTERM with the traceback of where the
    stop landed, which says nothing; the warning itself stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = None
        return True


@contextlib.contextmanager
def _no_traceback_for_stops() -> Iterator[None]:
    handlers = logging.getLogger("optuna").handlers
    stops = _DropStopTracebacks()
    for handler in handlers:
        handler.addFilter(stops)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(stops)


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
        summary.update(
            best_value=best.value,
            best_trial=best.number,
            best_run_id=trial_run_id(best) or "",
            best_params=best.params,
        )
        tracking.log_metrics({"best_val_acc": best.value, "best_trial": best.number})
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracking.set_tags({"best_trial": best.number, "best_trial_run_id": summary["best_run_id"]})
        tracking.log_text(
            json.dumps(
                {"value": best.value, "trial": best.number, "params": best.params}, indent=2
            ),
            "best_params.json",
        )
    _log_plots(study, counts["trials_complete"])
    return summary


def _log_plots(study: optuna.Study, complete: int) -> None:
    from optuna.visualization import matplotlib as plots

    figures = {
        "plots/optimization_history.png": (plots.plot_optimization_history, 1),
        # importances compare trials: below two complete ones there is nothing to compare
        "plots/param_importances.png": (plots.plot_param_importances, 2),
    }
    for artifact, (plot, needs) in figures.items():
        if complete < needs:
            print(
                f"skipping {artifact}: needs {needs} complete trial(s), have {complete}", flush=True
            )
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
    """The tags of a tune (parent) run: the study it worked on, and where it lives."""
    return {
        STUDY_TAG: settings.study_name,
        "tune.study_name": settings.study_name,
        "tune.storage": describe_storage(settings.storage),
    }
