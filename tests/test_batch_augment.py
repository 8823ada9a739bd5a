"""Both data paths give the same crop and flip semantics: the batched tensor ops
are checked against direct per-image reference computations, and the
Albumentations `standard` crop against the same family of translations."""

import numpy as np
import pytest
import torch

from cifar_resnet import batch_augment as ga

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def batch():
    """16 random uint8 NCHW images; random pixels make every translation distinct."""
    return torch.randint(
        0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def reference_translate(image_hwc: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    """Reflect-pad then crop at the offset: what a random-crop pipeline does to one image."""
    padded = np.pad(image_hwc, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = image_hwc.shape[:2]
    return padded[pad + dy : pad + dy + height, pad + dx : pad + dx + width]


@pytest.mark.parametrize("device", DEVICES)
def test_random_translate_matches_pad_and_crop(batch, device):
    images = batch.to(device).contiguous(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(3)
    out, shifts = ga.random_translate(images, 4, generator)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert shifts.abs().max() <= 4 and len(shifts.unique(dim=0)) > 8
    for image, result, (dy, dx) in zip(batch, out.cpu(), shifts.tolist()):
        expected = reference_translate(image.permute(1, 2, 0).numpy(), dy, dx, 4)
        np.testing.assert_array_equal(result.permute(1, 2, 0).numpy(), expected)


def test_albumentations_crop_is_a_translation_of_the_same_family(batch):
    """The per-sample `standard` crop (reflect_101 pad + random crop) lands on one
    of the (2*pad+1)^2 translations that the batched path draws from."""
    # Imported here so the tensor-only tests also run where Albumentations is absent.
    from cifar_resnet.augment import build_train_transform

    shifts = torch.tensor([(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)])
    image = batch[0]
    family = ga.translate(image.expand(len(shifts), -1, -1, -1), shifts)
    family_hwc = family.permute(0, 2, 3, 1).numpy()
    image_hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    crop_only = build_train_transform("standard", pad=4, flip_p=0, cutout_size=0, seed=0)
    found = set()
    for _ in range(60):
        out = crop_only(image_hwc)
        matches = np.flatnonzero((family_hwc == out).all(axis=(1, 2, 3)))
        assert len(matches) == 1
        found.add(int(matches[0]))
    assert len(found) > 20  # many different shifts, not a fixed one
    # With the flip on, an output is a translation of the image or of its mirror.
    mirrored = ga.translate(image.flip(2).expand(len(shifts), -1, -1, -1), shifts)
    both = np.concatenate([family_hwc, mirrored.permute(0, 2, 3, 1).numpy()])
    with_flip = build_train_transform("standard", pad=4, cutout_size=0, seed=0)
    for _ in range(20):
        assert (both == with_flip(image_hwc)).all(axis=(1, 2, 3)).sum() == 1


def test_alternating_flip_flips_once_in_every_two_epochs():
    indices = torch.arange(100)
    masks = torch.stack([ga.flip_mask(indices, epoch, "alternating", seed=0) for epoch in range(6)])
    assert torch.all(masks[1:] ^ masks[:-1])
    assert 30 <= int(masks[0].sum()) <= 70
    # A function of (seed, index): the same whatever batch an index lands in.
    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ga.flip_mask(shuffled, 0, "alternating", seed=0), masks[0][shuffled])
    assert not torch.equal(ga.flip_mask(indices, 0, "alternating", seed=1), masks[0])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_flip_matches_a_per_image_reference(batch, device):
    indices = torch.arange(10, 26, device=device)
    flip_only = ga.BatchAugment(crop_pad=0, flip="alternating", cutout=0)
    for epoch in range(2):
        out = flip_only(batch.to(device), indices, epoch, torch.Generator(device=device), seed=3)
        mask = ga.flip_mask(indices.cpu(), epoch, "alternating", seed=3)
        for image, result, flipped in zip(batch, out.cpu(), mask.tolist()):
            expected = image.numpy()[:, :, ::-1] if flipped else image.numpy()
            np.testing.assert_array_equal(result.numpy(), expected)


def test_random_flip_is_fair_and_seeded():
    indices = torch.arange(1000)
    mask = ga.flip_mask(indices, 0, "random", torch.Generator().manual_seed(0))
    assert 400 < int(mask.sum()) < 600
    assert torch.equal(mask, ga.flip_mask(indices, 5, "random", torch.Generator().manual_seed(0)))
    assert not ga.flip_mask(indices, 0, "none").any()
    with pytest.raises(ValueError, match="alternating"):
        ga.BatchAugment(flip="sometimes")


@pytest.mark.parametrize("device", DEVICES)
def test_cutout_fills_exactly_one_square(device):
    images = torch.zeros(32, 3, 32, 32, dtype=torch.uint8, device=device)
    fill = (125, 123, 114)
    out, corners, applied = ga.cutout(
        images, 8, torch.Generator(device=device).manual_seed(0), fill=fill
    )
    assert applied.all() and corners.min() >= 0 and corners.max() <= 24
    for result, (y0, x0) in zip(out.cpu(), corners.tolist()):
        expected = torch.zeros(3, 32, 32, dtype=torch.uint8)
        expected[:, y0 : y0 + 8, x0 : x0 + 8] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
        assert torch.equal(result, expected)
    _, _, sometimes = ga.cutout(images, 8, torch.Generator(device=device).manual_seed(0), p=0.5)
    assert 0 < int(sometimes.sum()) < 32


@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_is_deterministic_under_the_generator(batch, device):
    augment = ga.BatchAugment(
        crop_pad=4, flip="random", cutout=8, cutout_p=1.0, policy="trivial_augment_wide"
    )
    indices = torch.arange(16, device=device)

    def run(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return augment(batch.to(device), indices, 0, generator)

    out = run(0)
    assert out.shape == batch.shape and out.dtype == torch.uint8 and out.device.type == device
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_alternating_flips_agree_across_devices():
    indices = torch.arange(5000)
    assert torch.equal(
        ga.first_epoch_flips(indices, 7), ga.first_epoch_flips(indices.cuda(), 7).cpu()
    )


# --------------------------------------------------------------------------- policy


def test_the_policy_runs_after_the_flip_and_before_the_cutout(batch):
    from cifar_resnet.policy_augment import TrivialAugmentWide

    indices = torch.arange(16)
    policy_only = ga.BatchAugment(crop_pad=0, flip="none", policy="trivial_augment_wide")
    out = policy_only(batch, indices, 0, torch.Generator().manual_seed(4))
    assert torch.equal(out, TrivialAugmentWide()(batch, torch.Generator().manual_seed(4)))
    full = ga.BatchAugment(
        crop_pad=4, flip="random", policy="trivial_augment_wide", cutout=8, cutout_p=1.0
    )
    generator = torch.Generator().manual_seed(5)
    shifted, _ = ga.random_translate(batch, 4, generator)
    flipped = ga.flip_where(shifted, ga.flip_mask(indices, 0, "random", generator))
    expected, _, _ = ga.cutout(TrivialAugmentWide()(flipped, generator), 8, generator, p=1.0)
    assert torch.equal(full(batch, indices, 0, torch.Generator().manual_seed(5)), expected)


# --------------------------------------------------------------------------- CutMix


def test_a_cutmix_box_covers_one_minus_lambda_of_the_image():
    lam = torch.linspace(0, 1, 101)
    boxes = ga.cutmix_boxes(lam, 32, 24, torch.Generator().manual_seed(0))
    y0, x0, y1, x1 = boxes.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 32).all() and (x1 <= 24).all()
    # Uncut boxes have torchvision's sides: twice int(0.5 * sqrt(1 - lam) * size) each,
    # so their area falls short of (1 - lam) * H * W by less than a 2-px rim.
    half = 0.5 * (1 - lam).sqrt()
    height, width = 2 * (half * 32).long(), 2 * (half * 24).long()
    whole = (y1 - y0 == height) & (x1 - x0 == width)
    assert whole.sum() > 10
    area = ((y1 - y0) * (x1 - x0)).float()
    shortfall = (1 - lam) * 32 * 24 - area
    assert (shortfall[whole] >= -1e-3).all() and (shortfall[whole] < 2 * (32 + 24)).all()
    # Boxes cut at the border are smaller, never larger.
    assert (area[~whole] <= (height * width)[~whole]).all()


def test_cutmix_pastes_the_previous_image_and_mixes_labels_by_the_pasted_area():
    n, classes = 64, 10
    # Each image one flat value (its index + 1), so a pixel tells where it came from.
    images = (torch.arange(n, dtype=torch.uint8) + 1)[:, None, None, None].expand(n, 3, 20, 30)
    labels = torch.arange(n) % classes
    result = ga.cutmix(images, labels, classes, torch.Generator().manual_seed(0), alpha=1.0)
    partner = images.roll(1, 0)
    assert set(result.images.unique().tolist()) <= set(range(1, n + 1))
    pasted = (result.images == partner).float().mean(dim=(1, 2, 3))
    assert torch.equal(result.images, torch.where(result.images == partner, partner, images))
    torch.testing.assert_close(result.lam, 1 - pasted)
    y0, x0, y1, x1 = result.boxes.unbind(1)
    torch.testing.assert_close(result.lam, 1 - ((y1 - y0) * (x1 - x0)).float() / (20 * 30))
    expected = result.lam[:, None] * torch.nn.functional.one_hot(labels, classes)
    expected += (1 - result.lam)[:, None] * torch.nn.functional.one_hot(labels.roll(1), classes)
    torch.testing.assert_close(result.targets, expected)
    assert result.targets.dtype == torch.float32
    torch.testing.assert_close(result.targets.sum(1), torch.ones(n))
    assert (result.lam < 1).sum() > 40  # p=1: only the odd empty box leaves one whole


def test_cutmix_p_mixes_about_that_share_and_p_zero_nothing():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (400,))
    some = ga.cutmix(images, labels, 10, torch.Generator().manual_seed(1), p=0.25)
    assert 60 < int((some.lam < 1).sum()) < 140
    none = ga.cutmix(images, labels, 10, torch.Generator().manual_seed(1), p=0.0)
    assert torch.equal(none.images, images) and (none.lam == 1).all()
    torch.testing.assert_close(none.targets, torch.nn.functional.one_hot(labels, 10).float())


def test_beta_draws_come_from_the_generator_and_have_the_beta_mean_and_spread():
    draws = ga.sample_beta(0.5, 20_000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, ga.sample_beta(0.5, 20_000, torch.Generator().manual_seed(0)))
    assert ((draws >= 0) & (draws <= 1)).all()
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 0.125) < 0.005  # 1/(4(2a+1))
    with pytest.raises(ValueError, match="alpha"):
        ga.sample_beta(0.0, 4, torch.Generator())


@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_mix_gives_soft_targets_on_the_device(batch, device):
    augment = ga.BatchAugment(cutmix=0.5, cutmix_alpha=1.0)
    labels = torch.arange(16, device=device) % 10
    generator = torch.Generator(device=device).manual_seed(0)
    images, targets = augment.mix(batch.to(device), labels, generator, num_classes=10)
    assert images.dtype == torch.uint8 and images.shape == batch.shape
    assert targets.shape == (16, 10) and targets.dtype == torch.float32
    assert targets.device.type == device
    with pytest.raises(ValueError, match="cutmix must be in"):
        ga.BatchAugment(cutmix=1.5)
