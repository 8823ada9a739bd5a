"""Per-sample training augmentations (Albumentations 2.0.8), chosen by name.
(The test-time view sets are in ``tta``.)

Every pipeline maps one uint8 HWC RGB image to another of the same shape.
Pipelines are built with ``strict=True``: Albumentations 2.x otherwise only
warns about an unknown argument (a 1.x name, a typo) and silently uses its
default.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema

from .data import CIFAR10_MEAN_PIXEL

__all__ = [
    "AUGMENTATIONS",
    "AlbumentationsTransform",
    "FiveCropResize",
    "build_train_transform",
    "strict_compose",
]

AUGMENTATIONS: tuple[str, ...] = ("none", "standard", "seed")


class AlbumentationsTransform:
    """An ``A.Compose`` as a plain image -> image function that can be reseeded.

    ``reseed`` puts one random stream behind every child transform. (Compose's
    own ``seed=`` gives each child an identically seeded RNG of its own, so e.g.
    two p=0.5 transforms would always fire together.)
    """

    def __init__(self, compose: A.Compose, seed: int | None = None):
        self.compose = compose
        if seed is not None:
            self.reseed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.compose(image=image)["image"]

    def reseed(self, seed: int) -> None:
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.compose!r})"


def strict_compose(transforms: Sequence[Any]) -> A.Compose:
    """``A.Compose`` that rejects unknown transform arguments instead of ignoring them."""
    return A.Compose(list(transforms), strict=True)


class FiveCropResize(A.ImageOnlyTransform):
    """Crop a random square of side in ``size_range`` (inclusive) at one of the
    four corners or the centre (chosen uniformly), then resize it back to the
    input size with area interpolation. Randomness comes from the transform's
    own ``py_random``, so reseeding the pipeline reproduces it."""

    class InitSchema(BaseTransformInitSchema):
        size_range: tuple[int, int]

    def __init__(self, size_range: tuple[int, int] = (20, 28), p: float = 0.5):
        super().__init__(p=p)
        if not 1 <= size_range[0] <= size_range[1]:
            raise ValueError(
                f"size_range must be (low, high) with 1 <= low <= high, got {size_range}"
            )
        self.size_range = tuple(size_range)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        side = min(self.py_random.randint(*self.size_range), height, width)
        position = self.py_random.randrange(5)  # 0-3: corners clockwise from top-left, 4: centre
        top = {0: 0, 1: 0, 2: height - side, 3: height - side, 4: (height - side) // 2}[position]
        left = {0: 0, 1: width - side, 2: width - side, 3: 0, 4: (width - side) // 2}[position]
        return {"crop_box": (top, left, side)}

    def apply(self, img: np.ndarray, crop_box: tuple[int, int, int], **params: Any) -> np.ndarray:
        top, left, side = crop_box
        height, width = img.shape[:2]
        crop = img[top : top + side, left : left + side]
        resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
        # cv2 drops a trailing single channel.
        return resized.reshape(img.shape)


def _standard(
    pad: int = 4,
    flip_p: float = 0.5,
    cutout_size: int = 8,
    cutout_p: float = 0.5,
    fill: Sequence[float] = CIFAR10_MEAN_PIXEL,
    size: int = 32,
) -> list[Any]:
    """Reflect-pad + random crop (a shift in [-pad, pad]^2), horizontal flip,
    cutout: one square hole fully inside, filled with the mean pixel."""
    transforms: list[Any] = []
    if pad:
        transforms += [
            A.PadIfNeeded(
                min_height=size + 2 * pad,
                min_width=size + 2 * pad,
                position="center",
                border_mode=cv2.BORDER_REFLECT_101,
            ),
            A.RandomCrop(height=size, width=size),
        ]
    if flip_p:
        transforms.append(A.HorizontalFlip(p=flip_p))
    if cutout_size and cutout_p:
        transforms.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(cutout_size, cutout_size),
                hole_width_range=(cutout_size, cutout_size),
                fill=tuple(fill),
                p=cutout_p,
            )
        )
    return transforms


def _seed(
    flip_p: float = 0.5,
    crop_p: float = 0.5,
    crop_size: Sequence[int] = (20, 28),
    blur_p: float = 0.2,
    blur_sigma: Sequence[float] = (0.5, 1.0),
    gray_p: float = 0.1,
    jitter_p: float = 0.5,
    brightness: float = 0.2,
    contrast: float = 0.2,
) -> list[Any]:
    """The seed report's set; each transform fires on its own, so every sample
    gets a random subset of: flip, five-crop-style crop, Gaussian blur,
    grayscale, brightness/contrast jitter."""
    return [
        A.HorizontalFlip(p=flip_p),
        FiveCropResize(size_range=tuple(crop_size), p=crop_p),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=tuple(blur_sigma), p=blur_p),
        A.ToGray(num_output_channels=3, method="weighted_average", p=gray_p),
        A.RandomBrightnessContrast(
            brightness_limit=brightness, contrast_limit=contrast, p=jitter_p
        ),
    ]


_BUILDERS: dict[str, Callable[..., list[Any]]] = {"standard": _standard, "seed": _seed}


def build_train_transform(
    name: str,
    seed: int | None = None,
    **params: Any,
) -> AlbumentationsTransform | None:
    """The named training pipeline ("none" -> None). ``params`` override the
    builder's defaults (an unknown one is a TypeError); ``seed`` fixes its
    random stream (``make_loader`` reseeds it per epoch and worker anyway)."""
    if name == "none":
        if params:
            raise TypeError(f"augmentation 'none' takes no parameters, got {sorted(params)}")
        return None
    if name not in _BUILDERS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    return AlbumentationsTransform(strict_compose(_BUILDERS[name](**params)), seed=seed)
