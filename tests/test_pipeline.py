"""pipeline: a recipe's settings reach the objects that train, and a short fit runs through them."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from stage_utils import tiny_overrides

from cifar_resnet import pipeline
from cifar_resnet.config import ConfigError, train_settings
from cifar_resnet.models import ImageClassifier, build_model
from cifar_resnet.optim import SAM
from cifar_resnet.stages import CONF_DIR

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def fast_settings(tiny, tmp_path, *extra, recipe="fast"):
    overrides = [o for o in tiny_overrides(tiny, tmp_path) if not o.startswith("model=")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"recipe={recipe}", *overrides, *extra])
    settings, _ = pipeline.prepare_machine(train_settings(cfg))
    return settings


def build_on_cpu(settings):
    """What the train stage builds before fitting: data, the epoch's batches, the parts."""
    splits = pipeline.load_data(settings.data)
    batches = pipeline.train_batches(settings, splits, CPU)
    parts = pipeline.build_parts(
        settings,
        pipeline.build_network(settings.model),
        splits,
        pipeline.steps_per_epoch(batches),
        CPU,
    )
    return splits, batches, parts


def test_airbench94_recipe_wires_whitening_norm_lr_and_lookahead_ramp(tiny_cifar, tmp_path):
    settings = fast_settings(tiny_cifar, tmp_path, "train.epochs=2", recipe="airbench94")
    splits, batches, parts = build_on_cpu(settings)
    steps = pipeline.steps_per_epoch(batches)

    # The stem was fitted to the training images, not left at its unfitted init.
    unfitted = build_model("airbench_net").stem.weight
    assert not torch.allclose(parts.model.net.stem.weight, unfitted)
    # BatchNorm shifts start at 64x the weights' rate (the schedule's first value).
    rates = {len(g["params"]): g["lr"] for g in parts.optimizer.param_groups}
    norm_params = sum(1 for m in parts.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first = parts.optimizer.param_groups[0]["lr"]
    assert rates[norm_params] == pytest.approx(64 * first)
    # Lookahead ramps over the whole run.
    assert parts.lookahead.ramp_steps == settings.train.epochs * steps

    state = pipeline.run_fit(
        settings, splits, parts, batches, CPU, checkpoint_dir=tmp_path / "ckpt"
    )
    assert state.epoch == 2
    assert all(math.isfinite(m["train_loss"]) for m in state.history)
    assert parts.lookahead.fast_steps == 2 * steps


def test_muon_recipe_steps_every_trainable_filter_with_muon(tiny_cifar, tmp_path):
    settings = fast_settings(
        tiny_cifar, tmp_path, "train.epochs=1", "train.batch_size=32", recipe="airbench94_muon"
    )
    splits, batches, parts = build_on_cpu(settings)
    trainable_filters = {id(p) for p in parts.model.parameters() if p.requires_grad and p.ndim == 4}
    [muon_group] = [g for g in parts.optimizer.param_groups if g.get("orthogonal")]
    assert {id(p) for p in muon_group["params"]} == trainable_filters
    assert (muon_group["lr"], muon_group["momentum"]) == (0.24, 0.6)  # flat start: peak at once
    assert parts.lookahead is None

    before = [p.detach().clone() for p in muon_group["params"]]
    state = pipeline.run_fit(
        settings, splits, parts, batches, CPU, checkpoint_dir=tmp_path / "ckpt"
    )
    assert all(math.isfinite(m["train_loss"]) for m in state.history)
    assert all(not torch.equal(b, p) for b, p in zip(before, muon_group["params"]))


def test_an_annealed_stem_bias_trains_at_the_norm_rate_until_it_freezes(tiny_cifar, tmp_path):
    settings = fast_settings(
        tiny_cifar,
        tmp_path,
        "train.epochs=4",
        "train.batch_size=32",
        "optim.stem_bias_schedule=anneal",
        recipe="airbench94_muon",
    )
    splits, batches, parts = build_on_cpu(settings)
    steps = pipeline.steps_per_epoch(batches)
    bias = parts.model.net.stem.bias
    [stem_group] = [g for g in parts.optimizer.param_groups if any(p is bias for p in g["params"])]
    head_lr = parts.optimizer.param_groups[0]["lr"]
    assert stem_group["params"] == [bias] and stem_group["anneal_steps"] == 3 * steps
    assert stem_group["lr"] == pytest.approx(64 * head_lr)

    pipeline.run_fit(settings, splits, parts, batches, CPU, checkpoint_dir=tmp_path / "ckpt")
    assert stem_group["lr"] == 0.0 and not bias.requires_grad
    assert bias.abs().sum() > 0  # it trained in the first 3 epochs (it starts at zero)


def test_annealing_a_stem_bias_needs_a_net_whose_stem_bias_freezes(tiny_cifar, tmp_path):
    for extra in (["model=resnet9"], ["+model.kwargs.stem_bias_epochs=null"]):
        settings = fast_settings(tiny_cifar, tmp_path, "optim.stem_bias_schedule=anneal", *extra)
        with pytest.raises(ConfigError, match="stem_bias_schedule=anneal"):
            build_on_cpu(settings)


def test_asam_from_the_config_trains_beside_lookahead_and_the_ema(tiny_cifar, tmp_path):
    settings = fast_settings(
        tiny_cifar,
        tmp_path,
        "optim.sam_rho=0.5",
        "optim.sam_adaptive=true",
        "train.ema_decay=0.9",
        "train.epochs=1",
        "train.batch_size=64",  # 2 steps
        "optim.lookahead_k=2",  # a pull within the run: the slow weights it ends on have moved
    )
    splits, batches, parts = build_on_cpu(settings)
    assert isinstance(parts.sam, SAM) and (parts.sam.rho, parts.sam.adaptive) == (0.5, True)
    steps = pipeline.steps_per_epoch(batches)
    before = [p.detach().clone() for p in parts.model.parameters()]

    state = pipeline.run_fit(settings, splits, parts, batches, CPU, checkpoint_dir=tmp_path / "c")
    assert math.isfinite(state.history[0]["train_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, parts.model.parameters()))
    assert parts.lookahead.fast_steps == steps and parts.ema.updates == steps  # once a batch


def test_sam_is_built_only_when_its_radius_is_positive(tiny_cifar, tmp_path):
    _, _, parts = build_on_cpu(fast_settings(tiny_cifar, tmp_path, "train.epochs=1"))
    assert parts.sam is None


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_a_grad_scaler_exactly_when_fp16(tiny_cifar, tmp_path, precision, scaled):
    settings = fast_settings(tiny_cifar, tmp_path, f"train.precision={precision}")
    assert settings.train.precision == precision
    _, _, parts = build_on_cpu(settings)
    assert (parts.scaler is not None) == scaled


def test_prepare_machine_resolves_auto_and_sets_threads(tiny_cifar, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(pipeline.hardware, "cpu_bf16_is_native", lambda: False)
    try:
        settings = fast_settings(tiny_cifar, tmp_path, "train.threads=1")
        assert settings.train.precision == "fp32" and torch.get_num_threads() == 1
        params = pipeline.machine_params(settings, CPU)
        assert params["resolved_precision"] == "fp32" and params["cpu_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_speed_probe_leaves_the_random_state_alone():
    model = ImageClassifier(build_model("resnet_small"), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    rate = pipeline.measure_images_per_second(model, 8, CPU, None, steps=1)
    assert rate > 0
    torch.testing.assert_close(torch.rand(4), expected)


def test_where_the_flags_cannot_tell_prepare_machine_times_both_precisions(
    tiny_cifar, tmp_path, monkeypatch
):
    rates = []
    measure = pipeline.measure_images_per_second
    monkeypatch.setattr(pipeline.hardware, "cpu_bf16_is_native", lambda: None)
    monkeypatch.setattr(
        pipeline,
        "measure_images_per_second",
        lambda *a, **k: rates.append(a[3]) or measure(*a, **k),
    )
    settings = fast_settings(tiny_cifar, tmp_path, "train.batch_size=8")
    assert rates == [torch.bfloat16, None] or rates == [None, torch.bfloat16]
    assert settings.train.precision in ("fp32", "bf16")


def test_an_epoch_of_trivial_augment_and_cutmix_through_the_tensor_path(tiny_cifar, tmp_path):
    settings = fast_settings(
        tiny_cifar,
        tmp_path,
        "augment=trivial_augment",
        "augment.tensor.cutmix=0.5",
        "train.epochs=1",
        "data.train_subset=64",  # two steps
    )
    assert settings.data.loader == "tensor"
    splits, batches, parts = build_on_cpu(settings)
    x, y = next(iter(batches(1)))
    assert x.dtype == torch.uint8 and y.shape == (len(x), 10) and y.is_floating_point()
    state = pipeline.run_fit(
        settings, splits, parts, batches, CPU, checkpoint_dir=tmp_path / "ckpt"
    )
    assert state.epoch == 1 and math.isfinite(state.history[0]["train_loss"])
    assert 0 <= state.history[0]["train_acc"] <= 1
