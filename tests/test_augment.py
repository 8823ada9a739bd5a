import albumentations as A
import cv2
import numpy as np
import pytest

from cifar_resnet import augment


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
        augment.strict_compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]), seed=0
    )
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
    transform = augment.build_train_transform(
        "standard", pad=0, flip_p=0, cutout_size=12, cutout_p=1.0, seed=0
    )
    out = transform(np.zeros((32, 32, 3), dtype=np.uint8))
    filled = (out == augment.CIFAR10_MEAN_PIXEL).all(-1)
    rows, cols = np.flatnonzero(filled.any(1)), np.flatnonzero(filled.any(0))
    assert filled.sum() == 144 and len(rows) == 12 and len(cols) == 12


def test_five_crop_resize_picks_a_corner_or_the_centre(images):
    crop = augment.FiveCropResize(size_range=(16, 16), p=1.0)
    compose = augment.strict_compose([crop])
    image = images[0]
    corners = [(0, 0), (0, 16), (16, 16), (16, 0), (8, 8)]
    expected = [
        cv2.resize(image[y : y + 16, x : x + 16], (32, 32), interpolation=cv2.INTER_AREA)
        for y, x in corners
    ]
    seen = set()
    for _ in range(60):
        out = compose(image=image)["image"]
        matches = [i for i, candidate in enumerate(expected) if np.array_equal(out, candidate)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3, 4}
