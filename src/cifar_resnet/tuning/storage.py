"""Where a study lives: any SQLAlchemy URL (SQLite on one machine, PostgreSQL shared by
several, through psycopg), opened with heartbeats so a killed worker's trial is failed,
not left running; or ``journal:///<file>``, Optuna's JournalStorage in a file that
workers on a shared file system append to."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ..errors import UserError

JOURNAL = "journal"  # the URL scheme of a JournalStorage file: journal:///<path>


class StudyError(UserError):
    """A study or storage that does not exist or cannot be used."""


def describe_storage(url: str) -> str:
    """The storage URL (str) without its password, for logs and params; a string that
    is not a URL comes back unchanged. Raises nothing."""
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
) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``url`` (str).

    - an SQLAlchemy URL (``sqlite:///optuna.db``, ``postgresql+psycopg://user@host/db``):
      an RDBStorage with heartbeats every ``heartbeat_interval`` seconds (None: off),
      a running trial failed ``grace_period`` seconds after its last beat and handed to
      ``stale_trial_callback``; SQLite waits up to 60 s on locks instead of failing at
      once, since the heartbeat thread and other workers write to the same file;
    - ``journal:///<path>`` (relative; ``journal:////<path>`` absolute, as with SQLite):
      a JournalStorage appending to that file, whose lock works on NFS. Optuna has no
      heartbeats there: a killed worker's trial stays running.

    ``must_exist`` (for reading a study) refuses a SQLite or journal file that is absent.
    Raises StudyError when ``url`` is not a URL, the file is absent (``must_exist``), the
    driver is not installed or the database cannot be opened.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises ArgumentError
        raise StudyError(
            f"storage {url!r} is not a SQLAlchemy URL ({err}); e.g. sqlite:///optuna.db, "
            "postgresql+psycopg://user@host/db or journal:///optuna.log"
        ) from None
    backend = parsed.get_backend_name()
    path = parsed.database
    if backend in ("sqlite", JOURNAL) and must_exist and (not path or not Path(path).is_file()):
        raise StudyError(f"no Optuna storage at {url} (file {path!r} does not exist)")
    if backend == JOURNAL:
        if not path:
            raise StudyError(f"storage {url!r} names no file: journal:///<path of the log>")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(path))
        except OSError as err:
            raise StudyError(f"cannot open journal {path!r}: {err}") from None
    engine_kwargs = {"connect_args": {"timeout": 60}} if backend == "sqlite" else {}
    try:
        return _rdb_storage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
        )
    except (SQLAlchemyError, ImportError, ValueError) as err:
        hint = ""
        if isinstance(err, ImportError) and backend == "postgresql":
            hint = (
                "; name the driver this project installs (psycopg 3): "
                "postgresql+psycopg://user@host/db"
            )
        first_line = (str(err).strip().splitlines() or [""])[0]  # errors are one line
        raise StudyError(
            f"cannot open storage {describe_storage(url)}: {type(err).__name__}: {first_line}{hint}"
        ) from None


def _rdb_storage(url: str, attempts: int = 3, **kwargs) -> optuna.storages.RDBStorage:
    """optuna's RDBStorage(url, **kwargs), tried again after an IntegrityError: workers
    started together on an empty database each create Optuna's tables, PostgreSQL lets
    one win and fails the others on its catalogue; once the tables exist, opening again
    just uses them."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except IntegrityError:
            if attempt == attempts:
                raise
            time.sleep(attempt)


def load_study(name: str, storage_url: str) -> optuna.Study:
    """The existing study ``name`` in ``storage_url`` (any URL open_storage takes), for
    reading (finetune's from_study). Raises StudyError when the storage or the study
    does not exist; the message lists the studies that do."""
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
    """The best complete trial of ``study``, whichever worker ran it, and its params
    (config key -> value). Raises StudyError when no trial has completed."""
    try:
        best = study.best_trial
    except ValueError:
        raise StudyError(f"study {study.study_name!r} has no complete trial yet") from None
    return best, dict(best.params)
