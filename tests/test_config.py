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
        return resolve_recipe(cfg, lambda recipe: compose(
            config_name="train", overrides=[*overrides, f"recipe={recipe}"]))


@pytest.mark.parametrize("device, recipe", [("cpu", "fast"), ("cuda", "best"), ("mps", "fast")])
def test_the_default_recipe_follows_the_device(device, recipe):
    cfg, requested = resolved_train(f"train.device={device}")
    s = train_settings(cfg)
    assert (requested, s.recipe, s.train.device) == ("auto", recipe, device)
    model = {"fast": "whitened_resnet", "best": "wide_resnet"}[recipe]
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
    assert (s.optim.name, s.optim.lr, s.optim.momentum, s.optim.nesterov) == ("sgd", 0.1, 0.95, True)
    assert s.optim.weight_decay == pytest.approx(4e-5)
    assert (s.optim.lookahead_k, s.optim.lookahead_alpha) == (5, 0.8)
    assert (s.schedule.name, s.schedule.pct_start) == ("onecycle", 0.25)
    assert s.train.label_smoothing == 0.1 and s.train.batch_size == 512
    assert s.data.val_size == 5000
    assert s.train.epochs == (200 if override == "recipe=seed" else 50)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml")
                                           if p.stem != "auto"))
def test_every_recipe_builds_under_the_parameter_limit(recipe):
    from cifar_resnet.models import count_parameters
    from cifar_resnet.pipeline import build_network

    s = train_settings(compose_train(f"recipe={recipe}"))
    assert s.recipe == recipe
    assert count_parameters(build_network(s.model)) < 5_000_000


def test_recipe_survives_a_model_override():
    s = train_settings(compose_train("recipe=best", "model=resnet_small"))
    assert s.model.name == "resnet_small" and s.optim.lr == 0.2


@pytest.mark.parametrize("model", ["seed_resnet", "resnet18_slim", "se_resnet", "wide_resnet",
                                   "resnet_small", "resnet9"])
def test_every_model_config_composes(model):
    assert train_settings(compose_train(f"model={model}")).model.name == model


def test_overrides_reach_the_typed_settings():
    s = train_settings(compose_train("train.epochs=3", "optim.lr=0.05", "augment=none",
                                     "data.train_subset=100"))
    assert (s.train.epochs, s.optim.lr, s.augment.name, s.data.train_subset) == (3, 0.05, "none", 100)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be a positive integer"),
    ("train.epochs=-3", "train.epochs must be a positive integer"),
    ("data.loader=gpu", "data.loader"),
    ("+optim.learning_rate=1", "unknown key"),
    ("train.tta=flipp", "train.tta must be a view set .*flip_shift.*got 'flipp'"),
    ("settings_from_run=abc123", "settings_from_run=abc123 is for a final fit .*val_size=0"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        train_settings(compose_train(override))


def test_seed_augmentation_has_no_tensor_path():
    with pytest.raises(ConfigError, match="no batched version"):
        train_settings(compose_train("augment=seed", "data.loader=tensor"))


def test_mlproject_argv_splits_overrides_and_drops_empty_parameters():
    argv = ["epochs=", "model=resnet9", "overrides=data.train_subset=2000 augment=none 'x.y=a b'"]
    assert mlproject_argv(argv, {"epochs": "train.epochs", "model": "model"}) == [
        "model=resnet9", "data.train_subset=2000", "augment=none", "x.y=a b"]
    assert mlproject_argv(["epochs=2", "overrides="], {"epochs": "train.epochs"}) == ["train.epochs=2"]


def test_flatten_names_params_by_path():
    flat = flatten(to_container(compose_train("recipe=seed")))
    assert flat["optim.lr"] == 0.1 and flat["model.name"] == "seed_resnet"
    assert "hydra" not in " ".join(flat)
