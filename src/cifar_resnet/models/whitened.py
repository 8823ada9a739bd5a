"""The whitening-stem family, built for accuracy per FLOP: airbench94's plain net, a
residual version of it, and airbench96's three-conv residual stages at under 5M
parameters.

Source: Keller Jordan's airbench94 (2024; github.com/KellerJordan/cifar10-airbench,
``airbench94.py``: 94.01% mean over 1,000 runs with its TTA, 9.9 epochs), itself from
hlb-CIFAR10. ``airbench_net`` is that network as published; ``whitened_resnet`` makes
the second conv of each stage a residual branch (x + conv(x)), keeps PyTorch's BN eps
and pools the whole last map. ``airbench96_net`` is airbench96 (same repository,
``airbench96.py``: 96.01% mean over 400 runs with its TTA, 31 epochs) at narrower
widths. The differences are constructor arguments, so an ablation moves one at a time
(conf/model/*.yaml kwargs).

- stem: a frozen 2x2 conv whose filters whiten the input's 2x2 patches (the
  eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), and their
  negatives, so a GELU after it keeps both signs). It is fitted to training images
  before training (``init_from_images``). Until then its filters are a fixed
  orthonormal basis of patch space, the whitening of white noise: every channel
  varies, which BatchNorm downstream needs (a constant channel divides its
  gradient by sqrt(eps) and blows training up). Its bias trains for the first
  ``stem_bias_epochs`` epochs, then freezes (``set_epoch``); airbench freezes it
  after 3.
- three stages: conv3x3 -> max-pool 2 -> BN -> GELU, then conv3x3 -> BN -> GELU,
  plain (airbench) or as a residual branch. Pooling right after the first conv runs
  everything else at a quarter of the pixels: 0.24 GFLOPs per image at the default
  widths, 0.37x ResNet-9's. airbench96 makes the branch two convs deep, conv3x3 ->
  BN -> GELU -> conv3x3 -> BN, adds the entry and applies the GELU after the sum.
- BatchNorm with a fixed scale of 1 (only the shift trains): the next conv's
  weights carry the scale anyway, and a high learning rate on the shifts (see
  optim.norm_lr_scale) speeds up training.
- Each 3x3 conv starts as a partial identity (dirac on its first in_channels
  filters), so early training sees the stem's features passed through.
- head: max-pool over the last map, a bias-free linear layer, logits scaled by 1/9 so
  the softmax starts nearly uniform. On 32x32 images the unpadded 2x2 stem leaves 31x31
  and the stages 15, 7 and then 3x3, so airbench's 3x3 window and a whole-map pool
  (``head_pool=0``) are the same network.
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


def _batch_norm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


class WhitenedStage(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU (the entry), then ``branch_convs`` blocks of
    GELU(BN(conv3x3)) (the branch), whose output is added to the entry's when
    ``residual``. NCHW in, NCHW out at half the height and width.

    ``act_after_sum`` moves the branch's last GELU after the sum, so a residual stage
    returns GELU(entry + BN(conv(...))) rather than entry + GELU(BN(conv(...))): the
    placement airbench96 moved to in its 2024-06-13 update. A plain stage computes the
    same either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bn_momentum: float,
        bn_eps: float,
        residual: bool,
        branch_convs: int = 1,
        act_after_sum: bool = False,
    ):
        super().__init__()
        self.entry = nn.Sequential(
            _conv3x3(in_channels, out_channels),
            nn.MaxPool2d(2),
            _batch_norm(out_channels, bn_momentum, bn_eps),
            nn.GELU(),
        )
        branch: list[nn.Module] = []
        for _ in range(branch_convs):
            branch += [
                _conv3x3(out_channels, out_channels),
                _batch_norm(out_channels, bn_momentum, bn_eps),
                nn.GELU(),
            ]
        # The attribute keeps its old name (and the branch its layout when the last GELU
        # stays inside), so earlier checkpoints' state dicts still load.
        self.residual = nn.Sequential(*(branch[:-1] if act_after_sum else branch))
        self.act = nn.GELU() if act_after_sum else nn.Identity()
        self.is_residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        branch = self.residual(x)
        return self.act(x + branch if self.is_residual else branch)


class WhitenedNet(nn.Module):
    """Whitening stem, three stages, max-pool head. Takes normalised float NCHW images
    (N, 3, 32, 32), returns (N, num_classes) logits.

    ``bn_momentum`` is PyTorch's (airbench's 0.6 is 1 - 0.4); ``head_pool`` is the
    max-pool window over the last map (3x3 on 32x32 images), 0 for all of it; ``stem_bias_epochs`` is how
    many epochs the stem's bias trains (None: all of them); ``convs_per_stage`` counts
    the entry conv too (airbench94: 2, airbench96: 3); ``act_after_sum``: see
    ``WhitenedStage``.

    Raises ValueError for other than 3 widths, a negative ``stem_bias_epochs`` or fewer
    than 2 ``convs_per_stage``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        residual: bool,
        bn_eps: float,
        bn_momentum: float,
        head_pool: int,
        stem_bias_epochs: int | None,
        num_classes: int = 10,
        patch_size: int = 2,
        logit_scale: float = 1 / 9,
        convs_per_stage: int = 2,
        act_after_sum: bool = False,
    ):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"a whitened net needs 3 stage widths, got {tuple(widths)}")
        if stem_bias_epochs is not None and stem_bias_epochs < 0:
            raise ValueError(f"stem_bias_epochs must be >= 0 or None, got {stem_bias_epochs}")
        if convs_per_stage < 2:
            # One conv would leave the branch empty: a residual stage would just double its entry.
            raise ValueError(f"convs_per_stage must be >= 2, got {convs_per_stage}")
        self.patch_size = patch_size
        self.stem_bias_epochs = stem_bias_epochs
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
            stages.append(
                WhitenedStage(
                    in_channels,
                    width,
                    bn_momentum,
                    bn_eps,
                    residual,
                    branch_convs=convs_per_stage - 1,
                    act_after_sum=act_after_sum,
                )
            )
            in_channels = width
        self.stages = nn.Sequential(*stages)
        pool = nn.MaxPool2d(head_pool) if head_pool else nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(
            pool, nn.Flatten(), nn.Linear(in_channels, num_classes, bias=False)
        )
        self.act = nn.GELU()
        self.logit_scale = logit_scale

    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based): the stem's bias trains in epochs
        1..stem_bias_epochs and is frozen after (airbench94's ``whiten_bias_epochs``).
        A frozen bias gets no gradient, so the optimiser leaves it as it is."""
        if self.stem_bias_epochs is not None:
            self.stem.bias.requires_grad_(epoch <= self.stem_bias_epochs)

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


# airbench94's network as published: plain stages at widths 64/256/256, BN eps 1e-12 and
# momentum 0.4 (airbench's 0.6), a 3x3 max-pool head, the stem's bias frozen after 3 epochs.
AIRBENCH94 = dict(
    widths=(64, 256, 256),
    residual=False,
    bn_eps=1e-12,
    bn_momentum=0.4,
    head_pool=3,
    stem_bias_epochs=3,
)
# What whitened_resnet changes of it: residual stages, PyTorch's BN eps, a global max-pool
# head and a stem bias that trains throughout.
RESIDUAL_CHANGES = dict(residual=True, bn_eps=1e-5, head_pool=0, stem_bias_epochs=None)


def airbench_net(num_classes: int = 10, **kwargs) -> WhitenedNet:
    """airbench94's network (``AIRBENCH94``); ``kwargs`` override any of its arguments
    (ablations)."""
    return WhitenedNet(num_classes=num_classes, **{**AIRBENCH94, **kwargs})


def whitened_resnet(num_classes: int = 10, **kwargs) -> WhitenedNet:
    """airbench94's network with ``RESIDUAL_CHANGES``; ``kwargs`` override any argument."""
    return airbench_net(num_classes, **{**RESIDUAL_CHANGES, **kwargs})


# airbench96's network as last published (airbench96.py after its 2024-06-13 update):
# three convs per stage, the last two a residual branch over the first's output with the
# GELU after the sum, PyTorch's default BN momentum (the update dropped airbench's 0.6),
# the rest (BN eps 1e-12, the 3x3 head pool, the stem bias's 3 epochs) as airbench94.
#
# Widths: airbench96's 128/512/512 come to 12,717,464 trainable parameters here. Its first
# stage sees the most pixels yet holds only 322,944 parameters at 128, so it keeps that
# width and the later stages are narrowed. In multiples of 32, 128/256/352 is the widest
# that leaves a few percent under the 5M budget: 4,844,152. The next candidates,
# 128/256/360 (4,965,216) and 128/288/352 (5,295,832), leave 0.7% or go over;
# 128/288/320 (4,825,400) is smaller.
AIRBENCH96 = dict(
    AIRBENCH94,
    widths=(128, 256, 352),
    residual=True,
    bn_momentum=0.1,
    convs_per_stage=3,
    act_after_sum=True,
)


def airbench96_net(num_classes: int = 10, **kwargs) -> WhitenedNet:
    """airbench96's network (``AIRBENCH96``; Jordan, airbench96, 2024) narrowed to
    4,844,152 trainable parameters; ``kwargs`` override any argument (e.g.
    ``widths=(128, 512, 512)`` for the published size, ``act_after_sum=False,
    bn_momentum=0.4`` for the stage as first published, GELU before the sum).

    Takes normalised float NCHW images (N, 3, 32, 32), returns (N, num_classes) logits
    in the input's dtype. Like every ``WhitenedNet`` it raises ValueError for other
    than 3 widths. Fit the stem with ``init_from_images`` before training.

    Left out of airbench96: its widths (above), and everything that is not the network:
    half-precision weights with float BN, channels_last (the trainer's precision and
    memory format), and its recipe (31 epochs, batch 1024, SGD at lr 9 and wd 0.012 per
    1024 examples, BN shifts at 64x the rate, label smoothing 0.2, flip, translate 4,
    cutout 12, the Lookahead/EMA, TTA), which no conf/recipe sets for this net yet.
    """
    return WhitenedNet(num_classes=num_classes, **{**AIRBENCH96, **kwargs})
