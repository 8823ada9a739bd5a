"""ResNet-9 in the style of the DAWNBench / airbench fast-training nets (Page, 2018; Jordan, 2024)."""

from collections.abc import Sequence

import torch
from torch import nn

from .layers import conv3x3, init_weights_

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class ConvBNAct(nn.Sequential):
    """conv3x3, optional 2x2 max-pool, BN, activation.

    Pooling before BN (as in the DAWNBench net) normalises the statistics the next layer
    actually sees and runs BN on a quarter of the pixels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, act: str, bn_momentum: float, pool: bool = False
    ):
        layers: list[nn.Module] = [conv3x3(in_channels, out_channels)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(out_channels, momentum=bn_momentum), _activation(act)]
        super().__init__(*layers)


class Residual(nn.Module):
    """x + two ConvBNAct layers at constant width."""

    def __init__(self, channels: int, act: str, bn_momentum: float):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(channels, channels, act, bn_momentum),
            ConvBNAct(channels, channels, act, bn_momentum),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep conv; three conv-pool stages, residual blocks after the first and last; max-pool head. Returns logits.

    logit_scale shrinks the initial logits so the softmax starts nearly uniform; the DAWNBench
    net uses 0.125 with a bias-free classifier.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 384),
        num_classes: int = 10,
        act: str = "gelu",
        bn_momentum: float = 0.1,
        logit_scale: float = 0.125,
    ):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNet9 needs 4 widths (prep and three stages), got {tuple(widths)}")
        prep_width, width1, width2, width3 = widths
        self.prep = ConvBNAct(3, prep_width, act, bn_momentum)
        self.stages = nn.Sequential(
            ConvBNAct(prep_width, width1, act, bn_momentum, pool=True),
            Residual(width1, act, bn_momentum),
            ConvBNAct(width1, width2, act, bn_momentum, pool=True),
            ConvBNAct(width2, width3, act, bn_momentum, pool=True),
            Residual(width3, act, bn_momentum),
        )
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width3, num_classes, bias=False)
        )
        self.logit_scale = logit_scale
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.prep(x))) * self.logit_scale


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def resnet9(
    num_classes: int = 10,
    widths: Sequence[int] = (64, 128, 256, 384),
    width: float = 1.0,
    act: str = "gelu",
    bn_momentum: float = 0.1,
    logit_scale: float = 0.125,
) -> ResNet9:
    """Default widths give about 4.2M parameters (the DAWNBench 64/128/256/512 has 6.6M).

    `width` scales every stage; results are rounded to multiples of 8, which keeps channel
    counts friendly to vectorised and tensor-core kernels.
    """
    scaled = tuple(max(8, round(w * width / 8) * 8) for w in widths)
    return ResNet9(
        scaled, num_classes=num_classes, act=act, bn_momentum=bn_momentum, logit_scale=logit_scale
    )
