"""Hyperparameter search: an Optuna study over the train config, one MLflow child
run per trial.

- The search space lives in conf/tune/: a tree that mirrors the config, whose
  leaves say how to sample that key (``{type: float, log: true, factor: 10}``
  samples log-uniformly from value/10 to value*10 around the composed config's
  own value; ``low``/``high`` give absolute bounds; ``choices`` a categorical).
- Trials train on the train split and are scored on the validation split (best
  epoch); the test split is emptied before the first trial, so no trial can read it.
- The study lives in a storage (SQLite by default, PostgreSQL or a JournalStorage file
  for several machines), so a killed search resumes and several workers share one
  study. Two caps: ``n_trials`` is this worker's number of trials, ``max_trials`` the
  whole study's (complete, pruned and running trials, whoever runs them). Trial n
  samples with seed ``sampler_seed + n``, so workers never draw the same values.
- A trial whose loss goes NaN (or that runs out of device memory) is recorded as
  failed and the study goes on.

By concept: ``space`` (what is searched), ``storage`` (where the study lives),
``objective`` (one trial), ``study`` (the search and its record).
"""

from .objective import (
    RUN_ID_ATTR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_FAILURES,
    Objective,
    PruningLogger,
    fit_trial,
    trial_run_id,
    without_test_set,
)
from .space import Param, get_dotted, parse_space, with_values
from .storage import StudyError, best_params, describe_storage, load_study, open_storage
from .study import (
    COUNTED,
    FINISHED,
    StopAfterFailures,
    finished_count,
    log_summary,
    make_pruner,
    make_sampler,
    mark_killed,
    open_study,
    optimize,
    seeded_per_trial,
    state_counts,
    study_tags,
)

__all__ = [
    "COUNTED",
    "FINISHED",
    "RUN_ID_ATTR",
    "STATE_TAG",
    "STUDY_TAG",
    "TRIAL_FAILURES",
    "Objective",
    "Param",
    "PruningLogger",
    "StopAfterFailures",
    "StudyError",
    "best_params",
    "describe_storage",
    "finished_count",
    "fit_trial",
    "get_dotted",
    "load_study",
    "log_summary",
    "make_pruner",
    "make_sampler",
    "mark_killed",
    "open_storage",
    "open_study",
    "optimize",
    "parse_space",
    "seeded_per_trial",
    "state_counts",
    "study_tags",
    "trial_run_id",
    "with_values",
    "without_test_set",
]
