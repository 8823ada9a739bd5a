"""The tune entry point: an Optuna study with MLflow child runs, pruning, failed
trials, a real SIGKILL and a resume that keeps every finished trial."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from stage_utils import BIN, REPO, make_experiment, run_module, stage_env, tiny_overrides

from cifar_resnet import tuning
from cifar_resnet.config import ConfigError, TuneSettings, section_settings, to_container
from cifar_resnet.engine import NonFiniteLossError
from cifar_resnet.stages import CONF_DIR
from cifar_resnet.tuning import parse_space, with_values

# The regime these margins were measured in: train.yaml's own, without the default
# recipe's EMA and learning rate.
NO_RECIPE = "~recipe"
STUDY = "tiny-study"
GOOD_LR, DIVERGING_LR, FROZEN_LR = 0.02, 1.0e4, 1.0e-9


def tune_overrides(tiny, tmp, **extra) -> list[str]:
    """Tiny data, 16-image batches (9 steps an epoch), the seed space widened down to
    a learning rate that learns nothing, and a median pruner that may prune from
    the first epoch once one trial has completed."""
    values = {
        "data.loader": "tensor",
        "train.batch_size": 16,
        "tune": "seed",
        "tune.space.optim.lr.low": FROZEN_LR,
        "tune.space.optim.lr.high": 0.05,
        "tune.pruners.median.n_startup_trials": 1,
        "tune.pruners.median.n_warmup_steps": 0,
        # Heartbeats every second: a killed trial is failed 2 s after its last beat.
        "tune.heartbeat_interval": 1,
        "tune.grace_period": 2,
    }
    values.update(extra)
    return [*tiny_overrides(tiny, tmp, **values), NO_RECIPE]


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


def finished(storage: str) -> dict[int, tuple]:
    return {
        t.number: (t.state, t.value, t.params)
        for t in trials(storage)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }


def running_trials_once_one_reports(process, storage: str) -> list[optuna.trial.FrozenTrial]:
    """Wait (240 s at most) until a running trial of ``process`` has reported an epoch;
    the running trials that have."""
    deadline = time.monotonic() + 240
    while True:
        try:
            running = [
                t
                for t in trials(storage)
                if t.state == TrialState.RUNNING and t.intermediate_values
            ]
        except KeyError:  # the study is not created yet
            running = []
        if running:
            return running
        assert process.poll() is None, "".join(filter(None, process.communicate()))[-3000:]
        assert time.monotonic() < deadline, "no trial reported an epoch in time"
        time.sleep(0.2)


def child_runs(client: MlflowClient, parent) -> dict[int, object]:
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs}


@pytest.mark.slow
def test_tune_prunes_records_failures_survives_a_kill_and_resumes(tiny_cifar, tmp_path):
    env = stage_env(tmp_path)
    make_experiment(tmp_path, "e2e")
    make_experiment(tmp_path, "tests")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # The first trials' learning rates are fixed, so which ones must be pruned is
    # known: one that learns completes; one that diverges fails (NaN loss); two that
    # learn nothing fall below the completed trial's curve and are pruned.
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    for lr in (GOOD_LR, DIVERGING_LR, FROZEN_LR, FROZEN_LR):
        study.enqueue_trial({"optim.lr": lr, "optim.weight_decay": 1e-5})

    # 1. Three finished trials through `mlflow run`; the failed one does not count.
    result = subprocess.run(
        [
            str(BIN / "mlflow"),
            "run",
            ".",
            "-e",
            "tune",
            "--env-manager",
            "local",
            "--experiment-name",
            "e2e",
            "-P",
            "max_trials=3",
            "-P",
            "epochs=2",
            "-P",
            f"study_name={STUDY}",
            "-P",
            f"storage={storage}",
            "-P",
            f"overrides={' '.join(tune_overrides(tiny_cifar, tmp_path))}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    states = [t.state for t in trials(storage)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.PRUNED]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id],
        "tags.`tune.study_name` = 'tiny-study'",
    )
    metrics = parent.data.metrics
    assert (metrics["trials_complete"], metrics["trials_pruned"], metrics["trials_failed"]) == (
        1,
        2,
        1,
    )
    best = trials(storage)[0]
    assert metrics["best_val_acc"] == pytest.approx(best.value)
    assert float(parent.data.params["best.optim.lr"]) == pytest.approx(GOOD_LR)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    # Importances need two complete trials: skipped, not an error.
    assert plots == {"plots/optimization_history.png"}
    assert {"trials.csv", "best_params.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    children = child_runs(client, parent)
    assert {n: (r.data.tags["optuna.state"], r.info.status) for n, r in children.items()} == {
        0: ("complete", "FINISHED"),
        1: ("failed", "FAILED"),
        2: ("pruned", "FINISHED"),
        3: ("pruned", "FINISHED"),
    }
    assert "NonFiniteLossError" in children[1].data.tags["failure"]
    # The best trial's run, to name as a final fit's chooser: printed and tagged.
    best_run = children[0].info.run_id
    assert parent.data.tags["best_trial_run_id"] == best_run
    assert f"best: trial 0 (run {best_run}) val_acc" in result.stdout
    # Every run of the study, parent and trials, carries its name: the UI groups them.
    assert {r.data.tags["optuna.study_name"] for r in [parent, *children.values()]} == {STUDY}
    assert float(children[0].data.params["optim.lr"]) == pytest.approx(GOOD_LR)
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_acc")] == [1, 2]
    # Trials choose hyperparameters: no test metric anywhere, and no registered model.
    assert not any(k.startswith("test_") for r in children.values() for k in r.data.metrics)
    assert client.search_registered_models() == []
    before = finished(storage)

    # 2. Toward 5 finished trials, killed for real inside a (long, unprunable) trial.
    args = tune_overrides(
        tiny_cifar,
        tmp_path,
        **{
            "tune.study_name": STUDY,
            "tune.storage": storage,
            "tune.max_trials": 5,
            "tune.epochs": 40,
            "tune.pruner": "none",
        },
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "cifar_resnet.stages.tune", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = running_trials_once_one_reports(process, storage)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    [killed] = running
    assert trials(storage)[killed.number].state == TrialState.RUNNING  # nobody closed it
    assert finished(storage) == before

    # 3. Resume: only the missing trials run; the finished ones are untouched.
    time.sleep(2.5)  # past the grace period: the killed trial's heartbeat is stale
    args = tune_overrides(
        tiny_cifar,
        tmp_path,
        **{
            "tune.study_name": STUDY,
            "tune.storage": storage,
            "tune.max_trials": 5,
            "tune.epochs": 2,
        },
    )
    resumed = run_module("cifar_resnet.stages.tune", args, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # The killed trial was failed at start (its heartbeat is stale): it no longer counts.
    assert "3 finished trials, 0 running; this worker runs up to 2 more" in resumed.stdout
    after = finished(storage)
    assert len(after) == 5
    assert {n: after[n] for n in before} == before
    assert all(n > killed.number for n in set(after) - set(before))
    assert trials(storage)[killed.number].state == TrialState.FAIL
    killed_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "KILLED" and killed_run.data.tags["optuna.state"] == "failed"


@pytest.mark.slow
# SIGTERM only: Ctrl-C takes the same path (tests/test_interrupts.py), and the suite's time
# is counted on a 2-core CPU.
@pytest.mark.parametrize("stop", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_tune_stopped_from_outside_closes_its_runs_and_says_how_to_go_on(
    tiny_cifar, tmp_path, stop
):
    env = stage_env(tmp_path)
    make_experiment(tmp_path, "tests")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = tune_overrides(
        tiny_cifar,
        tmp_path,
        **{"tune.study_name": STUDY, "tune.storage": storage, "tune.epochs": 40},
        **{"tune.pruner": "none", "tune.max_trials": 2},
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "cifar_resnet.stages.tune", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal starts it: a background job would inherit SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    running_trials_once_one_reports(process, storage)
    process.send_signal(stop)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    word = "terminated" if stop == signal.SIGTERM else "interrupted"
    assert f"{word}: this tune run (" in err and "with any trial it was running failed" in err
    # Closed now, not when a later worker finds its heartbeat stale.
    [trial] = trials(storage)
    assert trial.state == TrialState.FAIL
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "KILLED" and trial_run.data.tags["optuna.state"] == "failed"
    parent = client.get_run(trial_run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and f"({parent.info.run_id})" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("empty search space", {"tune.space": "null"}, "tune.space is empty"),
        (
            "unknown distribution",
            {"tune.space.optim.lr.type": "gaussian"},
            "tune.space.optim.lr.type must be one of",
        ),
        ("storage that is not a URL", {"tune.storage": "not-a-url"}, "is not a SQLAlchemy URL"),
    ],
)
def test_tune_bad_input_is_one_clear_line(tiny_cifar, tmp_path, case, extra, message):
    env = stage_env(tmp_path)
    make_experiment(tmp_path, "tests")
    extra = {"tune.storage": f"sqlite:///{tmp_path}/optuna.db", **extra}
    result = run_module(
        "cifar_resnet.stages.tune", tiny_overrides(tiny_cifar, tmp_path, **extra), env, timeout=120
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([client.get_experiment_by_name("tests").experiment_id]) == []


CONFIG = {"optim": {"lr": 0.1, "weight_decay": 5e-4}, "train": {"epochs": 3}}


def test_default_space_is_log_uniform_around_the_configs_values():
    space = {
        "optim": {
            "lr": {"type": "float", "log": True, "factor": 10},
            "weight_decay": {"type": "float", "log": True, "factor": 10},
        }
    }
    lr, wd = parse_space(space, CONFIG)
    assert (lr.key, lr.low, lr.high, lr.log) == ("optim.lr", pytest.approx(0.01), 1.0, True)
    assert (wd.key, wd.low, wd.high) == (
        "optim.weight_decay",
        pytest.approx(5e-5),
        pytest.approx(5e-3),
    )


def test_the_muon_space_searches_the_filters_rate_around_the_recipes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = to_container(compose(config_name="tune", overrides=["recipe=fast", "tune=muon"]))
    params = {p.key: p for p in parse_space(config["tune"]["space"], config)}
    assert set(params) == {"optim.lr", "optim.weight_decay", "optim.muon_lr"}
    muon_lr = params["optim.muon_lr"]
    assert (muon_lr.low, muon_lr.high) == (pytest.approx(0.017), pytest.approx(1.7))


def test_space_keys_must_exist_in_the_config():
    with pytest.raises(ConfigError, match="no key 'optim.learning_rate'"):
        parse_space({"optim": {"learning_rate": {"type": "float", "low": 1, "high": 2}}}, CONFIG)
    with pytest.raises(ConfigError, match="no key 'optim.momentum'"):
        with_values(CONFIG, {"optim.momentum": 0.9})
    assert with_values(CONFIG, {"optim.lr": 0.5})["optim"]["lr"] == 0.5
    assert CONFIG["optim"]["lr"] == 0.1  # a copy: the base config is shared by all trials


# --------------------------------------------------------------------------- workers
# Several workers on one study, without training: the objective only samples.


def settings(*overrides: str) -> TuneSettings:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="tune", overrides=["tune=seed", *overrides])
    return section_settings(TuneSettings, "tune", to_container(cfg)["tune"])


def sample_only(trial: optuna.Trial) -> float:
    return trial.suggest_float("optim.lr", 1e-6, 1e-2, log=True)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_trial_n_draws_with_seed_plus_n_whichever_worker_runs_it(tmp_path, kind):
    """Start-up (random) trials: two workers alternating on one study (SQLite, or a
    JournalStorage file) draw exactly what one worker alone draws with the same seed,
    and never the same values twice."""
    values = ("tune.startup_trials=10", "tune.n_trials=1", "tune.max_trials=6")
    alone = settings(f"tune.storage=sqlite:///{tmp_path}/alone.db", *values)
    study = tuning.open_study(alone)
    for _ in range(6):
        assert tuning.optimize(study, sample_only, alone) == 1
    shared = settings(f"tune.storage={kind}:///{tmp_path}/shared.{kind}", *values)
    workers = [tuning.open_study(shared), tuning.open_study(shared)]
    for turn in range(6):
        assert tuning.optimize(workers[turn % 2], sample_only, shared) == 1
    drawn = [t.params["optim.lr"] for t in workers[0].get_trials()]
    assert drawn == [t.params["optim.lr"] for t in study.get_trials()]
    assert len(set(drawn)) == 6
    assert tuning.optimize(workers[1], sample_only, shared) == 0  # the study is full


def test_n_trials_caps_this_worker_and_max_trials_the_whole_study(tmp_path, capsys):
    caps = settings(f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.n_trials=3")
    assert (caps.n_trials, caps.max_trials) == (3, 20)  # max_trials: conf/tune.yaml's default
    caps = settings(
        f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.n_trials=3", "tune.max_trials=6"
    )
    first, second = tuning.open_study(caps), tuning.open_study(caps)
    # Another worker's running trial counts toward max_trials.
    other = optuna.load_study(study_name=caps.study_name, storage=caps.storage)
    running = other.ask()
    assert tuning.optimize(first, sample_only, caps) == 3  # its own cap
    assert tuning.optimize(second, sample_only, caps) == 2  # the study's: 3 + 1 running + 2
    assert "3 finished trials, 1 running; this worker runs up to 2 more" in capsys.readouterr().out
    other.tell(running, 0.5)
    assert tuning.optimize(tuning.open_study(caps), sample_only, caps) == 0
    assert len(first.get_trials(states=tuning.FINISHED)) == 6


def test_a_worker_stops_after_max_failed_trials(tmp_path):
    def diverges(trial: optuna.Trial) -> float:
        sample_only(trial)
        raise NonFiniteLossError("loss is nan")

    limits = settings(f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.max_failed_trials=2")
    study = tuning.open_study(limits)
    assert tuning.optimize(study, diverges, limits) == 2
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 2


def test_the_pruner_compares_with_every_workers_trials(tmp_path):
    """A trial is pruned against the curves of trials another worker ran."""
    shared = settings(
        f"tune.storage=sqlite:///{tmp_path}/optuna.db",
        "tune.n_trials=1",
        "tune.pruners.median.n_startup_trials=1",
        "tune.pruners.median.n_warmup_steps=0",
    )

    def curve(accuracy: float):
        def objective(trial: optuna.Trial) -> float:
            sample_only(trial)
            for epoch in (1, 2, 3):
                trial.report(accuracy, step=epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return accuracy

        return objective

    first, second = tuning.open_study(shared), tuning.open_study(shared)
    assert tuning.optimize(first, curve(0.9), shared) == 1
    assert tuning.optimize(second, curve(0.1), shared) == 1
    assert [t.state for t in second.get_trials()] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert second.get_trials()[1].last_step == 1  # at the first epoch, by the other's curve
