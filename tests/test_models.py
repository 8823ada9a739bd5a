"""Model zoo: parameter budgets, shapes under channels_last/autocast, logits, FLOP counting, the
raw-pixel wrapper, and that a small net can fit a tiny batch."""

import pickle

import pytest
import torch
from torch import nn

from cifar_resnet import hardware
from cifar_resnet.models import (
    MODELS,
    ImageClassifier,
    UnknownModelError,
    build_model,
    count_flops,
    count_parameters,
)

PARAMETER_BUDGET = 5_000_000
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def _single_thread_and_seeded():
    # The test machine is shared; one thread keeps timings predictable and the suite polite.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_seed_resnet_has_the_seed_parameter_count():
    assert count_parameters(build_model("seed_resnet")) == 4_994_986


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_fits_the_parameter_budget(name):
    assert 0 < count_parameters(build_model(name)) < PARAMETER_BUDGET


def test_count_parameters_ignores_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 3 * 2 + 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_in_contiguous_channels_last_and_bf16_autocast(name):
    model = build_model(name).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(images).shape == (2, 10)

        model_cl = model.to(memory_format=torch.channels_last)
        logits_cl = model_cl(images.to(memory_format=torch.channels_last))
        assert logits_cl.shape == (2, 10)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16 = model_cl(images.to(memory_format=torch.channels_last))
        assert logits_bf16.shape == (2, 10)
        assert torch.isfinite(logits_bf16.float()).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_num_classes_sets_the_output_width(name):
    model = build_model(name, num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_are_logits_not_probabilities(name):
    model = build_model(name).eval()
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)) for m in model.modules())
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32))
    # Probabilities would be non-negative with rows summing to 1; log-probabilities would exp-sum to 1.
    assert (logits < 0).any()
    assert not torch.allclose(logits.sum(dim=1), torch.ones(4), atol=1e-3)
    assert not torch.allclose(logits.exp().sum(dim=1), torch.ones(4), atol=1e-3)


def test_unknown_model_error_names_the_known_models():
    with pytest.raises(UnknownModelError) as excinfo:
        build_model("nope")
    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert "nope" in message
    for name in MODELS:
        assert name in message


def test_unknown_model_error_survives_pickling():
    error = pickle.loads(pickle.dumps(UnknownModelError("nope")))
    assert error.name == "nope"
    assert str(error) == str(UnknownModelError("nope"))


def test_builders_reject_unknown_kwargs():
    with pytest.raises(TypeError):
        build_model("resnet_small", not_a_kwarg=1)


def test_seed_resnet_dropout_kwargs_reach_the_layers():
    model = build_model("seed_resnet", dropout=0.3, head_dropout=0.1)
    residual_dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout2d)]
    head_dropouts = [m.p for m in model.modules() if type(m) is nn.Dropout]
    assert residual_dropouts == [0.3] * (8 + 6 + 4 + 3)
    assert head_dropouts == [0.1]


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    from cifar_resnet.models.resnet import BasicBlock

    default_blocks = [m for m in build_model("seed_resnet").modules() if isinstance(m, BasicBlock)]
    zeroed_blocks = [
        m
        for m in build_model("seed_resnet", zero_init_residual=True).modules()
        if isinstance(m, BasicBlock)
    ]
    assert len(zeroed_blocks) == 21
    assert all((block.bn2.weight == 1).all() for block in default_blocks)
    assert all((block.bn2.weight == 0).all() for block in zeroed_blocks)


def test_wide_resnet_depth_and_width_kwargs():
    assert 2_700_000 < count_parameters(build_model("wide_resnet")) < 2_800_000
    assert count_parameters(build_model("wide_resnet", depth=10, widen_factor=1)) < 100_000
    with pytest.raises(ValueError):
        build_model("wide_resnet", depth=15)


def test_resnet9_width_multiplier_and_logit_scale():
    narrow = build_model("resnet9", width=0.5)
    assert count_parameters(narrow) < count_parameters(build_model("resnet9")) / 3
    images = torch.randn(2, 3, 32, 32)
    scaled = build_model("resnet9", logit_scale=0.125).eval()
    unscaled = build_model("resnet9", logit_scale=1.0).eval()
    unscaled.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scaled(images) * 8, unscaled(images))
    with pytest.raises(ValueError):
        build_model("resnet9", act="swish")


def test_count_flops_matches_the_hand_formula():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)  # 32x32 -> 16x16
    grouped = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=4)
    linear = nn.Linear(8 * 16 * 16, 10)
    model = nn.Sequential(conv, nn.ReLU(), grouped, nn.Flatten(), linear).train()

    conv_macs = (8 * 16 * 16) * 3 * (3 * 3)
    grouped_macs = (8 * 16 * 16) * (8 // 4) * (3 * 3)
    linear_macs = 10 * (8 * 16 * 16)
    expected = 2 * (conv_macs + grouped_macs + linear_macs)

    assert count_flops(model) == expected
    assert count_flops(model, input_shape=(4, 3, 32, 32)) == expected  # per image, not per batch
    assert model.training  # mode restored
    assert not model[0]._forward_hooks  # hooks removed


def test_image_classifier_uint8_and_float_pixels_give_the_same_logits():
    classifier = ImageClassifier(build_model("resnet_small"), CIFAR_MEAN, CIFAR_STD).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixels), classifier(pixels.float()), rtol=0, atol=0)


def test_image_classifier_applies_mean_and_std():
    net = build_model("resnet_small").eval()
    classifier = ImageClassifier(net, CIFAR_MEAN, CIFAR_STD).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((pixels.float() / 255 - mean) / std)
        torch.testing.assert_close(classifier(pixels), expected)
        # Guard against a net so insensitive to its input that any normalisation would pass.
        assert not torch.allclose(net(pixels.float() / 255), expected, atol=1e-3)


def test_image_classifier_stores_normalisation_in_the_state_dict():
    classifier = ImageClassifier(nn.Identity(), CIFAR_MEAN, CIFAR_STD)
    state = classifier.state_dict()
    assert state["mean"].shape == state["std"].shape == (1, 3, 1, 1)
    torch.testing.assert_close(state["std"].flatten(), torch.tensor(CIFAR_STD))
    with pytest.raises(ValueError):
        ImageClassifier(nn.Identity(), CIFAR_MEAN, (0.2, 0.0, 0.2))


def test_resnet_small_memorises_a_tiny_random_batch():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    model = ImageClassifier(build_model("resnet_small"), CIFAR_MEAN, CIFAR_STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    model.train()
    for _ in range(30):  # it needs 10-20 steps on this batch; 30 leaves margin
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(pixels), labels).backward()
        optimizer.step()

    # Running BN statistics lag the fast-moving weights; re-estimate them on this batch so
    # eval mode sees the statistics the weights were trained with.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the exact batch statistics
    with torch.no_grad():
        model(pixels)

    model.eval()
    with torch.no_grad():
        accuracy = (model(pixels).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == 1.0


@pytest.mark.parametrize("name", ["whitened_resnet", "airbench_net", "airbench96_net"])
def test_the_whitening_stem_whitens_the_patches_it_was_fitted_on(name):
    # Strongly correlated channels: every channel is the same noise plus a little of its own.
    shared = torch.randn(64, 1, 16, 16)
    images = shared + 0.1 * torch.randn(64, 3, 16, 16)
    net = build_model(name)
    net.init_from_images(images)
    responses = net.stem(images) - net.stem.bias[:, None, None]
    half = responses[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    half = half - half.mean(dim=0)
    covariance = half.T @ half / len(half)
    # Whitened up to the regulariser eps, which only matters for the weakest direction.
    assert torch.allclose(covariance[:11, :11], torch.eye(11), atol=0.05)
    # The other half are the negatives, so a GELU after the stem keeps both signs.
    assert torch.equal(net.stem.weight[12:], -net.stem.weight[:12])


@pytest.mark.parametrize("name", ["whitened_resnet", "airbench_net"])
def test_whitened_nets_train_only_bn_shifts_and_have_the_documented_size(name):
    # airbench94's published net: the same count, the residual adds no parameter.
    net = build_model(name)
    assert count_parameters(net) == 1_971_352
    assert count_flops(net) == 236_294_720
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(
        not bn.weight.requires_grad and bn.bias.requires_grad for bn in batch_norms
    )
    assert not net.stem.weight.requires_grad


def test_airbench_net_is_plain_with_airbench_bn_and_a_3x3_head_pool():
    net = build_model("airbench_net")
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in batch_norms} == {(1e-12, 0.4)}
    net.eval()
    stage = net.stages[0]
    x = torch.randn(2, 24, 32, 32)
    # Plain: the stage's output is its second block's, not that plus the entry's.
    assert torch.equal(stage(x), stage.residual(stage.entry(x)))
    # On 32x32 images the last map is 3x3, so the 3x3 head pool sees all of it: the
    # same network as a whole-map pool.
    whole_map = build_model("airbench_net", head_pool=0).eval()
    whole_map.load_state_dict(net.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(images), whole_map(images))
    residual = build_model("airbench_net", residual=True)
    assert not torch.equal(
        residual.stages[0](x), residual.stages[0].residual(residual.stages[0].entry(x))
    )


@pytest.mark.parametrize(
    "stem_bias_epochs, trained_in", [(3, {1, 2, 3}), (0, set()), (None, {1, 2, 3, 4, 5})]
)
def test_the_stem_bias_trains_until_its_epoch_then_freezes(stem_bias_epochs, trained_in):
    classifier = ImageClassifier(
        build_model("airbench_net", stem_bias_epochs=stem_bias_epochs), CIFAR_MEAN, CIFAR_STD
    )
    trained = set()
    for epoch in range(1, 6):
        classifier.set_epoch(epoch)  # what engine.fit calls before each epoch
        if classifier.net.stem.bias.requires_grad:
            trained.add(epoch)
    assert trained == trained_in
    assert count_parameters(classifier) == 1_971_352 - (24 if stem_bias_epochs is not None else 0)


def test_image_classifier_fits_a_data_dependent_init_on_normalised_pixels():
    pixels = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    fitted = ImageClassifier(build_model("whitened_resnet"), CIFAR_MEAN, CIFAR_STD)
    fitted.init_from_images(pixels)
    reference = build_model("whitened_resnet")
    reference.init_from_images(fitted.normalise(pixels))
    assert torch.equal(fitted.net.stem.weight, reference.stem.weight)
    # A network without such an init is left as it was.
    plain = ImageClassifier(build_model("resnet_small"), CIFAR_MEAN, CIFAR_STD)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.init_from_images(pixels)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_unfitted_whitened_resnet_still_trains():
    # Before init_from_images every stem channel must vary: a constant channel reaches a
    # BatchNorm with zero variance, whose gradient (divided by sqrt(eps)) blew training up.
    net = build_model("whitened_resnet")
    images = torch.randn(64, 3, 32, 32)
    stem_out = net.stem(images)
    assert (stem_out.var(dim=(0, 2, 3)) > 1e-3).all()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    labels = torch.randint(0, 10, (64,))
    # The precision a run would use here: bf16 emulated (an AVX2 CPU) took a minute.
    amp = hardware.autocast_dtype(hardware.resolve_precision("auto", torch.device("cpu")))
    for _ in range(6):
        with torch.autocast("cpu", amp or torch.float32, enabled=amp is not None):
            loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert net.stem.bias.abs().max() < 1.0


def test_a_two_conv_stage_keeps_the_state_dict_layout_of_earlier_checkpoints():
    stage = build_model("whitened_resnet").stages[0]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert sorted(stage.state_dict()) == sorted(
        ["entry.0.weight", *(f"entry.2.{k}" for k in bn)]
        + ["residual.0.weight", *(f"residual.1.{k}" for k in bn)]
    )


def test_a_whitened_stage_needs_at_least_two_convs():
    with pytest.raises(ValueError, match="convs_per_stage"):
        build_model("airbench_net", convs_per_stage=1)


def test_airbench96_net_has_the_computed_size_and_airbench96s_layers():
    net = build_model("airbench96_net")
    # Computed by building it; the widths' comment in models/whitened.py says why 128/256/352.
    assert count_parameters(net) == 4_844_152 < PARAMETER_BUDGET
    assert count_flops(net) == 554_350_016
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # "The network now contains 10 conv layers": the 2x2 stem and three per stage.
    assert [c.kernel_size for c in convs] == [(2, 2)] + [(3, 3)] * 9
    assert not convs[0].weight.requires_grad
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == 9
    assert {(bn.eps, bn.momentum) for bn in batch_norms} == {(1e-12, 0.1)}
    assert all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in batch_norms)
    # Convolutions, norms, pools and a linear head: no attention or squeeze-excitation.
    leaves = {type(m) for m in net.modules() if not list(m.children())}
    assert leaves == {nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.GELU, nn.Flatten, nn.Linear}
    net.set_epoch(4)  # airbench96 trains the stem's bias for 3 epochs
    assert count_parameters(net) == 4_844_152 - 24


@pytest.mark.parametrize(
    "kwargs, silent_branch_gives",
    [
        ({}, "gelu(entry)"),  # airbench96 as updated: GELU(entry + branch)
        ({"act_after_sum": False}, "entry"),  # as first published: entry + GELU(branch)
        ({"residual": False}, "zero"),  # no skip: nothing gets past a silent branch
    ],
    ids=["as_updated", "as_first_published", "plain"],
)
def test_airbench96_stages_add_their_first_convs_output_to_the_third_convs(
    kwargs, silent_branch_gives
):
    stage = build_model("airbench96_net", **kwargs).stages[0].eval()
    first, _, third = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(2, 24, 16, 16)
    # In eval mode a fresh BN is the identity (running mean 0, variance 1, shift 0), so
    # the entry is GELU(max-pool(conv(x))) and a zeroed third conv silences the branch.
    entry = nn.functional.gelu(nn.functional.max_pool2d(first(x), 2))
    with torch.no_grad():
        before = stage(x)
        third.weight.zero_()
        after = stage(x)
    expected = {
        "gelu(entry)": nn.functional.gelu(entry),
        "entry": entry,
        "zero": torch.zeros_like(entry),
    }[silent_branch_gives]
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after, atol=1e-3)  # the third conv counted before
