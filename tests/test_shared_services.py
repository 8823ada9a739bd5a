"""Past one machine, on real servers started here (docs/scaling.md, sections 2 and 3):
two tune workers at once on one Optuna study in PostgreSQL, and the project used
unchanged against an MLflow tracking server (PostgreSQL backend store, artifacts
proxied by the server): train, finetune from the workers' study, eval_tta, promote,
and `mlflow models serve` of the champion. The password reaches every process through
PGPASSWORD only, never a URL or a command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import requests
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import PASSWORD, free_port, stop_process_group, wait_for_http
from stage_utils import BIN, REPO, run_module, stage_env, tiny_overrides, write_md5_file

pytestmark = pytest.mark.slow

STUDY = "shared-study"
MODEL = "cifar10-resnet"  # conf/registry's name: the README's serve command as written
NO_RECIPE = "~recipe"


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def tracking(postgres, tmp_path_factory):
    """`mlflow server` on a PostgreSQL backend store, serving the artifacts itself."""
    tmp = tmp_path_factory.mktemp("tracking")
    backend = postgres.create_database("mlflow")
    port = free_port()
    log = tmp / "server.log"
    # No job runner (huey consumers for MLflow's GenAI jobs): nothing here uses it.
    env = {**stage_env(tmp), **postgres.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",  # the suite's two cores; a real server keeps the default
        ],
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log)
        yield SimpleNamespace(url=url, artifacts=tmp / "artifacts", client=MlflowClient(url))
    finally:
        stop_process_group(process, 5)


def client_env(tmp: Path, postgres, tracking) -> dict[str, str]:
    """A project process's environment on another machine: the tracking server's URL
    and the database password, nothing else shared."""
    return {**stage_env(tmp), **postgres.env(), "MLFLOW_TRACKING_URI": tracking.url}


@pytest.fixture(scope="module")
def study(postgres, tracking, tiny_cifar, tmp_path_factory):
    """Two tune workers started together on one study: one as the README's `mlflow run`,
    one as `python -m`. Each may run 2 trials, the study holds at most 3: both must run."""
    tmp = tmp_path_factory.mktemp("workers")
    storage = postgres.create_database("optuna")
    experiment = tracking.client.create_experiment("tuning")
    env = client_env(tmp, postgres, tracking)
    overrides = [
        *tiny_overrides(
            tiny_cifar,
            tmp,
            **{
                "data.loader": "tensor",
                "train.batch_size": 16,
                "train.precision": "fp32",
                "experiment_name": "tuning",
                "tune": "seed",
            },
        ),
        NO_RECIPE,
    ]
    caps = {"n_trials": 2, "max_trials": 3, "epochs": 1, "study_name": STUDY, "storage": storage}
    mlflow_run = [str(BIN / "mlflow"), "run", ".", "-e", "tune", "--env-manager", "local"]
    mlflow_run += ["--experiment-name", "tuning"]
    for key, value in {**caps, "overrides": " ".join(overrides)}.items():
        mlflow_run += ["-P", f"{key}={value}"]
    python_m = [sys.executable, "-m", "cifar_resnet.stages.tune", *overrides]
    python_m += [f"tune.{key}={value}" for key, value in caps.items()]
    logs = [tmp / "worker_a.log", tmp / "worker_b.log"]
    workers = [start(mlflow_run, env, logs[0]), start(python_m, env, logs[1])]
    try:
        for worker, log in zip(workers, logs):
            assert worker.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        for worker in workers:
            stop_process_group(worker, 5)
    rdb = optuna.storages.RDBStorage(
        storage, engine_kwargs={"connect_args": {"password": PASSWORD}}
    )
    return SimpleNamespace(
        storage=storage,
        trials=optuna.load_study(study_name=STUDY, storage=rdb).get_trials(),
        experiment=experiment,
        logs=[log.read_text() for log in logs],
    )


def test_two_tune_workers_share_one_study_in_postgresql(study, tracking):
    trials = study.trials
    numbers = [t.number for t in trials]
    # max_trials=3 over both workers; each checks after its trial, so two finishing at
    # the same moment may both start one more: 4 at most.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(trials)
    assert 3 <= len(trials) <= 4 and numbers == list(range(len(trials)))
    # Trial n drew with seed + n: no two workers' start-up trials are the same.
    assert len({t.params["optim.lr"] for t in trials}) == len(trials)

    client = tracking.client
    runs = client.search_runs([study.experiment], f"tags.`optuna.study_name` = '{STUDY}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    by_worker = {
        parent.info.run_id: {
            int(r.data.tags["optuna.trial_number"])
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        for parent in parents
    }
    # Each trial is a nested run under the worker that ran it; both workers ran some.
    a, b = by_worker.values()
    assert a and b and not a & b and a | b == set(numbers), by_worker
    assert len(runs) == len(parents) + len(trials)
    for trial in trials:
        assert (
            client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
            in by_worker
        )
    # Both parents summarise the whole study; the storage param has no password to hide.
    for parent in parents:
        assert parent.data.params["tune.storage"] == study.storage
        assert int(parent.data.metrics["trials_run"]) == len(by_worker[parent.info.run_id])


def test_the_project_against_a_tracking_server(study, tracking, postgres, tiny_cifar, tmp_path):
    """train registers version 1, finetune from the workers' study version 2; eval_tta
    tags version 2, promote moves champion, and the champion is served."""
    env = {**client_env(tmp_path, postgres, tracking), "OPTUNA_STORAGE": study.storage}
    data = {"data.loader": "tensor", "train.batch_size": 16, "train.precision": "fp32"}
    names = {"registry.model_name": MODEL, "experiment_name": "e2e"}
    trained = run_module(
        "cifar_resnet.stages.train",
        [*tiny_overrides(tiny_cifar, tmp_path, **data, **names, **{"train.epochs": 1}), NO_RECIPE],
        env,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    # The study's storage from OPTUNA_STORAGE, its password from PGPASSWORD.
    finetune = [f"finetune.model_uri=models:/{MODEL}/1", f"finetune.from_study={STUDY}"]
    finetune += tiny_overrides(tiny_cifar, tmp_path, **data, **names, **{"train.epochs": 1})
    tuned = run_module("cifar_resnet.stages.finetune", finetune, env)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]

    client = tracking.client
    v1, v2 = (client.get_model_version(MODEL, str(n)) for n in (1, 2))
    # The best trial, whichever worker ran it (tiny trials may tie: any best one).
    best = study.trials[int(v2.tags["finetune.best_trial"])]
    assert v2.tags["finetune.from_study"] == STUDY
    assert best.value == max(t.value for t in study.trials)
    assert float(client.get_run(v2.run_id).data.params["optim.lr"]) == pytest.approx(
        best.params["optim.lr"]
    )

    evaluation = [f"data.root={tiny_cifar.root}", "data.download=false"]
    evaluation += [f"data.md5_file={write_md5_file(tiny_cifar)}"]
    evaluation += [f"{k}={v}" for k, v in names.items()]
    evaluated = run_module(
        "cifar_resnet.stages.eval_tta",
        [*evaluation, f"eval.model_uri=models:/{MODEL}/2", "tta=flip"],
        env,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert "test_acc_tta_flip" in client.get_model_version(MODEL, "2").tags

    promoted = run_module(
        "cifar_resnet.stages.promote", [f"{k}={v}" for k, v in names.items()], env
    )
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    champion = max((float(v.tags["val_acc"]), int(v.version)) for v in (v1, v2))[1]
    assert int(client.get_registered_model(MODEL).aliases["champion"]) == champion

    # Artifacts went through the server's proxy into its --artifacts-destination.
    assert client.get_run(v1.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    assert any(path.name == "MLmodel" for path in tracking.artifacts.rglob("MLmodel"))

    port = free_port()
    log = tmp_path / "serve.log"
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"]
    serve += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    server = start(serve, env, log)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, log, timeout=150)
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).tolist()
        answer = requests.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": images}, timeout=60
        )
    finally:
        stop_process_group(server, 5)
    assert answer.status_code == 200, answer.text[-2000:]
    predictions = answer.json()["predictions"]
    assert len(predictions) == 2
    assert all(len(p["probabilities"]) == 10 for p in predictions)
