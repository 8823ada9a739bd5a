"""Post-activation ResNets for 32x32 inputs: the seed net, its SE variant, ResNet-18-slim and ResNet-20."""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .layers import conv1x1, conv3x3, init_weights_

ShortcutStyle = Literal["avgpool", "strided"]


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (Hu et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(gate))))
        return x * gate


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-[Dropout2d]-conv3x3-BN-[SE] plus shortcut, then ReLU.

    shortcut="avgpool" downsamples with AvgPool2d before the 1x1 projection, so the projection
    sees every input pixel instead of one in four (the seed's choice); "strided" is the
    standard ResNet projection (1x1 conv with stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dropout: float = 0.0,
        se_reduction: int | None = None,
        shortcut: ShortcutStyle = "strided",
    ):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(torch.relu(self.bn1(self.conv1(x))))
        residual = self.se(self.bn2(self.conv2(residual)))
        return torch.relu(residual + self.shortcut(x))


def _make_shortcut(
    in_channels: int, out_channels: int, stride: int, style: ShortcutStyle
) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if style == "avgpool":
        pool = [nn.AvgPool2d(stride)] if stride > 1 else []
        return nn.Sequential(
            *pool, conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels)
        )
    if style == "strided":
        return nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    raise ValueError(f"unknown shortcut style {style!r}; expected 'avgpool' or 'strided'")


class ResNet(nn.Module):
    """Stem of 3x3 conv-BN-ReLU layers, BasicBlock stages, global-average-pool head. Returns logits.

    The first block of every stage after the first halves the resolution. There is no
    stem downsampling because CIFAR images are only 32x32.
    """

    def __init__(
        self,
        stage_depths: Sequence[int],
        widths: Sequence[int],
        stem_widths: Sequence[int],
        num_classes: int = 10,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        se_reduction: int | None = None,
        shortcut: ShortcutStyle = "strided",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(stage_depths) != len(widths):
            raise ValueError(f"{len(stage_depths)} stage depths but {len(widths)} widths")

        stem: list[nn.Module] = []
        channels = 3
        for width in stem_widths:
            stem += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.stem = nn.Sequential(*stem)

        stages = []
        for stage_index, (depth, width) in enumerate(zip(stage_depths, widths)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, dropout, se_reduction, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(head_dropout),
            nn.Linear(channels, num_classes),
        )

        init_weights_(self)
        if zero_init_residual:
            # Each block starts as (ReLU of) its shortcut, which eases early training of deep stacks.
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def seed_resnet(
    num_classes: int = 10,
    dropout: float = 0.2,
    head_dropout: float = 0.2,
    zero_init_residual: bool = False,
) -> ResNet:
    """The seed network: 3-conv stem, [8, 6, 4, 3] blocks at 32-256 channels, 4,994,986 parameters."""
    return ResNet(
        stage_depths=(8, 6, 4, 3),
        widths=(32, 64, 128, 256),
        stem_widths=(32, 32, 32),
        num_classes=num_classes,
        dropout=dropout,
        head_dropout=head_dropout,
        shortcut="avgpool",
        zero_init_residual=zero_init_residual,
    )


def se_resnet(
    num_classes: int = 10,
    dropout: float = 0.2,
    head_dropout: float = 0.2,
    se_reduction: int = 16,
    zero_init_residual: bool = False,
) -> ResNet:
    """The seed family with squeeze-and-excitation; one block fewer in the last stage keeps it under 5M."""
    return ResNet(
        stage_depths=(8, 6, 4, 2),
        widths=(32, 64, 128, 256),
        stem_widths=(32, 32, 32),
        num_classes=num_classes,
        dropout=dropout,
        head_dropout=head_dropout,
        se_reduction=se_reduction,
        shortcut="avgpool",
        zero_init_residual=zero_init_residual,
    )


def resnet18_slim(
    num_classes: int = 10,
    dropout: float = 0.0,
    head_dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 layout with a CIFAR stem (one 3x3 conv, no max-pool) at half the usual widths."""
    return ResNet(
        stage_depths=(2, 2, 2, 2),
        widths=(32, 64, 128, 256),
        stem_widths=(32,),
        num_classes=num_classes,
        dropout=dropout,
        head_dropout=head_dropout,
        shortcut="strided",
        zero_init_residual=zero_init_residual,
    )


def resnet_small(
    num_classes: int = 10,
    dropout: float = 0.0,
    head_dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-20 (He et al., 2016, CIFAR variant) with projection shortcuts; for tests and quick runs."""
    return ResNet(
        stage_depths=(3, 3, 3),
        widths=(16, 32, 64),
        stem_widths=(16,),
        num_classes=num_classes,
        dropout=dropout,
        head_dropout=head_dropout,
        shortcut="strided",
        zero_init_residual=zero_init_residual,
    )
