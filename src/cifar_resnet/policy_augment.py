"""TrivialAugmentWide on whole uint8 NCHW batches, each image with its own op and strength.

TrivialAugment (Müller & Hutter 2021, arXiv 2103.10158) gives every image one op drawn
uniformly from a fixed set, at a magnitude bin drawn uniformly too, and nothing to tune.
torchvision's ``TrivialAugmentWide`` draws once per call and its functional ops take one
magnitude for a whole batch, so drawing per image through it means a Python loop over
the images; that is why this batched version with per-image magnitudes is ours. The op
set, the 31 magnitude bins, their ranges and sign flips are torchvision's (0.29,
``transforms/v2/_auto_augment.py``), and each op reproduces
``torchvision.transforms.v2.functional`` on uint8 tensors bit for bit
(tests/test_policy_augment.py checks every op, bin and sign on the CPU, and that CUDA
gives the CPU's result where there is CUDA):

- the geometric ops (shears, translations, rotation; nearest sampling, fill 0) become
  one gather per image from a source-pixel map, computed once per image size on the
  CPU with torchvision's own affine-grid arithmetic, so no device's matmul precision
  (TF32) can move a pixel, and no float copy of the images is needed;
- the colour blends (Brightness, Color, Contrast, Sharpness) take per-image factors
  in torchvision's float32 order of operations; Posterize and Solarize per-image masks
  and thresholds;
- AutoContrast and Equalize take no magnitude, and torchvision's kernels for them are
  already batched (per image and channel), so they are called as they are.

Each op runs once, on the images that drew it: the batch is sorted by op, which costs
one read of the per-op counts on the host per batch (on CUDA it waits for the queued
work).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# In torchvision's order, which is also the order of the magnitude table's rows.
TRIVIAL_AUGMENT_WIDE_OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
NUM_MAGNITUDE_BINS = 31
_OP = {name: index for index, name in enumerate(TRIVIAL_AUGMENT_WIDE_OPS)}
# Contiguous in the op order, so the images that drew any of them form one slice.
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_FIRST_GEOMETRIC = _OP[_GEOMETRIC[0]]


def magnitude_table(num_bins: int = NUM_MAGNITUDE_BINS) -> tuple[Tensor, Tensor]:
    """torchvision's TrivialAugmentWide magnitude space, on the CPU.

    Returns (magnitudes float32 (num_ops, num_bins), signed bool (num_ops,)), rows in
    ``TRIVIAL_AUGMENT_WIDE_OPS`` order. Units: shear as the tangent of the angle,
    translation in pixels, rotation in degrees, colour ops as the factor's offset from
    1, Posterize in bits kept, Solarize as the threshold's fraction of 255. A signed op
    is negated with probability 1/2. Ops without a magnitude hold zeros. Raises
    ValueError for fewer than 2 bins.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    zeros = torch.zeros(num_bins)
    unit = torch.linspace(0.0, 0.99, num_bins)
    space = {
        "Identity": (zeros, False),
        "ShearX": (unit, True),
        "ShearY": (unit, True),
        "TranslateX": (torch.linspace(0.0, 32.0, num_bins), True),
        "TranslateY": (torch.linspace(0.0, 32.0, num_bins), True),
        "Rotate": (torch.linspace(0.0, 135.0, num_bins), True),
        "Brightness": (unit, True),
        "Color": (unit, True),
        "Contrast": (unit, True),
        "Sharpness": (unit, True),
        "Posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 6))).round().int(), False),
        "Solarize": (torch.linspace(1.0, 0.0, num_bins), False),
        "AutoContrast": (zeros, False),
        "Equalize": (zeros, False),
    }
    magnitudes = torch.stack([space[name][0].float() for name in TRIVIAL_AUGMENT_WIDE_OPS])
    signed = torch.tensor([space[name][1] for name in TRIVIAL_AUGMENT_WIDE_OPS])
    return magnitudes, signed


class PolicyDraw(NamedTuple):
    """One TrivialAugmentWide draw per image of a batch."""

    ops: Tensor  # int64 (N,): index into TRIVIAL_AUGMENT_WIDE_OPS
    bins: Tensor  # int64 (N,): magnitude bin in [0, num_bins)
    negate: Tensor  # bool (N,): flip the magnitude's sign (signed ops only)


class TrivialAugmentWide:
    """TrivialAugmentWide (Müller & Hutter 2021) for uint8 (N, 3, H, W) batches on any device.

    ``policy(images, generator)`` draws one op and magnitude bin per image from
    ``generator`` (which must live on the images' device; no global random state is
    used) and applies them; ``sample`` and ``apply`` are the two halves. Geometric ops
    fill what comes from outside the image with 0, as torchvision does by default.

    Holds, per image size and device, the geometric ops' source-pixel maps (int64,
    ``5 * num_bins * 2 * H * W`` of them: 2.5 MB for 32 x 32 images), built on first use.
    """

    def __init__(self, num_magnitude_bins: int = NUM_MAGNITUDE_BINS):
        self.num_bins = num_magnitude_bins
        self._magnitudes, self._signed = magnitude_table(num_magnitude_bins)
        self._cache: dict[tuple, object] = {}  # constants, per device (and image size)

    def __repr__(self) -> str:
        return f"TrivialAugmentWide(num_magnitude_bins={self.num_bins})"

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.sample(len(images), generator, images.device))

    def sample(self, n: int, generator: torch.Generator, device=None) -> PolicyDraw:
        """``n`` draws: op and bin uniform, sign a fair coin, all from ``generator``."""
        device = torch.device(device) if device is not None else generator.device
        ops = torch.randint(len(TRIVIAL_AUGMENT_WIDE_OPS), (n,), generator=generator, device=device)
        bins = torch.randint(self.num_bins, (n,), generator=generator, device=device)
        negate = torch.randint(2, (n,), generator=generator, device=device).bool()
        return PolicyDraw(ops, bins, negate)

    def magnitudes(self, draw: PolicyDraw) -> Tensor:
        """Each image's signed magnitude, float32 (N,), in the units of ``magnitude_table``."""
        table, signed = self._table(draw.ops.device)
        value = table[draw.ops, draw.bins]
        return torch.where(signed[draw.ops] & draw.negate, -value, value)

    def apply(self, images: Tensor, draw: PolicyDraw) -> Tensor:
        """Apply each image's drawn op to uint8 (N, 3, H, W) ``images``; returns a new
        uint8 batch of the same shape, device and memory format. Raises ValueError for
        another dtype or channel count."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) == 0:
            return images.clone()
        # Sorted by op, the images that drew an op are one slice; the counts, read once,
        # say where each slice starts.
        order = torch.argsort(draw.ops, stable=True)
        counts = torch.bincount(draw.ops, minlength=len(TRIVIAL_AUGMENT_WIDE_OPS)).tolist()
        ends = list(itertools.accumulate(counts))
        x = images[order]
        sorted_draw = PolicyDraw(*(values[order] for values in draw))
        magnitudes = self.magnitudes(sorted_draw)

        def group(first: str, last: str) -> slice:
            return slice(ends[_OP[first]] - counts[_OP[first]], ends[_OP[last]])

        pieces = [x[group("Identity", "Identity")]]
        geometric = group(_GEOMETRIC[0], _GEOMETRIC[-1])
        pieces.append(self._warp(x[geometric], *(values[geometric] for values in sorted_draw)))
        for name, op in _PIXEL_OPS.items():
            chosen = group(name, name)
            pieces.append(op(x[chosen], magnitudes[chosen]))
        out = torch.empty_like(images)
        out[order] = torch.cat(pieces)
        return out

    # ----------------------------------------------------------------------- internals

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = ("table", str(device))
        if key not in self._cache:
            self._cache[key] = (self._magnitudes.to(device), self._signed.to(device))
        return self._cache[key]

    def _source_maps(self, height: int, width: int, device: torch.device) -> Tensor:
        key = ("maps", height, width, str(device))
        if key not in self._cache:
            self._cache[key] = _geometric_source_maps(height, width, self._magnitudes).to(device)
        return self._cache[key]

    def _warp(self, x: Tensor, ops: Tensor, bins: Tensor, negate: Tensor) -> Tensor:
        """The geometric ops: out pixel p of image i is x[i] at maps[op, bin, sign][p],
        or 0 where the map says -1 (outside the source)."""
        if len(x) == 0:
            return x
        k, channels, height, width = x.shape
        maps = self._source_maps(height, width, x.device)
        source = maps[ops - _FIRST_GEOMETRIC, bins, negate.long()]  # (k, H*W)
        pixels = x.permute(0, 2, 3, 1).reshape(k, height * width, channels)
        gathered = pixels.gather(1, source.clamp(min=0)[:, :, None].expand(-1, -1, channels))
        gathered = gathered.masked_fill(source[:, :, None] < 0, 0)
        return gathered.view(k, height, width, channels).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- geometry
# The maps replay torchvision.transforms.v2.functional's affine_image / rotate_image
# (nearest, fill None) on an image of pixel numbers: what lands at each output pixel is
# the number of the source pixel that torchvision would copy there.


def _inverse_affine_matrix(
    center: list[float], angle: float, translate: list[float], shear: list[float]
) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` at scale 1 (angles in degrees): the
    output-to-input map, about ``center`` given relative to the image centre."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += cx - matrix[0] * (cx + tx) - matrix[1] * (cy + ty)
    matrix[5] += cy - matrix[3] * (cx + tx) - matrix[4] * (cy + ty)
    return matrix


def _affine_grid(matrix: list[float], height: int, width: int) -> Tensor:
    """torchvision's ``_affine_grid`` (float32, same operation order): (1, H, W, 2)."""
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    base = torch.empty(1, height, width, 3)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width))
    base[..., 1].copy_(
        torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height]))
    return base.view(1, height * width, 3).bmm(rescaled).view(1, height, width, 2)


def _warp_numbers(numbers: Tensor, name: str, magnitude: float) -> Tensor:
    """torchvision v2's op ``name`` at ``magnitude`` on a (1, 1, H, W) float image."""
    height, width = numbers.shape[-2:]
    if name == "Rotate":
        angle = magnitude % 360  # rotate_image's own fast paths, then the grid
        if angle == 0:
            return numbers
        if angle == 180:
            return torch.rot90(numbers, 2, dims=(-2, -1))
        if height == width and angle in (90, 270):
            return torch.rot90(numbers, 1 if angle == 90 else 3, dims=(-2, -1))
        matrix = _inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], [0.0, 0.0])
    elif name in ("ShearX", "ShearY"):
        # TrivialAugment shears about the top-left corner (center=[0, 0] in pixels).
        shear = math.degrees(math.atan(magnitude))
        corner = [-0.5 * width, -0.5 * height]
        shears = [shear, 0.0] if name == "ShearX" else [0.0, shear]
        matrix = _inverse_affine_matrix(corner, 0.0, [0.0, 0.0], shears)
    else:  # TranslateX / TranslateY: whole pixels, truncated toward zero
        shift = [float(int(magnitude)), 0.0]
        matrix = _inverse_affine_matrix(
            [0.0, 0.0], 0.0, shift if name == "TranslateX" else shift[::-1], [0.0, 0.0]
        )
    grid = _affine_grid(matrix, height, width)
    return F.grid_sample(numbers, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _geometric_source_maps(height: int, width: int, magnitudes: Tensor) -> Tensor:
    """int64 (5, num_bins, 2, H*W): for each geometric op (``_GEOMETRIC`` order), bin and
    sign (0: as is, 1: negated), the flat source index of each output pixel, -1 for fill."""
    numbers = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    maps = []
    for name in _GEOMETRIC:
        for magnitude in magnitudes[_OP[name]].tolist():
            for sign in (1.0, -1.0):
                warped = _warp_numbers(numbers, name, magnitude * sign)
                maps.append(warped.round().long().reshape(-1) - 1)
    return torch.stack(maps).view(len(_GEOMETRIC), magnitudes.shape[1], 2, height * width)


# --------------------------------------------------------------------------- pixel values
# Every op but the geometric ones changes values and leaves positions alone. For the blends,
# torchvision v2 computes each blend as float32 ``a * ratio + b * (1 - ratio)`` with
# ``(1 - ratio)`` taken in float64 from ``ratio = 1 + magnitude``: exactly -magnitude.
# ``torch.addcmul`` rounds the second product and the sum as its ``add_(b, alpha=...)``
# does, so the per-image factors give the same uint8 values.


def _per_image(values: Tensor) -> Tensor:
    return values[:, None, None, None]


def _to_uint8(x: Tensor) -> Tensor:
    return x.clamp_(0, 255).to(torch.uint8)


def _grayscale(x: Tensor) -> Tensor:
    """float32 (k, 1, H, W) luma, floored, as torchvision's colour ops take it."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: Tensor, other: Tensor, magnitude: Tensor) -> Tensor:
    ratio = _per_image(1.0 + magnitude)
    return _to_uint8(torch.addcmul(x.float().mul(ratio), other, _per_image(-magnitude)))


def _brightness(x: Tensor, magnitude: Tensor) -> Tensor:
    return _to_uint8(x.float().mul(_per_image(1.0 + magnitude)))


def _color(x: Tensor, magnitude: Tensor) -> Tensor:
    return _blend(x, _grayscale(x), magnitude)


def _contrast(x: Tensor, magnitude: Tensor) -> Tensor:
    # A mean of whole numbers below 2**24 in total: exact in any summation order.
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), magnitude)


def _sharpness(x: Tensor, magnitude: Tensor) -> Tensor:
    """Blend with a 3x3 smoothing (1s round a 5, over 13) of the interior; the
    one-pixel border stays as it is."""
    channels, height, width = x.shape[1:]
    if height <= 2 or width <= 2:
        return x.clone()
    # torchvision convolves with weights 1/13 and 5/13 and rounds. Whole weights give the
    # exact sum k (below 2**24, so also under TF32 convolutions on CUDA), and k / 13 is
    # never within 1/26 of a half, so rounding it lands where torchvision's does.
    kernel = torch.ones(channels, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    out = x.float()
    blurred = F.conv2d(out, kernel, groups=channels).div_(13.0).round_()
    interior = out[..., 1:-1, 1:-1]
    interior.copy_(torch.addcmul(interior, blurred.sub_(interior), _per_image(-magnitude)))
    return _to_uint8(out)


def _posterize(x: Tensor, magnitude: Tensor) -> Tensor:
    """Keep the top ``magnitude`` bits (whole numbers 0-8) of each value."""
    bits = magnitude.long()
    mask = (255 << (8 - bits)) & 255
    return x & _per_image(mask.to(torch.uint8))


def _solarize(x: Tensor, magnitude: Tensor) -> Tensor:
    """Invert every value at or above ``255 * magnitude``."""
    threshold = _per_image(255.0 * magnitude)
    return torch.where(x.float() >= threshold, 255 - x, x)


def _autocontrast(x: Tensor, magnitude: Tensor) -> Tensor:
    # torchvision.transforms takes over a second to import: only when the policy runs.
    from torchvision.transforms.v2 import functional as TF

    return TF.autocontrast(x)


def _equalize(x: Tensor, magnitude: Tensor) -> Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(x)


_PIXEL_OPS = {
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
