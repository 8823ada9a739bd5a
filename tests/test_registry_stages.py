"""finetune, eval_tta, promote and report end to end: the model registry as the
hand-off between stages. Two tiny models are trained and registered once."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from stage_utils import BIN, REPO, make_experiment, run_module, stage_env, tiny_overrides

MODEL = "tiny-cifar"
NO_RECIPE = "~recipe"  # train.yaml's own regime: no EMA, so two tiny epochs learn


def mlflow_run(entry: str, tmp, env, params: dict, overrides: list[str]):
    args = [
        str(BIN / "mlflow"),
        "run",
        ".",
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        "tests",
    ]
    for key, value in {**params, "overrides": " ".join(overrides)}.items():
        args += ["-P", f"{key}={value}"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


NAMES = [f"registry.model_name={MODEL}", "experiment_name=tests"]


def eval_overrides(store) -> list[str]:
    tiny = store.tiny
    return [
        f"data.root={tiny.root}",
        f"data.md5_file={tiny.root / 'md5sums.txt'}",
        "data.download=false",
        *NAMES,
    ]


@pytest.fixture(scope="module")
def store(tiny_cifar, tmp_path_factory):
    """Version 1 learns (lr 0.02, 16-image batches); version 2 cannot (lr 1e-9), so
    its val_acc is at chance and worse than version 1's."""
    tmp = tmp_path_factory.mktemp("registry")
    env = stage_env(tmp)
    make_experiment(tmp, "tests")
    for lr in (0.02, 1e-9):
        result = run_module(
            "cifar_resnet.stages.train",
            [
                *tiny_overrides(
                    tiny_cifar,
                    tmp,
                    **{
                        "train.epochs": 2,
                        "train.batch_size": 16,
                        "optim.lr": lr,
                        "data.loader": "tensor",
                    },
                ),
                NO_RECIPE,
            ],
            env,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    v1, v2 = (client.get_model_version(MODEL, str(n)) for n in (1, 2))
    assert float(v1.tags["val_acc"]) > float(v2.tags["val_acc"]), (v1.tags, v2.tags)
    return SimpleNamespace(tmp=tmp, env=env, client=client, tiny=tiny_cifar, v1=v1, v2=v2)


def run_ids(store) -> set[str]:
    experiment = store.client.get_experiment_by_name("tests")
    return {r.info.run_id for r in store.client.search_runs([experiment.experiment_id])}


def text_artifact(client, run_id, path) -> str:
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


@pytest.mark.slow
def test_eval_tta_with_identity_views_equals_plain_evaluation(store):
    before = run_ids(store)
    mlflow_run(
        "eval_tta",
        store.tmp,
        store.env,
        {"model_uri": f"models:/{MODEL}/1", "views": "identity"},
        eval_overrides(store),
    )
    [run_id] = run_ids(store) - before
    run = store.client.get_run(run_id)
    metrics = run.data.metrics
    # Every TTA name carries its view set; none is the bare test_acc_tta any more.
    assert {k for k in metrics if "tta" in k} == {
        "test_acc_tta_identity",
        "test_loss_tta_identity",
        "eval_seconds_tta_identity",
    }
    assert metrics["test_acc_tta_identity"] == metrics["test_acc"]  # exactly: one view is no TTA
    assert metrics["test_loss_tta_identity"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert text_artifact(
        store.client, run_id, "per_class_accuracy_tta_identity.csv"
    ) == text_artifact(store.client, run_id, "per_class_accuracy.csv")
    plots = {a.path for a in store.client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/confusion_matrix.png", "plots/confusion_matrix_tta_identity.png"}
    # Linked both ways, and the result is on the version for promote and report.
    assert (run.data.tags["model_name"], run.data.tags["model_version"]) == (MODEL, "1")
    version = store.client.get_model_version(MODEL, "1")
    assert version.tags["eval_tta_run_id_identity"] == run_id
    assert "test_acc_tta" not in version.tags and "tta_views" not in version.tags
    assert float(version.tags["test_acc_tta_identity"]) == pytest.approx(
        metrics["test_acc_tta_identity"], abs=1e-4
    )


@pytest.mark.slow
def test_promote_refuses_a_worse_version_unless_forced(store):
    def aliases():
        return {a: str(v) for a, v in store.client.get_registered_model(MODEL).aliases.items()}

    promote = ["cifar_resnet.stages.promote", *NAMES]
    versions = store.client.search_model_versions(f"name = '{MODEL}'")
    best = str(max((float(v.tags["val_acc"]), int(v.version)) for v in versions)[1])
    first = mlflow_run("promote", store.tmp, store.env, {"metric": "val_acc"}, NAMES)
    assert f"champion -> version {best} (best val_acc of {len(versions)}" in first.stdout
    assert aliases() == {"champion": best}

    refused = run_module(promote[0], [*promote[1:], "promote.version=2"], store.env)
    assert refused.returncode == 2
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "version 2 has val_acc" in error and f"worse than champion version {best}" in error
    assert "force=true" in error and "Traceback" not in refused.stderr
    assert aliases() == {"champion": best}

    forced = run_module(
        promote[0], [*promote[1:], "promote.version=2", "promote.force=true"], store.env
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "forced although worse" in forced.stdout
    assert aliases() == {"champion": "2", "previous": best}

    back = run_module(promote[0], promote[1:], store.env)  # the best by val_acc again
    assert back.returncode == 0 and aliases() == {"champion": best, "previous": "2"}


@pytest.mark.slow
def test_finetune_from_a_version_and_a_study_records_lineage(store):
    storage = f"sqlite:///{store.tmp}/optuna.db"
    study = optuna.create_study(study_name="found", storage=storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": 0.005, "optim.weight_decay": 2e-5},
            distributions={
                "optim.lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True),
                "optim.weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
            },
            value=0.9,
        )
    )
    before = run_ids(store)
    overrides = [
        *tiny_overrides(
            store.tiny,
            store.tmp,
            **{"data.loader": "tensor", "finetune.storage": storage, "model": "resnet9"},
        ),
        NO_RECIPE,
    ]
    mlflow_run(
        "finetune",
        store.tmp,
        store.env,
        {"model_uri": f"models:/{MODEL}/1", "epochs": 2, "from_study": "found"},
        overrides,
    )
    [run_id] = run_ids(store) - before
    [new] = [
        v for v in store.client.search_model_versions(f"name = '{MODEL}'") if v.run_id == run_id
    ]
    lineage = {
        "source_model_name": MODEL,
        "source_model_version": "1",
        "source_run_id": store.v1.run_id,
        "source_model_uri": f"models:/{MODEL}/1",
        "finetune.from_study": "found",
        "finetune.best_trial": "0",
    }
    run = store.client.get_run(run_id)
    assert {k: new.tags.get(k) for k in lineage} == lineage
    assert {k: run.data.tags.get(k) for k in lineage} == lineage
    # The study's best values, the source's architecture (model=resnet9 is ignored), 2 epochs.
    params = run.data.params
    assert float(params["optim.lr"]) == 0.005 and float(params["optim.weight_decay"]) == 2e-5
    assert params["model.name"] == "resnet_small" and new.tags["epochs"] == "2"
    # It starts from the trained weights: after one epoch it is far above chance.
    [first] = [m for m in store.client.get_metric_history(run_id, "val_acc") if m.step == 1]
    assert first.value >= 0.5 * float(store.v1.tags["val_acc"]) > 0.2


@pytest.mark.slow
def test_report_prints_and_logs_the_results_table(store):
    store.client.set_model_version_tag(MODEL, "2", "test_acc_tta_flip_shift", "0.1234")
    before = run_ids(store)
    result = mlflow_run(
        "report", store.tmp, store.env, {"model_name": MODEL}, ["experiment_name=tests"]
    )
    [run_id] = run_ids(store) - before
    table = text_artifact(store.client, run_id, "results.md")
    assert table in result.stdout
    header, _, *rows = table.strip().splitlines()
    for cell in (
        "model",
        "recipe",
        "parameters",
        "epochs",
        "train acc",
        "val acc",
        "test acc",
        "test acc (TTA flip_shift)",
        "run id",
    ):
        assert f" {cell} |" in header
    versions = store.client.search_model_versions(f"name = '{MODEL}'")
    assert len(rows) == len(versions) >= 2
    v2 = next(row for row in rows if row.startswith("| 2 |"))
    train_acc = store.client.get_run(store.v2.run_id).data.metrics["train_acc"]
    assert "`resnet_small`" in v2 and "272,474" in v2 and f"`{store.v2.run_id}`" in v2
    assert f"{100 * train_acc:.2f}%" in v2 and "12.34%" in v2
    assert f"{100 * float(store.v2.tags['val_acc']):.2f}%" in v2


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra, message",
    [
        ("eval_tta", ["eval.model_uri=models:/nope/1"], "no registered model 'nope'"),
        ("eval_tta", [f"eval.model_uri=models:/{MODEL}@nope"], "has no alias 'nope'"),
        ("finetune", ["finetune.model_uri=s3://bucket/model"], "model_uri must be models:/"),
        (
            "finetune",
            [
                f"finetune.model_uri=models:/{MODEL}/1",
                "finetune.from_study=nope",
                "finetune.storage=sqlite:///{tmp}/optuna.db",
            ],
            "no study 'nope'",
        ),
        ("promote", ["promote.metric=f1"], "no version of 'tiny-cifar' has 'f1'"),
        (
            "promote",
            ["promote.metric=test_acc"],
            "promote.metric=test_acc is measured on the test "
            "set: choosing the champion on it is choosing on "
            "the data we report on",
        ),
        ("promote", ["promote.metric=test_acc_tta_identity"], "rank by val_acc"),
        (
            "train",
            ["data.val_size=0", "settings_from_run=nosuchrun"],
            "settings_from_run=nosuchrun: no such MLflow run",
        ),
        (
            "train",  # the base's batch size is 32, the chooser's (version 1) was 16
            ["data.val_size=0", "settings_from_run={v1}"],
            "chose other settings than these: optim.lr=0.02 there, 0.1 here; "
            "train.batch_size=16 there, 32 here",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(store, stage, extra, message):
    if any(e.startswith("finetune.from_study") for e in extra):  # a storage, without that study
        optuna.create_study(
            study_name="other", storage=f"sqlite:///{store.tmp}/optuna.db", load_if_exists=True
        )
    extra = [e.format(tmp=store.tmp, v1=store.v1.run_id) for e in extra]
    base = {
        "finetune": tiny_overrides(store.tiny, store.tmp),
        "train": [*tiny_overrides(store.tiny, store.tmp), NO_RECIPE],
        "eval_tta": eval_overrides(store),
    }.get(stage, NAMES)
    runs, versions = run_ids(store), len(store.client.search_model_versions(f"name='{MODEL}'"))
    aliases = dict(store.client.get_registered_model(MODEL).aliases)
    result = run_module(f"cifar_resnet.stages.{stage}", [*base, *extra], store.env, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert run_ids(store) == runs
    assert len(store.client.search_model_versions(f"name='{MODEL}'")) == versions
    assert dict(store.client.get_registered_model(MODEL).aliases) == aliases


@pytest.mark.slow
def test_a_final_fit_reads_the_test_set_its_chooser_did_not_and_carries_its_val_acc(store):
    """The final-fit way of working: a run chooses settings on the validation split
    without reading the test set (train.test=false); the fit on every image
    (data.val_size=0) reads it once and carries the chooser's val_acc; each run names
    the other."""
    settings = {"train.epochs": 1, "train.batch_size": 16, "data.loader": "tensor"}
    before = run_ids(store)
    chose = run_module(
        "cifar_resnet.stages.train",
        [*tiny_overrides(store.tiny, store.tmp, **settings, **{"train.test": "false"}), NO_RECIPE],
        store.env,
    )
    assert chose.returncode == 0, chose.stdout[-3000:] + chose.stderr[-3000:]
    [chooser] = run_ids(store) - before
    chooser_run = store.client.get_run(chooser)
    assert "best_val_acc" in chooser_run.data.metrics
    assert not [k for k in chooser_run.data.metrics if k.startswith("test_")]
    [chosen_version] = [
        v for v in store.client.search_model_versions(f"name = '{MODEL}'") if v.run_id == chooser
    ]
    assert "test_acc" not in chosen_version.tags
    assert "test set not read" in chosen_version.description

    before = run_ids(store)
    result = run_module(
        "cifar_resnet.stages.train",
        [
            *tiny_overrides(
                store.tiny,
                store.tmp,
                **{**settings, "train.epochs": 2},
                **{"data.val_size": 0, "settings_from_run": chooser},
            ),
            NO_RECIPE,
        ],
        store.env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_id] = run_ids(store) - before
    run = store.client.get_run(run_id)
    assert not [k for k in run.data.metrics if k.startswith(("val_", "best_val"))]
    assert "test_acc" in run.data.metrics
    assert store.client.get_run(chooser).data.tags["final_fit_run"] == run_id
    best_val_acc = store.client.get_run(chooser).data.metrics["best_val_acc"]
    expected = {"settings_from_run": chooser, "val_acc": f"{best_val_acc:.4f}"}
    assert {k: run.data.tags.get(k) for k in expected} == expected
    [version] = [
        v for v in store.client.search_model_versions(f"name = '{MODEL}'") if v.run_id == run_id
    ]
    assert {k: version.tags.get(k) for k in expected} == expected
    assert run.data.params["settings_from_run"] == chooser
