"""Running entry points the way users do: as processes, against a throw-away tracking store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_md5_file(tiny) -> Path:
    """md5sum-style checksums of the tiny set, for data.md5_file."""
    path = tiny.root / "md5sums.txt"
    path.write_text("".join(f"{md5}  {name}\n" for name, md5 in sorted(tiny.md5.items())))
    return path


def stage_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
        NO_ALBUMENTATIONS_UPDATE="1",
        GIT_PYTHON_REFRESH="quiet",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_RUN_ID", None)
    return env


def make_experiment(tmp: Path, name: str) -> str:
    """An experiment whose artifacts stay inside ``tmp`` (not the repo's ./mlruns)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=(tmp / "artifacts").as_uri())


def tiny_overrides(tiny, tmp: Path, **extra) -> list[str]:
    values = {
        "data.root": str(tiny.root),
        "data.md5_file": str(write_md5_file(tiny)),
        "data.val_size": 50,
        "data.num_workers": 0,
        "data.download": "false",
        "model": "resnet_small",
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.progress": "false",
        "train.checkpoint_dir": str(tmp / "checkpoints"),
        "experiment_name": "tests",
        "registry.model_name": "tiny-cifar",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_module(
    module: str, args: list[str], env: dict, timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
