from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cifar_resnet.config import ConfigError, flatten, to_container, train_settings
from cifar_resnet.stages import CONF_DIR, mlproject_argv, resolve_recipe


def compose_train(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_conf_dir_is_the_repository_conf():
    assert Path(CONF_DIR) == Path(__file__).resolve().parents[1] / "conf"


def resolved_train(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
        return resolve_recipe(
            cfg,
            lambda recipe: compose(config_name="train", overrides=[*overrides, f"recipe={recipe}"]),
        )


@pytest.mark.parametrize("device, recipe", [("cpu", "fast"), ("cuda", "best"), ("mps", "fast")])
def test_the_default_recipe_follows_the_device(device, recipe):
    cfg, requested = resolved_train(f"train.device={device}")
    s = train_settings(cfg)
    assert (requested, s.recipe, s.train.device) == ("auto", recipe, device)
    model = {"fast": "airbench_net", "best": "wide_resnet"}[recipe]
    assert s.model.name == model


def test_auto_recipe_on_auto_device_picks_cuda_only_when_there_is_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_settings(resolved_train()[0]).recipe == "best"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_settings(resolved_train()[0]).recipe == "fast"


def test_an_explicit_recipe_always_wins():
    cfg, requested = resolved_train("recipe=best", "train.device=cpu")
    assert requested is None and train_settings(cfg).recipe == "best"


@pytest.mark.parametrize("override", ["~recipe", "recipe=seed"])
def test_base_config_and_seed_recipe_follow_the_seed_report(override):
    s = train_settings(compose_train(override))
    assert s.model.name == "seed_resnet"
    assert (s.optim.name, s.optim.lr, s.optim.momentum, s.optim.nesterov) == (
        "sgd",
        0.1,
        0.95,
        True,
    )
    assert s.optim.weight_decay == pytest.approx(4e-5)
    assert (s.optim.lookahead_k, s.optim.lookahead_alpha) == (5, 0.8)
    assert (s.schedule.name, s.schedule.pct_start) == ("onecycle", 0.25)
    assert s.train.label_smoothing == 0.1 and s.train.batch_size == 512
    assert s.data.val_size == 5000
    assert s.train.epochs == (200 if override == "recipe=seed" else 50)


@pytest.mark.parametrize(
    "recipe", sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml") if p.stem != "auto")
)
def test_every_recipe_builds_under_the_parameter_limit(recipe):
    from cifar_resnet.models import count_parameters
    from cifar_resnet.pipeline import build_network

    s = train_settings(compose_train(f"recipe={recipe}"))
    assert s.recipe == recipe
    assert count_parameters(build_network(s.model)) < 5_000_000


def test_recipe_survives_a_model_override():
    s = train_settings(compose_train("recipe=best", "model=resnet_small"))
    assert s.model.name == "resnet_small" and s.optim.lr == 0.2


@pytest.mark.parametrize("model", sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")))
def test_every_model_config_composes_and_builds_under_the_parameter_limit(model):
    from cifar_resnet.models import count_parameters
    from cifar_resnet.pipeline import build_network

    # build_network raises for an unknown name or a count over the config's own max_params.
    net = build_network(train_settings(compose_train(f"model={model}")).model)
    assert count_parameters(net) < 5_000_000


def test_overrides_reach_the_typed_settings():
    s = train_settings(
        compose_train("train.epochs=3", "optim.lr=0.05", "augment=none", "data.train_subset=100")
    )
    assert (s.train.epochs, s.optim.lr, s.augment.name, s.data.train_subset) == (
        3,
        0.05,
        "none",
        100,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0", "train.epochs must be a positive integer"),
        ("train.epochs=-3", "train.epochs must be a positive integer"),
        ("data.loader=gpu", "data.loader"),
        ("+optim.learning_rate=1", "unknown key"),
        ("train.tta=flipp", "train.tta must be a view set .*flip_shift.*got 'flipp'"),
        ("settings_from_run=abc123", "settings_from_run=abc123 is for a final fit .*val_size=0"),
    ],
)
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        train_settings(compose_train(override))


def test_seed_augmentation_has_no_tensor_path():
    with pytest.raises(ConfigError, match="no batched version"):
        train_settings(compose_train("augment=seed", "data.loader=tensor"))


def test_trivial_augment_has_only_the_tensor_path():
    with pytest.raises(ConfigError, match="no per-image .* use data.loader=tensor"):
        train_settings(compose_train("augment=trivial_augment", "data.loader=albumentations"))
    s = train_settings(
        compose_train("augment=trivial_augment", "data.loader=tensor", "augment.tensor.cutmix=0.5")
    )
    assert s.augment.tensor["policy"] == "trivial_augment_wide"
    assert s.augment.tensor["cutmix"] == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment.tensor.cutmix=1.5", "augment.tensor.cutmix must be in [0, 1] (0 = off), got 1.5"),
        (
            "augment.tensor.cutmix_alpha=0",
            "augment.tensor.cutmix_alpha must be > 0 and finite, got 0",
        ),
        ("augment.tensor.cutmix_alpha=inf", "augment.tensor.cutmix_alpha must be > 0 and finite"),
        ("augment.tensor.cutmix=often", "augment.tensor.cutmix must be a number, got 'often'"),
        ("augment.tensor.policy=rand_augment", "augment.tensor.policy must be one of none, "),
        ("augment.tensor.crop_pad=-1", "augment.tensor.crop_pad must be >= 0 (0 = off), got -1"),
        ("+augment.tensor.mixup=0.2", "unknown key(s) augment.tensor.mixup"),
    ],
)
def test_the_batched_augmentation_is_checked_before_any_data_is_read(override, message):
    with pytest.raises(ConfigError) as err:
        train_settings(compose_train("augment=trivial_augment", "data.loader=tensor", override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mlproject_argv_splits_overrides_and_drops_empty_parameters():
    argv = ["epochs=", "model=resnet9", "overrides=data.train_subset=2000 augment=none 'x.y=a b'"]
    assert mlproject_argv(argv, {"epochs": "train.epochs", "model": "model"}) == [
        "model=resnet9",
        "data.train_subset=2000",
        "augment=none",
        "x.y=a b",
    ]
    assert mlproject_argv(["epochs=2", "overrides="], {"epochs": "train.epochs"}) == [
        "train.epochs=2"
    ]


def test_flatten_names_params_by_path():
    flat = flatten(to_container(compose_train("recipe=seed")))
    assert flat["optim.lr"] == 0.1 and flat["model.name"] == "seed_resnet"
    assert "hydra" not in " ".join(flat)


# --------------------------------------------------------------------------- types
# Every field is checked against its dataclass annotation when the config is typed,
# before any data is read: one line with the key, the value and what is allowed.


def typed(entry: str, *overrides: str):
    """Compose ``entry``'s config and type every section of it as its stage does."""
    from cifar_resnet.config import (
        DataSettings,
        EvalSettings,
        FinetuneSettings,
        PromoteSettings,
        RegistrySettings,
        TuneSettings,
        section_settings,
    )

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = to_container(compose(config_name=entry, overrides=list(overrides)))
    own = {
        "tune": TuneSettings,
        "finetune": FinetuneSettings,
        "eval_tta": EvalSettings,
        "promote": PromoteSettings,
    }
    section = {"eval_tta": "eval"}.get(entry, entry)
    typed_section = (
        section_settings(own[entry], section, config.pop(section)) if entry in own else None
    )
    if entry in ("train", "tune", "finetune"):
        return train_settings(config), typed_section
    if entry == "eval_tta":
        section_settings(DataSettings, "data", config["data"])
    return section_settings(RegistrySettings, "registry", config["registry"]), typed_section


@pytest.mark.parametrize(
    "entry, override, message",
    [
        ("train", "train.epochs=1.5", "train.epochs must be an integer, got 1.5"),
        ("train", "train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
        ("train", "train.epochs=null", "train.epochs must be an integer, got null"),
        ("train", "train.compile=1", "train.compile must be true or false, got 1"),
        ("train", "train.progress=yes", "train.progress must be true or false, got 'yes'"),
        ("train", "train.label_smoothing=abc", "train.label_smoothing must be a number, got 'abc'"),
        ("train", "train.device=1.5", "train.device must be text, got 1.5; quote it"),
        ("train", "optim.lr=nan", "optim.lr must be a number, got nan"),
        ("train", "optim.nesterov=0", "optim.nesterov must be true or false, got 0"),
        (
            "train",
            "+optim.betas=[0.9]",
            "optim.betas must be a list of 2, each a number, got [0.9]",
        ),
        ("train", "+optim.betas=[0.9,high]", "optim.betas must be a list of 2, each a number"),
        ("train", "data.val_size=5e3", "data.val_size must be an integer, got 5000.0"),
        ("train", "data.md5_file=[a,b]", "data.md5_file must be text or null, got ['a', 'b']"),
        ("train", "model.kwargs=3", "model.kwargs must be a mapping, got 3"),
        ("train", "model.max_params=5M", "model.max_params must be an integer, got '5M'"),
        ("train", "augment.params=3", "augment.params must be a mapping or null, got 3"),
        ("train", "schedule.div_factor=true", "schedule.div_factor must be a number, got true"),
        ("train", "registry.register=0", "registry.register must be true or false, got 0"),
        ("train", "seed=1.5", "seed must be an integer, got 1.5"),
        ("train", "experiment_name=[a]", "experiment_name must be text, got ['a']"),
        ("train", "schedule.pct_start=1.5", "schedule.pct_start must be in [0, 1], got 1.5"),
        ("train", "schedule.anneal_strategy=cosine", "schedule.anneal_strategy must be 'cos' or"),
        ("train", "train.ema_decay=1", "train.ema_decay must be in [0, 1) (0 = off), got 1.0"),
        ("train", "optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0, got -0.0001"),
        ("train", "optim.momentum=2", "optim.momentum must be in [0, 1], got 2.0"),
        ("train", "optim.sam_rho=-0.05", "optim.sam_rho must be >= 0 and finite (0 = off), got"),
        ("train", "optim.sam_rho=inf", "optim.sam_rho must be >= 0 and finite (0 = off), got inf"),
        ("train", "optim.sam_adaptive=true", "optim.sam_adaptive=true needs optim.sam_rho > 0"),
        ("train", "optim.sam_adaptive=1", "optim.sam_adaptive must be true or false, got 1"),
        ("train", "data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("tune", "tune.n_trials=1.5", "tune.n_trials must be an integer or null, got 1.5"),
        ("tune", "tune.max_trials=0", "tune.max_trials must be >= 1 or null, got 0"),
        (
            "tune",
            "tune.max_trials=null",
            "tune needs a limit: set tune.n_trials (this process), tune.max_trials",
        ),
        ("tune", "tune.timeout=soon", "tune.timeout must be a number or null, got 'soon'"),
        (
            "tune",
            "tune.heartbeat_interval=0",
            "tune.heartbeat_interval must be >= 1 second or null",
        ),
        ("tune", "tune.pruners.median=3", "tune.pruners must be a mapping of mappings"),
        ("tune", "tune.study_name=1.5", "tune.study_name must be text, got 1.5; quote it"),
        ("tune", "train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
        ("finetune", "finetune.from_study=[a]", "finetune.from_study must be text or null"),
        ("finetune", "optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("eval_tta", "eval.batch_size=abc", "eval.batch_size must be an integer, got 'abc'"),
        ("eval_tta", "data.download=1", "data.download must be true or false, got 1"),
        ("promote", "promote.force=1", "promote.force must be true or false, got 1"),
        ("promote", "promote.version=1.5", "promote.version must be text or null, got 1.5"),
        ("report", "registry.model_name=[a]", "registry.model_name must be text, got ['a']"),
    ],
)
def test_a_wrong_type_or_range_is_one_line_naming_key_value_and_what_is_allowed(
    entry, override, message
):
    with pytest.raises(ConfigError) as err:
        typed(entry, override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_values_hydra_types_loosely_are_taken_as_their_fields_want_them():
    s, _ = typed(
        "train", "optim.lr=1", "+optim.betas=[0,0.99]", "train.compile=true", "resume=12345"
    )
    assert s.optim.lr == 1.0 and isinstance(s.optim.lr, float)
    assert s.optim.betas == (0.0, 0.99) and s.train.compile is True and s.resume == "12345"
    _, tune = typed("tune", "tune.study_name=2024", "tune.timeout=60")
    assert tune.study_name == "2024" and tune.timeout == 60.0
    _, promote = typed("promote", "promote.version=3")
    assert promote.version == "3"


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("train", "train.epochs=1.5", "train.epochs must be an integer, got 1.5"),
        ("train", "train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
        ("tune", "tune.n_trials=1.5", "tune.n_trials must be an integer or null, got 1.5"),
        ("finetune", "optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ],
)
def test_a_wrong_type_stops_the_stage_process_before_any_run(
    tiny_cifar, tmp_path, stage, override, message
):
    from mlflow.tracking import MlflowClient
    from stage_utils import make_experiment, run_module, stage_env, tiny_overrides

    env = stage_env(tmp_path)
    make_experiment(tmp_path, "tests")
    result = run_module(
        f"cifar_resnet.stages.{stage}",
        [*tiny_overrides(tiny_cifar, tmp_path), override],
        env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []


def test_defaults_live_in_the_yaml_only():
    # config.py types and checks; a default written there too would be a second source
    # that drifts from conf/ (it had: dataclass and YAML defaults were kept twice).
    import dataclasses

    from cifar_resnet import config

    settings = [
        obj
        for obj in vars(config).values()
        if dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__
    ]
    assert len(settings) >= 12
    for cls in settings:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name}"
            assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("override", ["~recipe", "optim=adamw", "optim=muon", "optim=sgd"])
def test_every_option_composes_to_complete_settings(override):
    s = train_settings(compose_train(override))  # a missing key would be a ConfigError
    assert s.optim.betas == (0.9, 0.999) and s.optim.muon_lr == 0.24
    assert (s.optim.sam_rho, s.optim.sam_adaptive) == (0.0, False)  # SAM is off unless asked


@pytest.mark.parametrize("optim", ["sgd", "muon", "adamw"])
def test_sam_settings_compose_with_every_optimiser(optim):
    s = train_settings(
        compose_train(f"optim={optim}", "optim.sam_rho=0.5", "optim.sam_adaptive=true")
    )
    assert (s.optim.name, s.optim.sam_rho, s.optim.sam_adaptive) == (optim, 0.5, True)


def test_the_recipe_line_says_who_chose_the_recipe():
    from cifar_resnet.config import recipe_line

    assert recipe_line("auto", "fast", "cpu") == "recipe auto -> fast (device cpu)"
    assert recipe_line(None, "fast_muon", "cpu") == "recipe fast_muon"
    assert recipe_line(None, None, "cpu") == "recipe none (~recipe: the base config)"
