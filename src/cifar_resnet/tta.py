"""Test-time augmentation: the view sets, by name, in one place.

eval_tta, training's end-of-run figure (``pipeline.test_chosen_checkpoint``) and the
served model (``serving``) all take their views from here, so a metric named
``test_acc_tta_<set>`` and a served ``tta=<set>`` average the softmax over the same
views. The metric carries the set's name because different sets are different
measurements: ``flip`` and ``flip_shift`` must never be compared as one number.

This module imports only torch: the logged pyfunc carries the package and must load
with torch, numpy, Pillow and OpenCV alone.

A view maps an NCHW batch of intensities (uint8, or float in the same 0..255 range;
not normalised, the model normalises) to a batch of the same shape and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

TTA_VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),  # alias of "identity", the config default
    "identity": ("identity",),
    "flip": ("identity", "hflip"),
    # {as is, flipped} x {unshifted, content moved 1 px down-right, 1 px up-left}
    "flip_shift": ("identity", "shift_dr", "shift_ul", "hflip", "hflip_shift_dr", "hflip_shift_ul"),
    "seed": ("identity", "hflip", "blur", "brighter", "more_contrast"),
}

View = Callable[[Tensor], Tensor]


def reflect_index(positions: Tensor, size: int) -> Tensor:
    """Map integer positions (any shape, int64) outside [0, size) back inside by
    reflect-101 (cv2.BORDER_REFLECT_101, np.pad "reflect"): -1 -> 1, size -> size - 2.
    Returns a tensor of the same shape and dtype."""
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    wrapped = positions.remainder(period)
    return torch.where(wrapped >= size, period - wrapped, wrapped)


def shift(images: Tensor, dy: int, dx: int) -> Tensor:
    """Shift every image of an NCHW batch by the same (dy, dx), reflect-101 at the
    borders: ``out[n, :, y, x] = reflect101(images[n])[:, y + dy, x + dx]``, so
    dy = dx = -1 moves the content one pixel down and right. Any dtype and device;
    returns the same shape and dtype (channels_last strides)."""
    _, _, height, width = images.shape
    device = images.device
    rows = reflect_index(torch.arange(height, device=device) + dy, height)
    cols = reflect_index(torch.arange(width, device=device) + dx, width)
    # Gathering on the NHWC view moves whole pixels and leaves channels_last memory,
    # the layout the models run in.
    return images.permute(0, 2, 3, 1)[:, rows[:, None], cols[None, :]].permute(0, 3, 1, 2)


def _identity(x: Tensor) -> Tensor:
    return x


def _hflip(x: Tensor) -> Tensor:
    return x.flip(3)


def _as_pixels(x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
    """Run ``compute`` in float; integer images come back rounded, clipped and in
    their dtype, float images unclipped (their range is the caller's)."""
    if x.is_floating_point():
        return compute(x)
    return compute(x.float()).round().clamp(0, 255).to(x.dtype)


def _gaussian_kernel3(sigma: float) -> Tensor:
    taps = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0]) ** 2) / (2 * sigma**2))
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


_VIEW_FUNCTIONS: dict[str, View] = {
    "identity": _identity,
    "hflip": _hflip,
    "shift_dr": functools.partial(shift, dy=-1, dx=-1),
    "shift_ul": functools.partial(shift, dy=1, dx=1),
    "hflip_shift_dr": lambda x: shift(_hflip(x), -1, -1),
    "hflip_shift_ul": lambda x: shift(_hflip(x), 1, 1),
    "blur": _blur,  # 3x3 Gaussian, sigma 0.8, reflect-101 borders
    "brighter": _brighter,  # x * 1.1
    "more_contrast": _more_contrast,  # per-image mean + 1.1 * (x - mean)
}


def tta_views(name: str) -> list[View]:
    """The views of the set ``name`` (a key of ``TTA_VIEWS``), in its order: functions
    from an NCHW batch (uint8, or float intensities 0..255) to a batch of the same
    shape and dtype. Raises ValueError naming the known sets for any other name."""
    if name not in TTA_VIEWS:
        raise ValueError(f"unknown TTA view set {name!r}; choose from {', '.join(TTA_VIEWS)}")
    return [_VIEW_FUNCTIONS[view] for view in TTA_VIEWS[name]]


def metric_name(name: str, metric: str = "test_acc") -> str:
    """The name a metric measured with the view set ``name`` is logged and tagged under:
    ``test_acc_tta_flip``, ``test_loss_tta_flip_shift``, ...; ``metric=""`` gives the
    suffix alone (``_tta_flip``). Raises ValueError for an unknown set, as ``tta_views``
    does."""
    tta_views(name)
    return f"{metric}_tta_{name}"
