import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from cifar_resnet import augment
from cifar_resnet.gpu_augment import translate


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["standard", "seed"])
def test_pipelines_keep_uint8_hwc(name, images):
    transform = augment.build_train_transform(name, seed=0)
    outputs = [transform(image) for image in images]
    assert all(out.dtype == np.uint8 and out.shape == (32, 32, 3) for out in outputs)
    assert sum(not np.array_equal(out, image) for out, image in zip(outputs, images)) >= 10


@pytest.mark.parametrize("name", ["standard", "seed"])
def test_pipelines_are_deterministic_under_a_seed(name, images):
    def run(transform):
        return np.stack([transform(image) for image in images])

    first = run(augment.build_train_transform(name, seed=1))
    np.testing.assert_array_equal(first, run(augment.build_train_transform(name, seed=1)))
    assert not np.array_equal(first, run(augment.build_train_transform(name, seed=2)))
    reseeded = augment.build_train_transform(name, seed=7)
    reseeded.reseed(1)
    np.testing.assert_array_equal(first, run(reseeded))


def test_reseeded_children_draw_independently():
    # Compose(seed=...) seeds every child alike, so two p=0.5 flips would always
    # fire together; one shared stream must give all four combinations.
    flips = augment.AlbumentationsTransform(
        augment.strict_compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]), seed=0)
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    variants = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    outcomes = set()
    for _ in range(40):
        out = flips(image)
        outcomes.add(next(i for i, v in enumerate(variants) if np.array_equal(out, v)))
    assert outcomes == {0, 1, 2, 3}


def test_names_and_parameters():
    assert augment.AUGMENTATIONS == ("none", "standard", "seed")
    assert augment.build_train_transform("none") is None
    with pytest.raises(ValueError, match="standard"):
        augment.build_train_transform("autoaugment")
    with pytest.raises(TypeError):
        augment.build_train_transform("standard", cutot_size=8)
    assert augment.build_train_transform("standard").compose.strict
    assert augment.build_train_transform("seed").compose.strict


def test_strict_compose_rejects_a_misspelt_argument():
    # max_holes is the 1.x name; 2.x would only warn and use its default.
    with pytest.warns(UserWarning):
        A.Compose([A.CoarseDropout(max_holes=1)])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="max_holes"):
        augment.strict_compose([A.CoarseDropout(max_holes=1)])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="size_rang"):
        augment.strict_compose([augment.FiveCropResize(size_rang=(20, 28))])


def test_cutout_fills_one_square_with_the_mean_pixel():
    transform = augment.build_train_transform("standard", pad=0, flip_p=0, cutout_size=12,
                                              cutout_p=1.0, seed=0)
    out = transform(np.zeros((32, 32, 3), dtype=np.uint8))
    filled = (out == augment.CIFAR10_MEAN_PIXEL).all(-1)
    rows, cols = np.flatnonzero(filled.any(1)), np.flatnonzero(filled.any(0))
    assert filled.sum() == 144 and len(rows) == 12 and len(cols) == 12


def test_five_crop_resize_picks_a_corner_or_the_centre(images):
    crop = augment.FiveCropResize(size_range=(16, 16), p=1.0)
    compose = augment.strict_compose([crop])
    image = images[0]
    corners = [(0, 0), (0, 16), (16, 16), (16, 0), (8, 8)]
    expected = [cv2.resize(image[y:y + 16, x:x + 16], (32, 32), interpolation=cv2.INTER_AREA)
                for y, x in corners]
    seen = set()
    for _ in range(60):
        out = compose(image=image)["image"]
        matches = [i for i, candidate in enumerate(expected) if np.array_equal(out, candidate)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------- TTA views


@pytest.mark.parametrize("name, count", [("identity", 1), ("flip", 2), ("flip_shift", 6),
                                         ("seed", 5)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tta_view_sets(name, count, dtype):
    batch = torch.randint(0, 256, (4, 3, 32, 32)).to(dtype)
    views = augment.tta_views(name)
    assert len(views) == count == len(augment.TTA_VIEWS[name])
    for view in views:
        out = view(batch)
        assert out.shape == batch.shape and out.dtype == dtype
    assert torch.equal(views[0](batch), batch)
    if count > 1:
        assert torch.equal(views[1 if name != "flip_shift" else 3](batch),
                           torch.flip(batch, dims=[3]))


def test_tta_views_do_what_they_say():
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    views = dict(zip(augment.TTA_VIEWS["flip_shift"], augment.tta_views("flip_shift")))
    # shift_dr moves the content one pixel down and right.
    assert torch.equal(views["shift_dr"](batch)[:, :, 1:, 1:], batch[:, :, :-1, :-1])
    assert torch.equal(views["shift_ul"](batch)[:, :, :-1, :-1], batch[:, :, 1:, 1:])
    assert torch.equal(views["hflip_shift_dr"](batch),
                       translate(batch.flip(3), torch.tensor([[-1, -1]])))
    identity, hflip, blur, brighter, contrast = augment.tta_views("seed")
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(blur(flat), flat)  # a blur keeps a flat image
    assert brighter(flat).unique().tolist() == [110]
    assert brighter(torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)).unique().tolist() == [255]
    two_tone = torch.tensor([0.4, 0.6]).repeat(1, 3, 2, 1)
    np.testing.assert_allclose(contrast(two_tone).unique().tolist(), [0.39, 0.61], atol=1e-6)


def test_unknown_tta_set():
    with pytest.raises(ValueError, match="flip_shift"):
        augment.tta_views("ten_crop")
