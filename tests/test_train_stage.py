"""The train entry point end to end, as a user runs it: `mlflow run . -e train`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from stage_utils import REPO, make_experiment, run_module, stage_env, tiny_overrides

from cifar_resnet import data, engine, hardware

EPOCH_METRICS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_seconds",
    "images_per_second",
)
ARTIFACTS = (
    "config/resolved.yaml",
    "plots/learning_curves.png",
    "plots/confusion_matrix.png",
    "plots/misclassified.png",
    "per_class_accuracy.csv",
    "checkpoints/best.pt",
    "environment/requirements.txt",
)


def predicted_classes(prediction) -> np.ndarray:
    if hasattr(prediction, "columns"):  # DataFrame answer: one row per image
        return prediction["class_index"].to_numpy()
    return np.asarray(prediction).argmax(1)


@pytest.mark.slow
def test_mlflow_run_train_tracks_and_registers(tiny_cifar, tmp_path):
    env = stage_env(tmp_path)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a tiny run lasts seconds
    make_experiment(tmp_path, "e2e")
    # Lookahead on top of the default recipe (which has none): what is registered must be
    # its slow weights, checked at the end.
    overrides = " ".join(
        tiny_overrides(tiny_cifar, tmp_path)
        + ["optim.lookahead_k=2", "optim.lookahead_buffers=true"]
    )
    result = subprocess.run(
        [
            str(sys.executable.rsplit("/", 1)[0] + "/mlflow"),
            "run",
            ".",
            "-e",
            "train",
            "--env-manager",
            "local",
            "--experiment-name",
            "e2e",
            "-P",
            "epochs=2",
            "-P",
            f"overrides={overrides}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "resnet_small" and params["train.epochs"] == "2"
    # recipe=auto is fast on a machine without CUDA, and says so.
    assert params["recipe"] == "fast" and params["requested_recipe"] == "auto"
    assert params["optim.name"] == "muon" and params["optim.lr"] == "0.825"
    assert int(params["parameters"]) == 272_474
    assert params["train.precision"] == "auto"
    assert params["resolved_precision"] == hardware.resolve_precision("auto", torch.device("cpu"))
    assert {"device", "torch_version", "cuda_version", "git_commit"} <= set(params)
    assert len(params["data_md5.data_batch_1"]) == 32
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in ("best_val_acc", "test_acc", "test_loss"):
        assert key in run.data.metrics
    assert any(key.startswith("system/cpu") for key in run.data.metrics)  # MLflow's own
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for folder in ("config", "plots", "checkpoints", "environment"):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder)}
    assert set(ARTIFACTS) <= artifacts

    # Lineage in MLflow's own terms: the data set as an input, named by its files' MD5s.
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cifar10" and len(dataset_input.dataset.digest) == 8
    assert {t.key: t.value for t in dataset_input.tags}["train_images"] == "150"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    requirements = mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/environment/requirements.txt"
    )
    assert "\ntorch==" in requirements and "\nmlflow==3.17.2" in requirements

    [version] = client.search_model_versions("name='tiny-cifar'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert "recipe=fast model=resnet_small" in version.description
    assert run.info.run_id in version.description
    assert float(version.tags["test_acc"]) == pytest.approx(run.data.metrics["test_acc"], abs=1e-4)
    assert float(version.tags["val_acc"]) == pytest.approx(
        run.data.metrics["best_val_acc"], abs=1e-4
    )

    # The registered model predicts what the best checkpoint predicts.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-cifar/1")
    images, _ = data.load_cifar10(tiny_cifar.root, train=False)
    # The run's own checkpoint folder is gone once it FINISHED; MLflow holds best.pt. The
    # folder of all checkpoints goes too when nothing else (a killed run's) is left in it.
    assert not (tmp_path / "checkpoints").exists()
    checkpoint = engine.load_checkpoint(
        mlflow.artifacts.download_artifacts(
            f"runs:/{run.info.run_id}/checkpoints/best.pt", dst_path=str(tmp_path / "download")
        )
    )
    from cifar_resnet.models import ImageClassifier, build_model

    model = ImageClassifier(build_model("resnet_small"), (0, 0, 0), (1, 1, 1))
    # The weights the run means: under Lookahead the slow copies of the trainable
    # parameters and, with optim.lookahead_buffers, of the float buffers (BN statistics,
    # input mean/std).
    parts = checkpoint["parts"]
    assert "ema" not in parts
    model.load_state_dict(parts["model"])
    averaged = [p for p in model.parameters() if p.requires_grad]
    averaged += [b for b in model.buffers() if b.is_floating_point()]
    assert len(averaged) == len(parts["lookahead"]["slow"])
    with torch.no_grad():
        for tensor, slow in zip(averaged, parts["lookahead"]["slow"]):
            tensor.copy_(slow)
    expected = engine.predict_logits(model, images, torch.device("cpu")).argmax(1).numpy()
    np.testing.assert_array_equal(predicted_classes(pyfunc.predict(images)), expected)


def _run_ids(tmp_path, experiment="tests"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else [r.info.run_id for r in client.search_runs([exp.experiment_id])]


def _corrupt_copy(tiny, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(tiny.root, root)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing data", {"data.root": "{tmp}/nowhere"}, "CIFAR10_ROOT"),
        ("corrupt batch", {"data.root": "{corrupt}"}, "data_batch_3"),
        ("unknown model name", {"model.name": "resnet1000"}, "unknown model"),
        (
            "over 5M parameters",
            {"model": "wide_resnet", "model.kwargs.widen_factor": 8},
            "over the limit",
        ),
        ("zero epochs", {"train.epochs": 0}, "train.epochs must be a positive integer"),
        ("negative epochs", {"train.epochs": -2}, "train.epochs must be a positive integer"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_logged(
    tiny_cifar, tmp_path, case, extra, message
):
    env = stage_env(tmp_path)
    corrupt = _corrupt_copy(tiny_cifar, tmp_path) if case == "corrupt batch" else None
    extra = {k: str(v).format(tmp=tmp_path, corrupt=corrupt) for k, v in extra.items()}
    result = run_module(
        "cifar_resnet.stages.train", tiny_overrides(tiny_cifar, tmp_path, **extra), env, timeout=120
    )
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _run_ids(tmp_path) == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_registered_models() == []


def test_unknown_model_group_fails_with_the_known_names(tiny_cifar, tmp_path):
    result = run_module(
        "cifar_resnet.stages.train",
        tiny_overrides(tiny_cifar, tmp_path, model="nope"),
        stage_env(tmp_path),
        timeout=120,
    )
    # model= is also the MLproject parameter, checked before Hydra composes anything.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'nope'" in result.stderr and "seed_resnet" in result.stderr


@pytest.mark.cifar
@pytest.mark.slow
def test_two_short_epochs_on_real_cifar(cifar_root, tmp_path):
    env = stage_env(tmp_path)
    make_experiment(tmp_path, "tests")
    args = [
        "~recipe",
        f"data.root={cifar_root}",
        "data.train_subset=2000",
        "data.val_size=500",
        "data.num_workers=0",
        "model=resnet_small",
        "train.epochs=2",
        "train.batch_size=128",
        "train.progress=false",
        f"train.checkpoint_dir={tmp_path}/checkpoints",
        "experiment_name=tests",
        "registry.register=false",
    ]
    result = run_module("cifar_resnet.stages.train", args, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_id] = _run_ids(tmp_path)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.params["train_images"] == "2000" and run.data.params["val_images"] == "500"
    # 10 classes: ~30 steps on 2,000 images already beat chance (10%) by a margin.
    assert run.data.metrics["test_acc"] > 0.15
