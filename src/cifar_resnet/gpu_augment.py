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
Test-time augmentation views (``tta_views``) live here too, since they are
batched tensor ops as well; ``augment`` re-exports them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import CIFAR10_MEAN_PIXEL

FLIP_MODES = ("none", "random", "alternating")


# --------------------------------------------------------------------------- translate


def reflect_index(positions: Tensor, size: int) -> Tensor:
    """Map positions outside [0, size) back inside by reflect-101
    (cv2.BORDER_REFLECT_101, np.pad "reflect"): -1 -> 1, size -> size - 2."""
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    wrapped = positions.remainder(period)
    return torch.where(wrapped >= size, period - wrapped, wrapped)


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
    shifts = torch.randint(-pad, pad + 1, (len(images), 2), generator=generator,
                           device=images.device)
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
        return torch.randint(0, 2, (len(indices),), generator=generator,
                             device=indices.device).bool()
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
            raise ValueError(f"unknown flip mode {self.flip!r}; choose from {', '.join(FLIP_MODES)}")
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


# --------------------------------------------------------------------------- test-time views

TTA_VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),  # alias of "identity", the config default
    "identity": ("identity",),
    "flip": ("identity", "hflip"),
    # {as is, flipped} x {unshifted, content moved 1 px down-right, 1 px up-left}
    "flip_shift": ("identity", "shift_dr", "shift_ul", "hflip", "hflip_shift_dr", "hflip_shift_ul"),
    "seed": ("identity", "hflip", "blur", "brighter", "more_contrast"),
}


def _identity(x: Tensor) -> Tensor:
    return x


def _hflip(x: Tensor) -> Tensor:
    return x.flip(3)


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    return translate(x, torch.tensor([[dy, dx]]))


def _as_pixels(x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
    """Run ``compute`` in float; integer images come back rounded, clipped and in
    their dtype, float images unclipped (their range is the caller's)."""
    if x.is_floating_point():
        return compute(x)
    return compute(x.float()).round().clamp(0, 255).to(x.dtype)


def _gaussian_kernel3(sigma: float) -> Tensor:
    taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    return taps[:, None] * taps[None, :]


def _blur(x: Tensor, sigma: float = 0.8) -> Tensor:
    def compute(v: Tensor) -> Tensor:
        channels = v.shape[1]
        kernel = _gaussian_kernel3(sigma).to(v).expand(channels, 1, 3, 3)
        return F.conv2d(F.pad(v, (1, 1, 1, 1), mode="reflect"), kernel, groups=channels)

    return _as_pixels(x, compute)


def _brighter(x: Tensor, factor: float = 1.1) -> Tensor:
    return _as_pixels(x, lambda v: v * factor)


def _more_contrast(x: Tensor, factor: float = 1.1) -> Tensor:
    def compute(v: Tensor) -> Tensor:
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        return mean + factor * (v - mean)

    return _as_pixels(x, compute)


_VIEW_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": _identity,
    "hflip": _hflip,
    "shift_dr": functools.partial(_shift, dy=-1, dx=-1),
    "shift_ul": functools.partial(_shift, dy=1, dx=1),
    "hflip_shift_dr": lambda x: _shift(_hflip(x), -1, -1),
    "hflip_shift_ul": lambda x: _shift(_hflip(x), 1, 1),
    "blur": _blur,  # 3x3 Gaussian, sigma 0.8, reflect-101 borders
    "brighter": _brighter,  # x * 1.1
    "more_contrast": _more_contrast,  # per-image mean + 1.1 * (x - mean)
}


def tta_views(name: str) -> list[Callable[[Tensor], Tensor]]:
    """The test-time views of a set: functions from an NCHW batch (uint8 or float
    intensities, not normalised) to a batch of the same shape and dtype."""
    if name not in TTA_VIEWS:
        raise ValueError(f"unknown TTA view set {name!r}; choose from {', '.join(TTA_VIEWS)}")
    return [_VIEW_FUNCTIONS[view] for view in TTA_VIEWS[name]]
