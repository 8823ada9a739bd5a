"""Batched augmentation of NCHW image tensors, on whatever device they live.

The semantics match the Albumentations ``standard`` pipeline:

- translate: reflect-101 padding by ``pad`` then a random crop of the original
  size, i.e. a per-image shift (dy, dx) in [-pad, pad]^2 with
  ``out[y, x] = reflect101(img)[y + dy, x + dx]``;
- horizontal flip;
- cutout: one ``size`` x ``size`` square, always fully inside the image (as
  Albumentations' CoarseDropout places its holes), filled with the dataset's
  mean pixel.

Beyond it, for this path only: a policy (TrivialAugmentWide, in ``policy_augment``)
between the flip and the cutout, and CutMix, which mixes the labels too and so is a
step of its own (``BatchAugment.mix``) that yields soft targets.

Every op is a handful of tensor ops over the whole batch, no per-image Python.
Test-time views live in ``tta``, which serving imports too; the reflect-101
indexing is shared from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import CIFAR10_MEAN_PIXEL
from .policy_augment import TrivialAugmentWide
from .tta import reflect_index

FLIP_MODES = ("none", "random", "alternating")
POLICIES = ("none", "trivial_augment_wide")


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


# --------------------------------------------------------------------------- CutMix


class CutMixResult(NamedTuple):
    images: Tensor  # uint8 (N, C, H, W): each with a box pasted from its partner
    targets: Tensor  # float32 (N, num_classes): lam * own one-hot + (1 - lam) * partner's
    lam: Tensor  # float32 (N,): the share of each image's own pixels (1: not mixed)
    boxes: Tensor  # int64 (N, 4): pasted (y0, x0, y1, x1), end-exclusive; empty if unmixed


def sample_beta(alpha: float, n: int, generator: torch.Generator, device=None) -> Tensor:
    """``n`` draws of Beta(alpha, alpha), float32, as the ratio of two Gamma(alpha)
    draws (torch.distributions takes no generator). Raises ValueError for alpha <= 0."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    concentration = torch.full((2, n), float(alpha), device=device)
    # torch's own Gamma sampler; the private name is the one that accepts a generator.
    x, y = torch._standard_gamma(concentration, generator=generator)
    # Both draws can underflow to 0 for a small alpha: then the pasted box takes all.
    return x / (x + y).clamp(min=torch.finfo(torch.float32).tiny)


def cutmix_boxes(lam: Tensor, height: int, width: int, generator: torch.Generator) -> Tensor:
    """One box per image of about ``(1 - lam) * height * width`` pixels (lam float (N,)
    in [0, 1]): sides ``2 * int(0.5 * sqrt(1 - lam) * size)`` centred on a uniform
    pixel, cut where they leave the image, as in torchvision's CutMix (after Yun et al.
    2019). Returns int64 (N, 4) (y0, x0, y1, x1), end-exclusive."""
    device = lam.device
    half = 0.5 * (1.0 - lam.float()).clamp(min=0).sqrt()
    half_h, half_w = (half * height).long(), (half * width).long()
    cy = torch.randint(0, height, lam.shape, generator=generator, device=device)
    cx = torch.randint(0, width, lam.shape, generator=generator, device=device)
    return torch.stack(
        [
            (cy - half_h).clamp(min=0),
            (cx - half_w).clamp(min=0),
            (cy + half_h).clamp(max=height),
            (cx + half_w).clamp(max=width),
        ],
        dim=1,
    )


def cutmix(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    generator: torch.Generator,
    alpha: float = 1.0,
    p: float = 1.0,
) -> CutMixResult:
    """CutMix (Yun et al. 2019, arXiv 1905.04899) on a uint8 NCHW batch and its int64
    labels (N,), one box per image.

    Each image, with probability ``p``, gets a box (``cutmix_boxes``, lam ~ Beta(alpha,
    alpha)) of the previous image in the batch pasted in (the batch is shuffled
    already; torchvision's CutMix pairs the same way, and no image is paired with
    itself). Its target mixes the two labels by the pixels actually pasted, so a box
    cut at the border counts what is left of it. Per image rather than one box for the
    whole batch (the paper's code): the same cost, and every step mixes about ``p`` of
    its images instead of all or none of them. Raises ValueError for ``p`` outside
    [0, 1] or alpha <= 0.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, _, height, width = images.shape
    device = images.device
    lam = sample_beta(alpha, n, generator, device)
    applied = torch.rand(n, generator=generator, device=device) < p
    boxes = cutmix_boxes(torch.where(applied, lam, 1.0), height, width, generator)
    y0, x0, y1, x1 = boxes[:, :, None].unbind(1)  # each (N, 1)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    inside = ((rows >= y0) & (rows < y1))[:, :, None] & ((cols >= x0) & (cols < x1))[:, None, :]
    mixed = torch.where(inside[:, None], images.roll(1, 0), images)
    pasted = ((y1 - y0) * (x1 - x0)).squeeze(1).float() / (height * width)
    own = 1.0 - pasted
    one_hot = F.one_hot(labels, num_classes).float()
    targets = own[:, None] * one_hot + pasted[:, None] * one_hot.roll(1, 0)
    return CutMixResult(mixed, targets, own, boxes)


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class BatchAugment:
    """Translate, flip, policy, cutout on whole uint8 NCHW batches, on any device;
    CutMix on request (``mix``).

    crop_pad: shift by up to this many px, reflect-101 padded (0 = off).
    flip: "none" | "random" | "alternating" (see ``flip_mask``).
    policy: "none" | "trivial_augment_wide" (``policy_augment.TrivialAugmentWide``:
        one random op of random strength per image), after the flip and before the
        cutout, as in Müller & Hutter's CIFAR set-up.
    cutout: side of the square hole in px (0 = off), fully inside the image,
        applied with probability ``cutout_p`` (the Albumentations ``standard``
        pipeline's default too), filled with ``cutout_fill`` (the CIFAR-10 mean
        pixel, i.e. zero after normalisation).
    cutmix: probability that an image gets a CutMix box (0 = off); see ``cutmix``.
    cutmix_alpha: lam ~ Beta(cutmix_alpha, cutmix_alpha); 1 (the paper's) is uniform.

    Raises ValueError, naming the field, for a value out of range.
    """

    crop_pad: int = 4
    flip: str = "random"
    cutout: int = 0
    cutout_p: float = 0.5
    cutout_fill: tuple[int, ...] = CIFAR10_MEAN_PIXEL
    policy: str = "none"
    cutmix: float = 0.0
    cutmix_alpha: float = 1.0

    def __post_init__(self):
        # Each message starts with the field, so config.py can name the key.
        checks = [
            (self.flip in FLIP_MODES, "flip", f"one of {', '.join(FLIP_MODES)}"),
            (self.policy in POLICIES, "policy", f"one of {', '.join(POLICIES)}"),
            (self.crop_pad >= 0, "crop_pad", ">= 0 (0 = off)"),
            (self.cutout >= 0, "cutout", ">= 0 (0 = off)"),
            (0 <= self.cutout_p <= 1, "cutout_p", "in [0, 1]"),
            (0 <= self.cutmix <= 1, "cutmix", "in [0, 1] (0 = off)"),
            (0 < self.cutmix_alpha < float("inf"), "cutmix_alpha", "> 0 and finite"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        # Hydra hands in lists; a tuple keeps the dataclass hashable.
        object.__setattr__(self, "cutout_fill", tuple(self.cutout_fill))
        # Not a field: it caches per-device constants, and equal settings are equal.
        policy = TrivialAugmentWide() if self.policy == "trivial_augment_wide" else None
        object.__setattr__(self, "_policy", policy)

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
        if self._policy is not None:
            images = self._policy(images, generator)
        if self.cutout:
            images, _, _ = cutout(images, self.cutout, generator, self.cutout_fill, self.cutout_p)
        return images

    def mix(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        """CutMix with probability ``cutmix`` per image, after ``__call__``: (uint8
        NCHW images, float32 (N, num_classes) targets). Every image gets a soft
        target, a one-hot one where it was not mixed."""
        result = cutmix(images, labels, num_classes, generator, self.cutmix_alpha, self.cutmix)
        return result.images, result.targets
