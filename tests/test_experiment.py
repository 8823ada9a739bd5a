"""A tracked training as users start it (`python -m cifar_resnet.stages.train`): the
same seed gives the same run, an interrupted run resumed equals the uninterrupted one,
and resume refuses what would break that."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from stage_utils import REPO, make_experiment, run_module, stage_env, tiny_overrides

from cifar_resnet import engine, experiment, hardware, pipeline
from cifar_resnet.models import ImageClassifier, build_model

EPOCHS = 3
TIMING = ("epoch_seconds", "images_per_second")
TRAIN = "cifar_resnet.stages.train"


def epoch_sized_for(seconds: float, batch_size: int, train_images: int) -> tuple[int, float]:
    """(data.repeats, expected seconds an epoch) so that an epoch of resnet_small lasts
    about ``seconds`` here, at the precision ``auto`` picks: measured, so that a slow
    CPU gets a shorter epoch instead of a test that times out."""
    cpu = torch.device("cpu")
    amp = hardware.autocast_dtype(hardware.resolve_precision("auto", cpu))
    model = ImageClassifier(build_model("resnet_small"), (0.5,) * 3, (0.25,) * 3)
    rate = pipeline.measure_images_per_second(model, batch_size, cpu, amp, steps=3)
    repeats = max(2, round(seconds * rate / train_images))
    return repeats, repeats * train_images / rate


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_cifar):
    """A tracking store, the arguments every run here shares, and one uninterrupted run."""
    tmp = tmp_path_factory.mktemp("runs")
    env = stage_env(tmp)
    make_experiment(tmp, "tests")
    repeats, epoch_seconds = epoch_sized_for(2.0, batch_size=64, train_images=150)
    args = tiny_overrides(
        tiny_cifar,
        tmp,
        **{
            "train.epochs": EPOCHS,
            "data.repeats": repeats,
            "train.batch_size": 64,
            "train.deterministic": "true",
            "registry.register": "false",
            "train.keep_checkpoints": "true",  # the tests below read a finished run's last.pt
            # recipe=fast (the default here) at a rate its 64-image batches do not blow up at.
            "optim.lr": 0.05,
        },
    )
    baseline = run_module(TRAIN, args, env)
    assert baseline.returncode == 0, baseline.stdout[-3000:] + baseline.stderr[-3000:]
    return {
        "tmp": tmp,
        "env": env,
        "args": args,
        "epoch_seconds": epoch_seconds,
        "baseline": run_id_of(baseline.stdout),
    }


def run_id_of(stdout: str) -> str:
    return next(line.split()[2] for line in stdout.splitlines() if line.startswith("MLflow run "))


def last_checkpoint(store, run_id: str) -> dict:
    return engine.load_checkpoint(store["tmp"] / "checkpoints" / run_id / "last.pt")


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in history]


def assert_same_run(a: dict, b: dict) -> None:
    """Per-epoch metrics (lr included) and every final tensor equal, to float tolerance."""
    history_a, history_b = (
        without_timing(a["state"]["history"]),
        without_timing(b["state"]["history"]),
    )
    assert len(history_a) == len(history_b) == EPOCHS
    for epoch_a, epoch_b in zip(history_a, history_b):
        assert epoch_a.keys() == epoch_b.keys()
        for key in epoch_a:
            assert epoch_a[key] == pytest.approx(epoch_b[key], rel=1e-6, abs=1e-7), key
    for key, tensor in a["parts"]["model"].items():
        torch.testing.assert_close(tensor, b["parts"]["model"][key], msg=key)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_and_another_seed_another(store):
    again = run_module(TRAIN, store["args"], store["env"])
    other = run_module(TRAIN, [*store["args"], "seed=1"], store["env"])
    assert again.returncode == 0 and other.returncode == 0, (
        again.stderr[-2000:] + other.stderr[-2000:]
    )
    baseline = last_checkpoint(store, store["baseline"])
    assert_same_run(last_checkpoint(store, run_id_of(again.stdout)), baseline)
    different = last_checkpoint(store, run_id_of(other.stdout))
    assert (
        different["state"]["history"][0]["train_loss"]
        != baseline["state"]["history"][0]["train_loss"]
    )
    assert not torch.equal(
        different["parts"]["model"]["net.head.3.weight"],
        baseline["parts"]["model"]["net.head.3.weight"],
    )


def start_training(store) -> subprocess.Popen:
    """The store's training as a process of its own, its output merged on stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", TRAIN, *store["args"]],
        cwd=REPO,
        env=store["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As from a terminal: a job started in the background (CI under nohup, `make &`)
        # inherits SIGINT ignored, and Python then keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "Ctrl-C", "SIGKILL"]
)
def test_an_interrupted_run_resumed_equals_the_uninterrupted_one(store, stop):
    process = start_training(store)
    run_id = None
    deadline = time.monotonic() + 120 + 10 * store["epoch_seconds"]  # start-up, then an epoch
    for line in process.stdout:  # the run id comes first, the first epoch's line later
        if line.startswith("MLflow run "):
            run_id = line.split()[2]
        if line.startswith("epoch   1/") or time.monotonic() > deadline:
            break
    assert run_id and (store["tmp"] / "checkpoints" / run_id / "last.pt").is_file()
    time.sleep(store["epoch_seconds"] / 3)  # into the second epoch
    process.send_signal(stop)
    output = process.communicate(timeout=60)[0]
    killed_at = last_checkpoint(store, run_id)["state"]["epoch"]
    assert 1 <= killed_at < EPOCHS, "the run finished before the signal; make epochs longer"

    client = MlflowClient(f"sqlite:///{store['tmp']}/mlflow.db")
    if stop != signal.SIGKILL:  # stopped from outside, with the word out: KILLED, resumable
        assert process.returncode == 128 + stop, output[-2000:]
        assert client.get_run(run_id).info.status == "KILLED"
        assert f"the run is marked KILLED; continue it with resume={run_id}" in output
        assert "Traceback" not in output
    else:  # nobody could close the run
        assert client.get_run(run_id).info.status == "RUNNING"

    resumed = run_module(
        TRAIN,
        [f"resume={run_id}", f"train.checkpoint_dir={store['tmp'] / 'checkpoints'}"],
        store["env"],
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed after epoch {killed_at}" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_same_run(last_checkpoint(store, run_id), last_checkpoint(store, store["baseline"]))
    # One series in MLflow, no gap, no repeat, the same values as the uninterrupted run's.
    for key in ("train_loss", "val_acc", "lr"):
        ours = client.get_metric_history(run_id, key)
        theirs = client.get_metric_history(store["baseline"], key)
        assert sorted(m.step for m in ours) == list(range(1, EPOCHS + 1)), key
        values = [m.value for m in sorted(ours, key=lambda m: m.step)]
        assert values == pytest.approx(
            [m.value for m in sorted(theirs, key=lambda m: m.step)], rel=1e-6
        ), key


@pytest.mark.slow
def test_a_run_stopped_before_its_first_epoch_was_saved_offers_no_resume(store):
    process = start_training(store)
    for line in process.stdout:  # the epoch takes ~2 s after this line
        if line.startswith("MLflow run "):
            run_id = line.split()[2]
            break
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert not (store["tmp"] / "checkpoints" / run_id / "last.pt").exists()
    assert "no epoch was saved, so there is nothing to resume: start it again" in output
    assert "resume=" not in output and "Traceback" not in output
    client = MlflowClient(f"sqlite:///{store['tmp']}/mlflow.db")
    assert client.get_run(run_id).info.status == "KILLED"


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_overrides(store):
    checkpoints = f"train.checkpoint_dir={store['tmp'] / 'checkpoints'}"
    finished = run_module(TRAIN, [f"resume={store['baseline']}", checkpoints], store["env"])
    assert "finished" in one_error_line(finished)
    with_overrides = run_module(
        TRAIN, [f"resume={store['baseline']}", checkpoints, "train.epochs=9"], store["env"]
    )
    assert "train.epochs=9" in one_error_line(with_overrides)


def test_a_checkpoint_of_another_version_or_machine_is_refused(tmp_path, monkeypatch):
    from cifar_resnet.config import ConfigError

    monkeypatch.setattr(experiment.tracking, "run_status", lambda run_id: "KILLED")
    path = tmp_path / "abc" / "last.pt"
    path.parent.mkdir()
    torch.save({"version": 1, "config": "{}"}, path)
    with pytest.raises(ConfigError, match="version 1 checkpoint"):
        experiment.load_resume_checkpoint(tmp_path, "abc")
    monkeypatch.setattr(experiment.tracking, "run_status", lambda run_id: None)
    with pytest.raises(ConfigError, match="no such MLflow run"):
        experiment.load_resume_checkpoint(tmp_path, "abc")

    class Train:
        precision = "fp32"

    class Settings:
        train = Train()

    checkpoint = {"machine": {"device": "cpu", "precision": "bf16"}}
    with pytest.raises(ConfigError, match="started on cpu in bf16"):
        experiment.check_same_machine(checkpoint, Settings(), torch.device("cpu"))
    checkpoint["machine"]["precision"] = "fp32"
    experiment.check_same_machine(checkpoint, Settings(), torch.device("cpu"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.max_params=1000"], "over the limit model.max_params=1,000"),
        (["model=resnet9", "optim.stem_bias_schedule=anneal"], "stem_bias_schedule=anneal"),
    ],
)
def test_a_network_the_settings_cannot_build_is_refused_before_any_data_is_read(
    tmp_path, overrides, message
):
    from hydra import compose, initialize_config_dir

    from cifar_resnet.config import ConfigError, to_container, train_settings
    from cifar_resnet.stages import CONF_DIR

    # No data at this root and no download: reading it first would be a DataError.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = to_container(
            compose(
                config_name="train",
                overrides=[
                    "recipe=fast",
                    f"data.root={tmp_path}",
                    "data.download=false",
                    *overrides,
                ],
            )
        )
    with pytest.raises(ConfigError, match=message):
        experiment.train_and_register(train_settings(config), config)
    assert list(tmp_path.iterdir()) == []
