"""registry: what promote may rank by, and which TTA figure a version holds, on a
throw-away store of versions that carry only tags and run metrics (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cifar_resnet import registry


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = MlflowClient()
    try:
        yield client, client.create_experiment("unit", (tmp / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture()
def store(tracking_store, request):
    """A registered model of its own for each test; ``add(tags, metrics, params)``
    registers one version of it, made by a run holding ``metrics`` and ``params``."""
    client, experiment = tracking_store
    name = f"unit-{request.node.name}".replace("[", "-").replace("]", "")
    client.create_registered_model(name)

    def add(tags=None, metrics=None, params=None):
        run = client.create_run(experiment)
        for key, value in (metrics or {}).items():
            client.log_metric(run.info.run_id, key, value)
        for key, value in (params or {}).items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(
            name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags or {}
        )
        return client.get_model_version(name, version.version)

    return SimpleNamespace(client=client, name=name, add=add)


def aliases(store) -> dict[str, str]:
    return {a: str(v) for a, v in store.client.get_registered_model(store.name).aliases.items()}


@pytest.mark.parametrize("metric", ["test_acc", "test_acc_tta_flip", "test_loss"])
def test_promote_refuses_a_test_metric_in_one_line_and_changes_nothing(store, metric):
    store.add({"val_acc": "0.5", "test_acc": "0.4", "test_acc_tta_flip": "0.45"})
    with pytest.raises(registry.RegistryError) as caught:
        registry.promote(store.name, metric)
    message = str(caught.value)
    assert "\n" not in message
    assert f"promote.metric={metric} is measured on the test set" in message
    assert "choosing on the data we report on" in message and "rank by val_acc" in message
    assert "promote.allow_test_selection=true" in message
    assert aliases(store) == {}


def test_promote_ranks_by_val_acc_by_default(store):
    store.add({"val_acc": "0.5", "test_acc": "0.9"})
    store.add({"val_acc": "0.6", "test_acc": "0.1"})
    result = registry.promote(store.name)
    assert (result.metric, result.version, result.changed) == ("val_acc", "2", True)
    assert aliases(store) == {"champion": "2"}


def test_allowed_test_selection_never_compares_two_view_sets(store):
    store.add({"val_acc": "0.5", "test_acc_tta_flip": "0.40"})
    store.add({"val_acc": "0.5", "test_acc_tta_flip_shift": "0.90"})  # higher, other set
    store.add({"val_acc": "0.5", "test_acc_tta_flip": "0.35"})
    result = registry.promote(store.name, "test_acc_tta_flip", allow_test_selection=True)
    assert result.version == "1"
    assert "best test_acc_tta_flip of 2 version(s); 1 without test_acc_tta_flip left out" in (
        result.reason
    )


def test_a_tta_metric_without_its_view_set_is_refused_even_when_allowed(store):
    store.add({"test_acc_tta": "0.4", "tta_views": "flip"})
    for allowed in (True, False):  # no message offers a way out that is then refused
        with pytest.raises(registry.RegistryError, match="names no view set.*test_acc_tta_flip"):
            registry.promote(store.name, "test_acc_tta", allow_test_selection=allowed)
    assert aliases(store) == {}


def test_a_final_fit_ranks_by_the_val_acc_it_borrowed(store):
    store.add({"val_acc": "0.61"}, {"best_val_acc": 0.61})
    # A final fit on all the data logs no val_acc; train tags the choosing run's.
    store.add({"val_acc": "0.61", "settings_from_run": "abc"}, {"test_acc": 0.7})
    assert registry.promote(store.name).version == "2"  # ties go to the newest


def test_tta_accuracies_are_read_per_view_set_from_tags_runs_and_old_names(store):
    tagged = store.add(
        {"test_acc_tta_flip": "0.41", "test_acc_tta_seed": "nan"},
        {"test_acc_tta_flip": 0.99, "test_acc_tta_flip_shift": 0.43},
    )
    # Written before the names carried the view set: eval_tta's tag and train's metric.
    old_eval = store.add({"test_acc_tta": "0.52", "tta_views": "flip_shift"})
    old_train = store.add(metrics={"test_acc_tta": 0.61}, params={"train.tta": "flip"})
    unknown = store.add({"test_acc_tta": "0.7"}, {"test_acc_tta": 0.7})  # which set? unknown
    assert registry.tta_accuracies(tagged) == {"flip": 0.41, "flip_shift": 0.43}
    assert registry.tta_accuracies(old_eval) == {"flip_shift": 0.52}
    assert registry.tta_accuracies(old_train) == {"flip": 0.61}
    assert registry.tta_accuracies(unknown) == {}
    assert registry.version_metric(old_eval, "test_acc_tta_flip_shift") == 0.52
    assert registry.version_metric(old_eval, "test_acc_tta_flip") is None
    assert registry.version_metric(tagged, "test_acc_tta_flip") == 0.41  # the tag wins
