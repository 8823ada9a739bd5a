"""Where a study lives: any SQLAlchemy URL (SQLite on one machine, PostgreSQL shared by
several), opened with heartbeats so a killed worker's trial is failed, not left running."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ..errors import UserError


class StudyError(UserError):
    """A study or storage that does not exist or cannot be used."""


def describe_storage(url: str) -> str:
    """The storage URL without its password, for logs and params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all; open_storage will say so
        return url


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: Callable | None = None,
    must_exist: bool = False,
) -> optuna.storages.RDBStorage:
    """Any SQLAlchemy URL; SQLite waits on locks instead of failing at once, since
    the heartbeat thread and other workers write to the same file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises ArgumentError
        raise StudyError(
            f"storage {url!r} is not a SQLAlchemy URL ({err}); e.g. "
            "sqlite:///optuna.db or postgresql://user@host/db"
        ) from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}
        path = parsed.database
        if must_exist and (not path or not Path(path).is_file()):
            raise StudyError(f"no Optuna storage at {url} (file {path!r} does not exist)")
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )
    except (SQLAlchemyError, ImportError, ValueError) as err:
        raise StudyError(
            f"cannot open storage {describe_storage(url)}: {type(err).__name__}: {err}"
        ) from None


def load_study(name: str, storage_url: str) -> optuna.Study:
    """An existing study, read-only use (finetune's from_study)."""
    storage = open_storage(storage_url, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = optuna.get_all_study_names(storage)
        raise StudyError(
            f"no study {name!r} in {describe_storage(storage_url)}; studies there: "
            f"{', '.join(known) or 'none'}"
        ) from None


def best_params(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict[str, Any]]:
    try:
        best = study.best_trial
    except ValueError:
        raise StudyError(f"study {study.study_name!r} has no complete trial yet") from None
    return best, dict(best.params)
