"""A narrow residual net with a whitening stem, built for accuracy per FLOP.

The layout follows Keller Jordan's airbench94 (2024), itself from hlb-CIFAR10, with
one change that makes it a ResNet: the second conv of each stage is a residual
branch (x + conv(x)) instead of a plain layer; the extra add costs nothing.

- stem: a frozen 2x2 conv whose filters whiten the input's 2x2 patches (the
  eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), and their
  negatives, so a GELU after it keeps both signs). It is fitted to training images
  before training (``init_from_images``). Until then its filters are a fixed
  orthonormal basis of patch space, the whitening of white noise: every channel
  varies, which BatchNorm downstream needs (a constant channel divides its
  gradient by sqrt(eps) and blows training up).
- three stages: conv3x3 -> max-pool 2 -> BN -> GELU, then a residual conv3x3 -> BN
  -> GELU. Pooling right after the first conv runs everything else at a quarter of
  the pixels: 0.24 GFLOPs per image at the default widths, 0.37x ResNet-9's.
- BatchNorm with a fixed scale of 1 (only the shift trains): the next conv's
  weights carry the scale anyway, and a high learning rate on the shifts (see
  optim.bias_lr_scale) speeds up training.
- Each 3x3 conv starts as a partial identity (dirac on its first in_channels
  filters), so early training sees the stem's features passed through.
- head: global max-pool, a bias-free linear layer, logits scaled by 1/9 so the
  softmax starts nearly uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    # Identity on the first in_channels filters; the rest keep PyTorch's default init.
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


def _batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


class WhitenedStage(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU, then x + GELU(BN(conv3x3(x)))."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        super().__init__()
        self.entry = nn.Sequential(
            _conv3x3(in_channels, out_channels),
            nn.MaxPool2d(2),
            _batch_norm(out_channels, bn_momentum),
            nn.GELU(),
        )
        self.residual = nn.Sequential(
            _conv3x3(out_channels, out_channels), _batch_norm(out_channels, bn_momentum), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return x + self.residual(x)


class WhitenedResNet(nn.Module):
    """Whitening stem, three residual stages, max-pool head. Takes normalised images, returns logits."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 10,
        patch_size: int = 2,
        bn_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
    ):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"WhitenedResNet needs 3 stage widths, got {tuple(widths)}")
        self.patch_size = patch_size
        stem_width = 2 * 3 * patch_size**2
        self.stem = nn.Conv2d(3, stem_width, patch_size, bias=True)
        self.stem.weight.requires_grad_(False)  # fitted to data, then fixed
        with torch.no_grad():
            # A private generator: the global random stream (hence every other layer's
            # init for a given seed) is the same as if the stem took none.
            noise = torch.randn(
                stem_width // 2, stem_width // 2, generator=torch.Generator().manual_seed(0)
            )
            basis = torch.linalg.qr(noise).Q
            self._set_stem_filters(basis.T.reshape(-1, 3, patch_size, patch_size))
            self.stem.bias.zero_()
        stages, in_channels = [], stem_width
        for width in widths:
            stages.append(WhitenedStage(in_channels, width, bn_momentum))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes, bias=False)
        )
        self.act = nn.GELU()
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Fit the stem to normalised float NCHW images (a few thousand are plenty)."""
        k = self.patch_size
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).float()
        self._set_stem_filters(filters.reshape(-1, 3, k, k).flip(0))  # strongest direction first

    @torch.no_grad()
    def _set_stem_filters(self, filters: torch.Tensor) -> None:
        weight = self.stem.weight
        weight.copy_(torch.cat([filters, -filters]).to(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.act(self.stem(x)))
        return self.head(x) * self.logit_scale


def whitened_resnet(num_classes: int = 10, **kwargs) -> WhitenedResNet:
    return WhitenedResNet(num_classes=num_classes, **kwargs)
