"""MLflow on the training side: runs, params, metrics, artifacts, registry.

Over 300 lines on purpose: by design the one training-side module that calls
MLflow (import-linter holds that), so every such call is here.

The only training-side module that imports mlflow. The tracking store is
MLflow's own default (``sqlite:///mlflow.db`` in the working directory, artifacts
under ./mlruns) unless MLFLOW_TRACKING_URI says otherwise, so a remote tracking
server works unchanged.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .config import ConfigError, flatten

# MLflow caps a param value at 6000 characters.
_MAX_PARAM_CHARS = 6000


@contextlib.contextmanager
def training_run(
    experiment_name: str,
    resume_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or re-open, for resume) the run of one training.

    Under ``mlflow run`` the launcher has already created a run (MLFLOW_RUN_ID);
    a fresh training logs into it. A resumed training re-opens its own run and
    leaves a pointer on the launcher's run, so the UI shows where it went.
    ``system_metrics``: MLflow samples CPU, memory (and GPU) use into the run
    (``system/...`` metrics), for runs that train; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    =false turns it off.
    """
    if system_metrics and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in (
        "false",
        "0",
    ):
        system_metrics = False
    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        if launcher_run and launcher_run != resume_run_id:
            tag_run(launcher_run, {"cifar_resnet.resumed_run": resume_run_id})
            os.environ.pop("MLFLOW_RUN_ID")
        with _killed_on_interrupt(
            mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
        ) as run:
            yield run
        return
    if not launcher_run:
        mlflow.set_experiment(experiment_name)
    with _killed_on_interrupt(
        mlflow.start_run(
            run_name=run_name, tags=_tag_values(tags), log_system_metrics=system_metrics
        )
    ) as run:
        yield run


@contextlib.contextmanager
def _killed_on_interrupt(active: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """A run stopped from outside (SIGTERM, Ctrl-C) ends KILLED, not FAILED: it did not
    go wrong (and a training's ``resume=<run id>`` continues it)."""
    with active as run:
        try:
            yield run
        except (KeyboardInterrupt, SystemExit) as err:  # SIGTERM arrives as a KeyboardInterrupt
            if not isinstance(err, SystemExit) or err.code not in (0, None):
                mlflow.end_run("KILLED")
            raise


def run_status(run_id: str) -> str | None:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED; None when there is no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


# On every tune worker's run and every trial's run: the UI groups a study across workers.
STUDY_TAG = "optuna.study_name"

# What a final fit may change from the run that chose its settings: the split it gives
# up, the epochs and seed chosen, whether the test set is read, and where and how it
# runs. Any other difference is a setting validation never saw.
FINAL_FIT_MAY_CHANGE = (
    "data.val_size",
    "train.epochs",
    "seed",
    "settings_from_run",
    "train.test",
    "train.checkpoint_dir",
    "train.keep_checkpoints",
    "train.progress",
    "train.threads",
    "train.device",
    "registry.",
    "experiment_name",
    "data.root",
    "data.download",
    "data.num_workers",
)


def settings_source_tags(run_id: str, config: dict) -> dict[str, str]:
    """The tags a final fit (no validation split) carries for the run that chose its
    settings on the validation split: ``settings_from_run`` (its id) and ``val_acc``
    (its ``best_val_acc``, 4 decimals), so promote can rank the fit by val_acc while the
    tag says whose val_acc it is. ``config``: the fit's resolved config, whose settings
    must be that run's but for ``FINAL_FIT_MAY_CHANGE``.

    Raises ConfigError (one line) for a run this tracking store does not hold, one
    without a finite ``best_val_acc`` (a run that never validated), or one whose logged
    settings differ from ``config``'s (naming the keys and both values)."""
    import math

    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"settings_from_run={run_id}: no such MLflow run in {tracking_uri()}"
        ) from None
    value = run.data.metrics.get("best_val_acc")
    if value is None or not math.isfinite(value):
        raise ConfigError(
            f"settings_from_run={run_id}: that run has no best_val_acc; name "
            "the run that chose these settings on the validation split"
        )
    tags = run.data.tags
    parent = tags.get(MLFLOW_PARENT_RUN_ID)
    if parent is None and STUDY_TAG in tags:
        raise ConfigError(
            f"settings_from_run={run_id} is a tune study's run: its best_val_acc is its best "
            "trial's; name that trial's run"
        )
    chosen = dict(run.data.params)
    if parent is not None:  # a tune trial logs what it sampled; the rest is its study's
        chosen = {**MlflowClient().get_run(parent).data.params, **chosen}
    if "model.name" not in chosen:
        raise ConfigError(
            f"settings_from_run={run_id}: that run logged no training settings to compare; "
            "name a train run or a tune trial's run"
        )
    differences = [
        f"{key}={chosen[key]} there, {_param_value(value)} here"
        for key, value in flatten(config).items()
        if key in chosen
        and not key.startswith(FINAL_FIT_MAY_CHANGE)
        and chosen[key] != _param_value(value)
    ]
    if differences:
        raise ConfigError(
            f"settings_from_run={run_id} chose other settings than these: "
            f"{'; '.join(differences)}. A final fit changes only data.val_size, "
            "train.epochs, seed and train.test (and where it runs)"
        )
    return {"settings_from_run": run_id, "val_acc": f"{value:.4f}"}


def tag_run(run_id: str, tags: dict[str, Any]) -> None:
    """Set ``tags`` on another run than the active one (e.g. link a final fit from the
    run that chose its settings)."""
    client = MlflowClient()
    for key, value in _tag_values(tags).items():
        client.set_tag(run_id, key, value)


@contextlib.contextmanager
def nested_run(run_name: str, tags: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child of the active run (a tuning trial under its study's run); KILLED when
    stopped from outside, as a training run is."""
    with _killed_on_interrupt(
        mlflow.start_run(run_name=run_name, nested=True, tags=_tag_values(tags))
    ) as run:
        yield run


def _tag_values(tags: dict | None) -> dict[str, str] | None:
    # Tags are text: a local store takes an int, a tracking server's REST client does not.
    return None if tags is None else {k: str(v) for k, v in tags.items()}


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: _param_value(v) for k, v in params.items()})


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags(_tag_values(tags))


def close_killed_run(run_id: str, tags: dict[str, Any]) -> None:
    """Tag and close the run of a process that died, which nobody else will close."""
    tag_run(run_id, tags)
    MlflowClient().set_terminated(run_id, "KILLED")


class EpochMetricLogger:
    """engine.EpochLogger that writes one MLflow step per epoch."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        # One batch: an epoch's metrics land together or not at all.
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), now, epoch) for key, value in metrics.items()],
        )

    def last_logged_epoch(self, key: str = "train_loss") -> int:
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)


def log_config(config: dict, extra_params: dict[str, Any]) -> None:
    """The resolved config as flattened params and as a YAML artifact."""
    params = {**flatten(config), **extra_params}
    mlflow.log_params({k: _param_value(v) for k, v in params.items()})
    mlflow.log_text(dump_config(config), "config/resolved.yaml")


def dump_config(config: dict) -> str:
    """The config as YAML text: how it travels in checkpoints and artifacts."""
    return yaml.safe_dump(config, sort_keys=False)


def log_environment() -> None:
    """The installed packages (``pip freeze`` format) as ``environment/requirements.txt``:
    with the seed and the resolved precision, what it takes to get the same run again."""
    from importlib import metadata

    lines = sorted(
        {
            f"{d.metadata['Name']}=={d.version}"
            for d in metadata.distributions()
            if d.metadata["Name"]
        },
        key=str.lower,
    )
    mlflow.log_text("\n".join(lines) + "\n", "environment/requirements.txt")


def log_dataset(md5: dict[str, str], train: int, val: int, test: int, split_seed: int) -> None:
    """The data set as an MLflow input (the UI's Datasets column): CIFAR-10, named by the
    MD5 digest of its batch files, with the split sizes and split seed."""
    import hashlib

    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    digest = hashlib.md5("".join(f"{k}:{v};" for k, v in sorted(md5.items())).encode())
    dataset = MetaDataset(
        source=HTTPDatasetSource("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        name="cifar10",
        digest=digest.hexdigest()[:8],
        schema=Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.long, "label")]),
    )
    mlflow.log_input(
        dataset,
        context="training",
        tags={
            "train_images": str(train),
            "val_images": str(val),
            "test_images": str(test),
            "split_seed": str(split_seed),
        },
    )


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def processor_name() -> str:
    import platform

    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path)


def register_model(
    model_uri: str, name: str, tags: dict[str, Any], description: str | None = None
) -> Any:
    """Register ``model_uri`` as a new version of ``name``, tag and describe it."""
    version = mlflow.register_model(model_uri, name)
    client = MlflowClient()
    if description:
        client.update_model_version(name, version.version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    return version


def log_classifier(weights: Path, example_images, name: str = "model") -> Any:
    """Log the pyfunc that serves ``weights`` (see ``serving``): a column ``image`` of
    base64-encoded image files, or uint8 (N, 32, 32, 3) pixels, in; one row per image
    (class_name, class_index, probabilities) out; parameter ``tta``.

    ``example_images`` are uint8 NHWC; the logged example is two of them as PNGs (a
    batch-1 example would freeze the batch size). The model is logged from code
    (``serving_model.py``), not as a pickled object, and the package travels with it
    (code_paths), so serving needs no install. Returns mlflow's ModelInfo.
    """
    import base64
    from importlib import metadata

    import numpy as np
    import pandas as pd
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from . import serving

    example = pd.DataFrame(
        {
            serving.IMAGE_COLUMN: [
                base64.b64encode(serving.encode_png(image)).decode("ascii")
                for image in np.asarray(example_images[:2], dtype=np.uint8)
            ]
        }
    )
    # No input schema on purpose: a column schema makes MLflow reject pixel arrays
    # before predict sees them, a tensor schema rejects the image column. predict
    # validates both forms itself, with messages that say what is wrong.
    signature = ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec(DataType.string, "class_name"),
                ColSpec(DataType.long, "class_index"),
                ColSpec(Array(DataType.float), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("tta", DataType.string, "none")]),
    )

    def requirement(package: str) -> str:
        try:
            return f"{package}=={metadata.version(package)}"
        except metadata.PackageNotFoundError:  # e.g. opencv-python instead of -headless
            return package

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(serving.__file__).with_name("serving_model.py")),
        artifacts={serving.WEIGHTS_ARTIFACT: str(weights)},
        code_paths=[str(Path(serving.__file__).parent)],
        signature=signature,
        input_example=example,
        metadata={
            "input": f"column {serving.IMAGE_COLUMN!r}: base64 PNG/JPEG/BMP/WebP files, "
            "or uint8 pixels (N, 32, 32, 3) via 'inputs'",
            "tta": list(serving.TTA_MODES),
        },
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            requirement("numpy"),
            requirement("pandas"),
            requirement("pillow"),
            requirement("opencv-python-headless"),
            requirement("mlflow"),
        ],
    )
