"""Batched augmentation of NCHW image tensors, on whatever device they live.

The semantics match the Albumentations ``standard`` pipeline:

- translate: reflect-101 padding by ``pad`` then a random crop of the original
  size, i.e. a per-image shift (dy, dx) in [-pad, pad]^2 with
  ``out[y, x] = reflect101(img)[y + dy, x + dx]``;
- horizontal flip;
- cutout: one ``size`` x ``size`` square, always fully inside the image (as
  Albumentations' CoarseDropout places its holes), filled with the dataset's
  mean pixel.

Every op is a handful of tensor ops over the whole batch, no per-image Python.
Test-time views live in ``tta``, which serving imports too; the reflect-101
indexing is shared from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import CIFAR10_MEAN_PIXEL
from .tta import reflect_index

FLIP_MODES = ("none", "random", "alternating")


# --------------------------------------------------------------------------- translate


def translate(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift each NCHW image by its (dy, dx) row of ``shifts`` (N, 2), reflect-101
    at the borders: ``out[n, :, y, x] = reflect101(images[n])[:, y + dy, x + dx]``."""
    n, _, height, width = images.shape
    device = images.device
    shifts = shifts.to(device=device, dtype=torch.int64).expand(n, 2)
    rows = reflect_index(torch.arange(height, device=device) + shifts[:, :1], height)  # (N, H)
    cols = reflect_index(torch.arange(width, device=device) + shifts[:, 1:], width)  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    # Gathering on the NHWC view moves whole pixels and leaves channels_last memory.
    nhwc = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return nhwc.permute(0, 3, 1, 2)


def random_translate(images: Tensor, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(shifted images, shifts (N, 2) int64 (dy, dx) each uniform in [-pad, pad])."""
    shifts = torch.randint(
        -pad, pad + 1, (len(images), 2), generator=generator, device=images.device
    )
    if pad == 0:
        return images, shifts
    return translate(images, shifts), shifts


# --------------------------------------------------------------------------- flip

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """An integer hash on 32-bit values held in int64 (after Wellons' lowbias32).
    Both multipliers are below 2**31, so every product is exact in int64 and the
    result is the same on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x346CA68B) & _MASK32
    return x ^ (x >> 16)


def first_epoch_flips(indices: Tensor, seed: int) -> Tensor:
    """Epoch 0's flip decision for each dataset index: a fair coin that is a pure
    function of (seed, index) (a counter-based generator), so no state is kept and
    every batch, device and epoch agrees on it."""
    seed_key = (seed * 0x9E3779B9 + 0x632BE5AB) & _MASK32
    hashed = _mix32(_mix32(indices.to(torch.int64)) ^ seed_key)
    return (hashed >> 31).bool()


def flip_mask(
    indices: Tensor,
    epoch: int,
    mode: str,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> Tensor:
    """Which images of the batch to flip horizontally (bool (N,)).

    - "none": none;
    - "random": each with p=0.5, drawn from ``generator``;
    - "alternating" (airbench): epoch 0 flips at random per dataset index (see
      ``first_epoch_flips``); epoch e flips index i iff that first decision XOR
      (e is odd), so each image is flipped in exactly one of any two consecutive
      epochs.
    """
    if mode == "none":
        return torch.zeros(len(indices), dtype=torch.bool, device=indices.device)
    if mode == "random":
        return torch.randint(
            0, 2, (len(indices),), generator=generator, device=indices.device
        ).bool()
    if mode == "alternating":
        return first_epoch_flips(indices, seed) ^ bool(epoch % 2)
    raise ValueError(f"unknown flip mode {mode!r}; choose from {', '.join(FLIP_MODES)}")


def flip_where(images: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask[:, None, None, None], images.flip(3), images)


# --------------------------------------------------------------------------- cutout


def cutout(
    images: Tensor,
    size: int,
    generator: torch.Generator,
    fill: float | Sequence[float] = CIFAR10_MEAN_PIXEL,
    p: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fill one ``size`` x ``size`` square per image with ``fill`` (a value, or one per
    channel), with probability ``p``; the square always lies fully inside.

    Returns (images, corners (N, 2) int64 top-left (y0, x0), applied bool (N,)).
    """
    n, _, height, width = images.shape
    device = images.device
    if not 0 < size <= min(height, width):
        raise ValueError(f"cutout size must be in [1, {min(height, width)}], got {size}")
    y0 = torch.randint(0, height - size + 1, (n, 1), generator=generator, device=device)
    x0 = torch.randint(0, width - size + 1, (n, 1), generator=generator, device=device)
    applied = torch.rand(n, generator=generator, device=device) < p
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= y0) & (rows < y0 + size)  # (N, H)
    in_cols = (cols >= x0) & (cols < x0 + size)  # (N, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :] & applied[:, None, None]
    fill_value = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1, 1, 1)
    out = torch.where(hole[:, None], fill_value, images)
    return out, torch.cat([y0, x0], dim=1), applied


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class BatchAugment:
    """Translate, flip, cutout on whole uint8 NCHW batches, on any device.

    crop_pad: shift by up to this many px, reflect-101 padded (0 = off).
    flip: "none" | "random" | "alternating" (see ``flip_mask``).
    cutout: side of the square hole in px (0 = off), fully inside the image,
        applied with probability ``cutout_p`` (the Albumentations ``standard``
        pipeline's default too), filled with ``cutout_fill`` (the CIFAR-10 mean
        pixel, i.e. zero after normalisation).
    """

    crop_pad: int = 4
    flip: str = "random"
    cutout: int = 0
    cutout_p: float = 0.5
    cutout_fill: tuple[int, ...] = CIFAR10_MEAN_PIXEL

    def __post_init__(self):
        if self.flip not in FLIP_MODES:
            raise ValueError(
                f"unknown flip mode {self.flip!r}; choose from {', '.join(FLIP_MODES)}"
            )
        if self.crop_pad < 0 or self.cutout < 0 or not 0 <= self.cutout_p <= 1:
            raise ValueError(f"crop_pad and cutout must be >= 0 and cutout_p in [0, 1]: {self}")
        # Hydra hands in lists; a tuple keeps the dataclass hashable.
        object.__setattr__(self, "cutout_fill", tuple(self.cutout_fill))

    def __call__(
        self,
        images: Tensor,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
        seed: int = 0,
    ) -> Tensor:
        """Augment a batch; ``indices`` are its dataset indices and ``seed`` the
        loader's seed (both used only by the "alternating" flip); the random draws
        come from ``generator``, which must live on the images' device."""
        if self.crop_pad:
            images, _ = random_translate(images, self.crop_pad, generator)
        if self.flip != "none":
            images = flip_where(images, flip_mask(indices, epoch, self.flip, generator, seed))
        if self.cutout:
            images, _, _ = cutout(images, self.cutout, generator, self.cutout_fill, self.cutout_p)
        return images
