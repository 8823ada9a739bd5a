"""tracking: what a final fit may borrow from the run that chose its settings."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cifar_resnet import tracking
from cifar_resnet.config import ConfigError


@pytest.fixture
def study_runs(tmp_path, monkeypatch):
    """A tune study's parent run (its base config) and one trial (what it sampled)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    experiment = client.create_experiment("tests")
    parent = client.create_run(experiment, tags={"optuna.study_name": "s"}).info.run_id
    for key, value in {"model.name": "whitened_resnet", "optim.lr": "1.5", "seed": "0"}.items():
        client.log_param(parent, key, value)
    client.log_metric(parent, "best_val_acc", 0.9)
    trial = client.create_run(
        experiment, tags={"optuna.study_name": "s", "mlflow.parentRunId": parent}
    ).info.run_id
    client.log_param(trial, "optim.lr", "1.8")
    client.log_metric(trial, "best_val_acc", 0.9)
    bare = client.create_run(experiment).info.run_id
    client.log_metric(bare, "best_val_acc", 0.5)
    yield parent, trial, bare
    mlflow.set_tracking_uri(None)


def fit_config(model="whitened_resnet", lr=1.8):
    return {"model": {"name": model}, "optim": {"lr": lr}, "seed": 3}


def test_a_trial_chooses_with_its_studys_settings_under_what_it_sampled(study_runs):
    _, trial, _ = study_runs
    assert tracking.settings_source_tags(trial, fit_config()) == {
        "settings_from_run": trial,
        "val_acc": "0.9000",
    }
    with pytest.raises(ConfigError, match="model.name=whitened_resnet there, resnet_small here"):
        tracking.settings_source_tags(trial, fit_config(model="resnet_small"))
    with pytest.raises(ConfigError, match="optim.lr=1.8 there, 1.5 here"):
        tracking.settings_source_tags(trial, fit_config(lr=1.5))


def test_a_study_run_or_a_run_without_settings_is_no_chooser(study_runs):
    parent, _, bare = study_runs
    with pytest.raises(ConfigError, match="a tune study's run"):
        tracking.settings_source_tags(parent, fit_config())
    with pytest.raises(ConfigError, match="logged no training settings"):
        tracking.settings_source_tags(bare, fit_config())
