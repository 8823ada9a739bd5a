"""Pre-activation Wide ResNet (Zagoruyko & Komodakis, 2016)."""

import torch
from torch import nn

from .layers import conv1x1, conv3x3, init_weights_


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[Dropout]-conv3x3, added to the (projected) input; no ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preactivated = torch.relu(self.bn1(x))
        # As in the WRN reference code, a projection reads the pre-activated input, an identity the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(preactivated)
        residual = self.conv1(preactivated)
        residual = self.conv2(self.dropout(torch.relu(self.bn2(residual))))
        return residual + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k: conv stem, three stages of (depth - 4) / 6 blocks at 16k/32k/64k channels. Returns logits."""

    def __init__(
        self, depth: int = 16, widen_factor: int = 4, dropout: float = 0.0, num_classes: int = 10
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.stem = conv3x3(3, 16)
        stages = []
        channels = 16
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(PreActBlock(channels, width, stride, dropout))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks end on a conv, so the last BN-ReLU lives in the head.
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def wide_resnet(
    num_classes: int = 10, depth: int = 16, widen_factor: int = 4, dropout: float = 0.0
) -> WideResNet:
    """WRN-16-4 by default (about 2.75M parameters)."""
    return WideResNet(
        depth=depth, widen_factor=widen_factor, dropout=dropout, num_classes=num_classes
    )
