"""MLproject, entry point by entry point: how each `-P` reaches the config, that no
stage logs a param under an MLproject parameter's name (`mlflow run` has already
logged that one), and `mlflow run` of every entry point with every parameter set to
something other than its default, on one tiny store shared by the module."""

from __future__ import annotations

import ast
import importlib
import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from stage_utils import BIN, REPO, make_experiment, stage_env, tiny_overrides

import cifar_resnet
from cifar_resnet.config import (
    ConfigError,
    TuneSettings,
    flatten,
    key_type,
    section_settings,
    to_container,
)
from cifar_resnet.stages import (
    CONF_DIR,
    ParameterError,
    launch,
    mlproject_argv,
    processes_wanted,
)

ENTRY_POINTS = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
PACKAGE = Path(cifar_resnet.__file__).resolve().parent

# Every character the issue names, Hydra's and OmegaConf's syntax, and shell specials.
EVERY_CHARACTER = "a = , ' \" [ ] { } ( ) & # ! ^ ; ${registry.model_name} \\ $HOME `x` |<>*?~ é"
TEXT_VALUES = [
    "sqlite:///optuna.db?timeout=30",
    "postgresql://optuna:se=cret@db.example.com:5432/optuna?sslmode=require&connect_timeout=5",
    EVERY_CHARACTER,
    "${oc.env:HOME}",
    "\\${x}",
    "\\\\${x}",
    "${",
    "a\\",
    "\\'",
    "it's",
    "'quoted'",
    '"double"',
    "a,b",
    "[1, 2]",
    "{a: 1}",
    "key=value",
    "~x",
    "+x",
    "null",
    "true",
    "2024",
    "1.10",
    "1e3",
    "007",
    " spaces around ",
    "tab\tand\nnewline\n",
    "%d {0} {x}",
]


def stage_module(entry: str):
    return importlib.import_module(f"cifar_resnet.stages.{entry}")


def argv_as_mlflow_run_builds_it(entry: str, params: dict[str, str]) -> list[str]:
    """The stage's argv under `mlflow run`: the MLproject command with each value
    shell-quoted (what MLflow does), split by a shell."""
    values = {name: "" for name in ENTRY_POINTS[entry]["parameters"]}
    values.update(params)
    command = ENTRY_POINTS[entry]["command"].format(
        **{k: shlex.quote(str(v)) for k, v in values.items()}
    )
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", f"cifar_resnet.stages.{entry}"]
    return words[3:]


def composed(entry: str, params: dict[str, str]) -> dict:
    overrides = mlproject_argv(
        argv_as_mlflow_run_builds_it(entry, params), stage_module(entry).PARAMETERS
    )
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_container(compose(config_name=entry, overrides=overrides))


def at(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_mlproject_parameter_is_a_stage_parameter(entry):
    spec = ENTRY_POINTS[entry]
    assert set(spec["parameters"]) == {*stage_module(entry).PARAMETERS, "overrides"}
    assert spec["command"].startswith(f"python -m cifar_resnet.stages.{entry} ")
    for name, param in spec["parameters"].items():
        assert f" {name}={{{name}}}" in spec["command"], name
        assert param == {"type": "string", "default": ""}, name  # empty keeps the config's


@pytest.mark.parametrize("value", TEXT_VALUES)
def test_a_text_parameter_reaches_the_config_verbatim(value):
    config = composed("tune", {"study_name": value, "storage": value})
    tune = section_settings(TuneSettings, "tune", config["tune"])
    assert (tune.study_name, tune.storage) == (value, value)


def test_a_text_parameter_survives_the_recompose_of_recipe_auto():
    from hydra.core.hydra_config import HydraConfig

    from cifar_resnet.stages import hydra_recomposer

    argv = argv_as_mlflow_run_builds_it("tune", {"study_name": EVERY_CHARACTER})
    overrides = mlproject_argv(argv, stage_module("tune").PARAMETERS)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        HydraConfig.instance().set_config(
            compose(config_name="tune", overrides=overrides, return_hydra_config=True)
        )
        try:
            recomposed = hydra_recomposer("tune")("fast")
        finally:
            HydraConfig.instance().cfg = None
    assert to_container(recomposed)["tune"]["study_name"] == EVERY_CHARACTER


TEXT_PARAMETERS = [
    (entry, name)
    for entry in sorted(ENTRY_POINTS)
    for name, key in stage_module(entry).PARAMETERS.items()
    if "." in key and key_type(key) is str
]


def test_text_parameters_are_the_free_text_ones():
    assert set(TEXT_PARAMETERS) == {
        ("tune", "study_name"),
        ("tune", "storage"),
        ("finetune", "model_uri"),
        ("finetune", "from_study"),
        ("eval_tta", "model_uri"),
        ("promote", "metric"),
        ("promote", "version"),
        ("report", "model_name"),
    }


@pytest.mark.parametrize("entry, name", TEXT_PARAMETERS)
def test_every_text_parameter_of_every_entry_point_is_verbatim(entry, name):
    key = stage_module(entry).PARAMETERS[name]
    assert at(composed(entry, {name: EVERY_CHARACTER}), key) == EVERY_CHARACTER


def test_checked_parameters_reach_the_config_typed():
    config = composed("finetune", {"epochs": " 3 ", "lr": "1e-3", "weight_decay": "5"})
    assert (config["train"]["epochs"], config["optim"]["lr"], config["optim"]["weight_decay"]) == (
        3,
        0.001,
        5.0,
    )
    assert composed("promote", {"force": "True"})["promote"]["force"] is True
    assert composed("eval_tta", {"views": "flip_shift"})["tta"]["name"] == "flip_shift"
    assert composed("train", {"model": "resnet9"})["model"]["name"] == "resnet9"


def test_empty_parameters_keep_the_configs_values():
    assert (
        composed("tune", {"study_name": "", "n_trials": " "})["tune"]
        == composed("tune", {})["tune"]
    )


@pytest.mark.parametrize(
    "entry, name, value, message",
    [
        ("train", "epochs", "1.5", "-P epochs='1.5' must be an integer (it sets train.epochs)"),
        ("train", "epochs", "ten", "-P epochs='ten' must be an integer"),
        (
            "train",
            "model",
            "resnet1000",
            "-P model='resnet1000' must be one of airbench96_net, airbench_net,",
        ),
        ("train", "model", "model=resnet9", "must be one of"),
        # An option a group lacks, inside overrides: one line before Hydra's screenful.
        (
            "train",
            "overrides",
            "data.train_subset=5 recipe=fsat",
            "recipe='fsat' must be one of airbench94, airbench94_muon, auto, best,",
        ),
        ("tune", "overrides", "optim=adam", "optim='adam' must be one of adamw, muon, sgd,"),
        ("tune", "n_trials", "2e3", "-P n_trials='2e3' must be an integer (it sets tune.n_trials)"),
        ("finetune", "lr", "fast", "-P lr='fast' must be a number (it sets optim.lr)"),
        ("finetune", "weight_decay", "nan", "-P weight_decay='nan' must be a number"),
        ("eval_tta", "views", "flip,seed", "-P views='flip,seed' must be one of flip, flip_shift"),
        ("promote", "force", "1", "-P force='1' must be true or false (it sets promote.force)"),
        ("promote", "force", "yes", "must be true or false"),
    ],
)
def test_a_bad_choice_or_number_names_its_parameter(entry, name, value, message):
    with pytest.raises(ParameterError) as err:
        mlproject_argv(
            argv_as_mlflow_run_builds_it(entry, {name: value}), stage_module(entry).PARAMETERS
        )
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_group_option_is_checked_as_typed_and_other_forms_are_left_to_hydra():
    parameters = stage_module("train").PARAMETERS
    with pytest.raises(ParameterError, match="augment='flips' must be one of"):
        mlproject_argv(["train.epochs=2", "augment=flips"], parameters)
    fine = ["recipe=fast_muon", "~recipe", "recipe=null", "+model.kwargs.residual=true"]
    assert mlproject_argv(fine, parameters) == fine


@pytest.mark.parametrize(
    "launcher_run, typed",
    [
        ("0123abc", "-P epochs='ten\\nmore'"),  # mlflow run sets MLFLOW_RUN_ID
        ("", "epochs='ten\\nmore'"),  # python -m cifar_resnet.stages.train epochs=...
    ],
)
def test_launch_reports_a_bad_parameter_in_one_line_and_exit_code_2(
    launcher_run, typed, monkeypatch, capsys
):
    def main():
        raise AssertionError("the stage must not start")

    monkeypatch.setenv("MLFLOW_RUN_ID", launcher_run)
    monkeypatch.setattr(
        sys, "argv", ["train.py", *argv_as_mlflow_run_builds_it("train", {"epochs": "ten\nmore"})]
    )
    with pytest.raises(SystemExit) as exit_:
        launch(main, stage_module("train").PARAMETERS)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {typed} must be an integer (it sets train.epochs)"
    ]


def test_a_ctrl_c_a_stage_did_not_report_is_one_line_and_exit_code_130(capsys):
    from cifar_resnet.stages import report_user_errors

    @report_user_errors
    def starting_up():
        raise KeyboardInterrupt  # e.g. while the data's MD5s are checked

    with pytest.raises(SystemExit) as exit_:
        starting_up()
    assert exit_.value.code == 130 and exit_.value.__suppress_context__
    assert capsys.readouterr().err.split() == ["interrupted"]


@pytest.mark.parametrize("entry", ["tune", "finetune", "eval_tta", "promote", "report"])
def test_a_one_process_stage_under_torchrun_is_refused(entry, monkeypatch, capsys):
    def main():
        raise AssertionError("the stage must not start")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", [f"{entry}.py"])
    with pytest.raises(SystemExit) as exit_:
        launch(main, stage_module(entry).PARAMETERS)
    assert exit_.value.code == 2
    assert "only train shares its work" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_nproc_must_be_a_positive_integer(value):
    with pytest.raises(ParameterError) as err:
        processes_wanted([f"nproc={value}", "epochs=1"], stage_module("train").PARAMETERS)
    assert str(err.value) == (
        f"-P nproc={value!r} must be a positive integer "
        "(the processes torchrun starts on this machine)"
    )


def test_a_batch_that_cannot_split_over_nproc_is_one_line_before_torchrun(monkeypatch, capsys):
    train = stage_module("train")

    def never(*args):
        raise AssertionError("neither torchrun nor the stage may start")

    monkeypatch.setattr(os, "execv", never)
    argv = argv_as_mlflow_run_builds_it(
        "train", {"nproc": "3", "overrides": "recipe=fast data.train_subset=100"}
    )
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        launch(never, train.PARAMETERS, preflight=train.check_before_torchrun)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: train.batch_size=1000 is the global batch and must divide evenly over the "
        "3 processes; use a multiple of 3"
    ]
    # What divides passes; resume= and what Hydra cannot compose are the processes' to check.
    for fine in (["recipe=fast"], ["resume=abc"], ["train.epochz=2"]):
        train.check_before_torchrun(fine, 2)


def test_nproc_is_launchs_and_never_reaches_the_config():
    argv = argv_as_mlflow_run_builds_it("train", {"nproc": "2", "epochs": "1"})
    assert processes_wanted(argv, stage_module("train").PARAMETERS) == (
        2,
        [a for a in argv if not a.startswith("nproc=")],
    )
    assert processes_wanted(["nproc=", "x=1"], stage_module("train").PARAMETERS) == (1, ["x=1"])
    assert "nproc" not in str(composed("train", {"nproc": "4"}))


def test_overrides_stay_hydra_syntax_split_like_a_shell_line():
    config = composed("tune", {"overrides": "'data.root=\"/my data (v2)\"' tune.n_trials=3"})
    assert config["data"]["root"] == "/my data (v2)" and config["tune"]["n_trials"] == 3
    with pytest.raises(Exception, match="mismatched input '='"):  # Hydra's own grammar
        composed("tune", {"overrides": "tune.storage=sqlite:///optuna.db?timeout=30"})
    with pytest.raises(ParameterError, match="-P overrides=.*No closing quotation"):
        composed("tune", {"overrides": "tune.study_name='open"})


def test_a_config_check_still_follows_a_checked_parameter():
    from cifar_resnet.config import train_settings

    with pytest.raises(ConfigError, match="train.epochs must be a positive integer, got 0"):
        train_settings(composed("train", {"epochs": "0"}))


# --------------------------------------------------------------------------- param names
# `mlflow run` logs every parameter of the entry point as a run param before the stage
# starts; a stage that logs another value under the same key fails ("Changing param
# values is not allowed"). The keys a stage logs: its flattened config (composed here)
# and the extra params it hands to tracking.log_config / log_params (read from the code).

LOGGING_CALLS = ("log_config", "log_params")
ANY = "*"


def parsed(path: Path) -> ast.Module:
    return _parsed(str(path))


@cache
def _parsed(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(), filename=path)


def imported_modules(path: Path) -> set[Path]:
    """The package's modules that ``path`` imports (relative imports only)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        if node.module:
            base = base.joinpath(*node.module.split("."))
            targets = [base]
        else:
            targets = [base / alias.name for alias in node.names]
        for target in targets:
            for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                if candidate.is_file():
                    found.add(candidate.resolve())
    return found


def reachable_modules(path: Path) -> list[Path]:
    seen, todo = set(), [path.resolve()]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(module) - seen)
    return sorted(seen)


class ParamKeys:
    """The param keys that calls to log_config / log_params in ``modules`` pass:
    exact keys, or a prefix followed by ``*`` where a key is built (f"best.{k}"); a
    bare ``*`` where the code does not say."""

    def __init__(self, modules: list[ast.Module]):
        self.modules = modules
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        for tree in modules:
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, []).append(node)

    def logged(self) -> tuple[set[str], bool]:
        """(keys, whether the config itself is logged)."""
        keys, config_logged = set(), False
        for tree in self.modules:
            for function, call in self._calls(tree, None, nested=False):
                name = _called_name(call)
                if name == "log_config":
                    config_logged = True
                    keys |= self.keys(call.args[1], function)
                else:
                    keys |= self.keys(call.args[0], function)
        return keys, config_logged

    def _calls(self, node, function, nested):
        if isinstance(node, ast.FunctionDef):
            if node.name in LOGGING_CALLS:  # tracking's own definitions
                return
            function = node
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call)
            and _called_name(item.context_expr) == "nested_run"
            for item in node.items
        ):
            nested = True  # a trial's own run, not the one `mlflow run` made
        if isinstance(node, ast.Call) and _called_name(node) in LOGGING_CALLS and not nested:
            yield function, node
        for child in ast.iter_child_nodes(node):
            yield from self._calls(child, function, nested)

    def keys(self, node, function) -> set[str]:
        if isinstance(node, ast.Dict):
            return set().union(
                *(
                    self.keys(v, function) if k is None else {_key(k)}
                    for k, v in zip(node.keys, node.values)
                )
            )
        if isinstance(node, ast.DictComp):
            return {_key(node.key)}
        if isinstance(node, ast.IfExp):
            return self.keys(node.body, function) | self.keys(node.orelse, function)
        if isinstance(node, ast.Call) and _called_name(node) in self.functions:
            return set().union(
                *(
                    self.keys(ret.value, definition)
                    for definition in self.functions[_called_name(node)]
                    for ret in ast.walk(definition)
                    if isinstance(ret, ast.Return) and ret.value is not None
                )
            )
        if isinstance(node, ast.Name) and function is not None:
            return self._variable_keys(node.id, function)
        return {ANY}

    def _variable_keys(self, name: str, function) -> set[str]:
        keys = set()
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id == name:
                        keys |= self.keys(node.value, function)
                    elif (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == name
                    ):
                        keys.add(_key(target.slice))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name
            ):
                keys |= self.keys(node.args[0], function)
        return keys or {ANY}


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _key(node) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        prefix = ""
        for part in node.values:
            if not isinstance(part, ast.Constant):
                return prefix + ANY
            prefix += part.value
        return prefix
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _key(node.left).removesuffix(ANY) + ANY
    return ANY


def collisions(keys: set[str], parameters: set[str]) -> set[str]:
    return {
        key
        for key in keys
        for name in parameters
        if key == name or (key.endswith(ANY) and name.startswith(key[:-1]))
    }


def test_the_param_key_reader_sees_through_helpers_and_variables():
    source = """
def helper():
    return {"epochs": 1, **{f"data_md5.{n}": 0 for n in names}}

def stage():
    params = helper()
    params["views"] = 2
    tracking.log_config(config, {**params, "former_" + alias: 3, "device": 4})
    with tracking.nested_run("trial"):
        tracking.log_params({"model": 5})
"""
    keys, config_logged = ParamKeys([ast.parse(source)]).logged()
    assert config_logged
    assert keys == {"epochs", "data_md5.*", "views", "former_*", "device"}
    assert collisions(keys, {"views", "model", "former_champion"}) == {"views", "former_*"}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_no_stage_logs_a_param_under_an_mlproject_parameters_name(entry):
    parameters = set(ENTRY_POINTS[entry]["parameters"])
    modules = reachable_modules(PACKAGE / "stages" / f"{entry}.py")
    keys, config_logged = ParamKeys([parsed(m) for m in modules]).logged()
    assert ANY not in keys, f"{entry}: a param key the code does not spell out"
    if entry != "report":  # report logs artifacts only
        assert config_logged and keys, entry
    if config_logged:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            keys |= set(flatten(to_container(compose(config_name=entry))))
    assert not collisions(keys, parameters), entry


# --------------------------------------------------------------------------- mlflow run
# One tiny store for the module: train registers version 1, tune makes a study, and
# finetune, eval_tta, promote and report work from those. One epoch each.

MODEL = "tiny-mlproject"
STUDY = f"study {EVERY_CHARACTER}"


@pytest.fixture(scope="module")
def store(tiny_cifar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlproject")
    env = stage_env(tmp)
    make_experiment(tmp, "tests")
    data = tiny_overrides(
        tiny_cifar, tmp, **{"registry.model_name": MODEL, "data.loader": "tensor"}
    )
    return SimpleNamespace(
        tmp=tmp,
        env=env,
        client=MlflowClient(f"sqlite:///{tmp}/mlflow.db"),
        tiny=tiny_cifar,
        data=[o for o in data if not o.startswith("model=")],
        storage=f"sqlite:///{tmp}/optuna.db?timeout=30",
    )


def mlflow_run(
    store, entry: str, params: dict, env: dict | None = None, check: bool = True
) -> SimpleNamespace:
    """`mlflow run . -e <entry>` with every MLproject parameter of ``entry`` in ``params``."""
    assert check is False or set(params) == set(ENTRY_POINTS[entry]["parameters"])
    experiment = store.client.get_experiment_by_name("tests").experiment_id
    before = {r.info.run_id for r in store.client.search_runs([experiment])}
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
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    result = subprocess.run(
        args, cwd=REPO, env=env or store.env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [
        store.client.get_run(r.info.run_id)
        for r in store.client.search_runs([experiment])
        if r.info.run_id not in before and "mlflow.parentRunId" not in r.data.tags
    ]
    return SimpleNamespace(result=result, runs=runs)


def the_run(ran: SimpleNamespace):
    [run] = ran.runs
    assert run.info.status == "FINISHED"
    return run


@pytest.fixture(scope="module")
def trained(store):
    # nproc=2: two processes under torchrun (test_distributed has the rest of that story).
    return mlflow_run(
        store,
        "train",
        {"epochs": 1, "model": "resnet_small", "nproc": 2, "overrides": " ".join(store.data)},
    )


@pytest.fixture(scope="module")
def tuned(store):
    return mlflow_run(
        store,
        "tune",
        {
            "n_trials": 1,  # this worker's cap, below the study's
            "max_trials": 3,
            "epochs": 1,
            "study_name": STUDY,
            "storage": store.storage,
            "overrides": " ".join([*store.data, "model=resnet_small"]),
        },
    )


@pytest.mark.slow
def test_mlflow_run_train_with_every_parameter(store, trained):
    run = the_run(trained)
    params = run.data.params
    assert (params["epochs"], params["model"]) == ("1", "resnet_small")  # logged by mlflow run
    assert (params["train.epochs"], params["model.name"]) == ("1", "resnet_small")
    assert (params["nproc"], params["world_size"], params["dist_backend"]) == ("2", "2", "gloo")
    assert params["registry.model_name"] == MODEL
    [version] = store.client.search_model_versions(
        f"name = '{MODEL}' and run_id = '{run.info.run_id}'"
    )
    assert str(version.version) == "1"


@pytest.mark.slow
def test_mlflow_run_tune_with_every_parameter(store, tuned):
    run = the_run(tuned)
    params = run.data.params
    assert params["tune.study_name"] == STUDY and params["tune.storage"] == store.storage
    assert (params["tune.n_trials"], params["tune.max_trials"], params["tune.epochs"]) == (
        "1",
        "3",
        "1",
    )
    assert optuna.get_all_study_names(store.storage) == [STUDY]
    study = optuna.load_study(study_name=STUDY, storage=store.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.slow
def test_mlflow_run_finetune_with_every_parameter(store, trained, tuned):
    ran = mlflow_run(
        store,
        "finetune",
        {
            "model_uri": f"models:/{MODEL}/1",
            "epochs": 1,
            "from_study": STUDY,
            "lr": 0.005,
            "weight_decay": 2e-5,
            "overrides": " ".join(store.data),
        },
        env={**store.env, "OPTUNA_STORAGE": store.storage},
    )
    run = the_run(ran)
    [new] = store.client.search_model_versions(f"name = '{MODEL}' and run_id = '{run.info.run_id}'")
    assert new.tags["source_model_version"] == "1" and new.tags["finetune.from_study"] == STUDY
    # from_study wins over lr and weight_decay: the study's best values are trained.
    best = optuna.load_study(study_name=STUDY, storage=store.storage).best_params
    params = run.data.params
    assert float(params["optim.lr"]) == pytest.approx(best["optim.lr"])
    assert float(params["optim.weight_decay"]) == pytest.approx(best["optim.weight_decay"])
    assert params["train.epochs"] == "1" and "from_study" in params  # the latter mlflow run's


@pytest.mark.slow
def test_mlflow_run_eval_tta_with_every_parameter(store, trained):
    # The README's own command, which used to fail on the param `views`.
    run = the_run(
        mlflow_run(
            store,
            "eval_tta",
            {
                "model_uri": f"models:/{MODEL}/1",
                "views": "flip",
                "overrides": " ".join(
                    o for o in store.data if o.startswith(("data.", "registry.", "experiment_name"))
                ),
            },
        )
    )
    params = run.data.params
    assert (params["views"], params["tta.name"]) == ("flip", "flip")
    assert params["tta.views"] == "identity,hflip"
    assert any(key.startswith("test_acc_tta") for key in run.data.metrics)


@pytest.mark.slow
def test_mlflow_run_promote_with_every_parameter(store, trained):
    run = the_run(
        mlflow_run(
            store,
            "promote",
            {
                "metric": "test_acc",
                "version": 1,
                "force": "true",
                "allow_test_selection": "true",
                "overrides": f"registry.model_name={MODEL} experiment_name=tests",
            },
        )
    )
    params = run.data.params
    assert (params["promote.metric"], params["promote.version"]) == ("test_acc", "1")
    assert (params["promote.force"], params["promote.allow_test_selection"]) == ("True", "True")
    assert str(store.client.get_registered_model(MODEL).aliases["champion"]) == "1"


@pytest.mark.slow
def test_mlflow_run_report_with_every_parameter(store, trained):
    ran = mlflow_run(store, "report", {"model_name": MODEL, "overrides": "experiment_name=tests"})
    the_run(ran)
    assert f"## {MODEL}" in ran.result.stdout


@pytest.mark.slow
def test_mlflow_run_with_a_bad_parameter_is_one_clear_line(store):
    ran = mlflow_run(
        store,
        "train",
        {"epochs": "ten", "model": "resnet_small", "overrides": " ".join(store.data)},
        check=False,
    )
    assert ran.result.returncode != 0
    errors = [line for line in ran.result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: -P epochs='ten' must be an integer (it sets train.epochs)"]
    assert f'File "{PACKAGE}' not in ran.result.stderr  # no traceback from the stage
    # `mlflow run` made its run before the stage started; nothing else was logged to it.
    [run] = ran.runs
    assert run.info.status == "FAILED" and "train.epochs" not in run.data.params
