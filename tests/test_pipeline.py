"""pipeline: a recipe's settings reach the objects that train, and a short fit runs through them."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from cifar_resnet import engine, pipeline
from cifar_resnet.config import train_settings
from cifar_resnet.models import build_model
from cifar_resnet.stages import CONF_DIR

from stage_utils import tiny_overrides

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def fast_settings(tiny, tmp_path, *extra, recipe="fast"):
    overrides = [o for o in tiny_overrides(tiny, tmp_path) if not o.startswith("model=")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"recipe={recipe}", *overrides, *extra])
    return train_settings(cfg)


def build_on_cpu(settings):
    """What the train stage builds before fitting: data, the epoch's batches, the parts."""
    splits = pipeline.load_data(settings.data)
    batches = pipeline.train_batches(settings, splits, CPU)
    parts = pipeline.build_parts(settings, pipeline.build_network(settings.model), splits,
                                 pipeline.steps_per_epoch(batches), CPU)
    return splits, batches, parts


def test_fast_recipe_wires_whitening_norm_lr_and_lookahead_ramp(tiny_cifar, tmp_path):
    settings = fast_settings(tiny_cifar, tmp_path, "train.epochs=2")
    splits, batches, parts = build_on_cpu(settings)
    steps = pipeline.steps_per_epoch(batches)

    # The stem was fitted to the training images, not left at its unfitted init.
    unfitted = build_model("whitened_resnet").stem.weight
    assert not torch.allclose(parts.model.net.stem.weight, unfitted)
    # BatchNorm shifts start at 64x the weights' rate (the schedule's first value).
    rates = {len(g["params"]): g["lr"] for g in parts.optimizer.param_groups}
    norm_params = sum(1 for m in parts.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first = parts.optimizer.param_groups[0]["lr"]
    assert rates[norm_params] == pytest.approx(64 * first)
    # Lookahead ramps over the whole run.
    assert parts.lookahead.ramp_steps == settings.train.epochs * steps

    state = pipeline.run_fit(settings, splits, parts, batches, CPU,
                             checkpoint_dir=tmp_path / "ckpt")
    assert state.epoch == 2
    assert all(math.isfinite(m["train_loss"]) for m in state.history)
    assert parts.lookahead.fast_steps == 2 * steps


def test_muon_recipe_steps_every_trainable_filter_with_muon(tiny_cifar, tmp_path):
    settings = fast_settings(tiny_cifar, tmp_path, "train.epochs=1", "train.batch_size=32",
                             recipe="fast_muon")
    splits, batches, parts = build_on_cpu(settings)
    trainable_filters = {id(p) for p in parts.model.parameters() if p.requires_grad and p.ndim == 4}
    [muon_group] = [g for g in parts.optimizer.param_groups if g.get("orthogonal")]
    assert {id(p) for p in muon_group["params"]} == trainable_filters
    assert (muon_group["lr"], muon_group["momentum"]) == (0.24, 0.6)  # flat start: peak at once
    assert parts.lookahead is None

    before = [p.detach().clone() for p in muon_group["params"]]
    state = pipeline.run_fit(settings, splits, parts, batches, CPU,
                             checkpoint_dir=tmp_path / "ckpt")
    assert all(math.isfinite(m["train_loss"]) for m in state.history)
    assert all(not torch.equal(b, p) for b, p in zip(before, muon_group["params"]))
