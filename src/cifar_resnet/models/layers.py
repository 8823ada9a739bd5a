"""Building blocks shared by several model families."""

from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by a BatchNorm whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def init_weights_(model: nn.Module) -> None:
    """Kaiming-normal convs and identity BatchNorms; Linear layers keep PyTorch's default init.

    fan_out follows torchvision's ResNets: it keeps the gradient scale stable through deep
    stacks of ReLU convs, which matters more for training speed than the forward scale.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
