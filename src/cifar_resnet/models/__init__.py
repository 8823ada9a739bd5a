"""Model zoo: every network takes normalised float NCHW images and returns logits.

Use `build_model(name, num_classes, **kwargs)`; wrap the result in `ImageClassifier` when the
model must take raw pixels (checkpoints, serving).
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from .resnet import resnet18_slim, resnet_small, se_resnet, seed_resnet
from .resnet9 import resnet9
from .whitened import airbench96_net, airbench_net, whitened_resnet
from .wide_resnet import wide_resnet

__all__ = [
    "MODELS",
    "ImageClassifier",
    "UnknownModelError",
    "build_model",
    "count_flops",
    "count_parameters",
]

# name -> builder(num_classes=10, **kwargs); builders reject kwargs they do not know.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_resnet": seed_resnet,
    "se_resnet": se_resnet,
    "resnet18_slim": resnet18_slim,
    "wide_resnet": wide_resnet,
    "resnet_small": resnet_small,
    "resnet9": resnet9,
    "whitened_resnet": whitened_resnet,
    "airbench_net": airbench_net,
    "airbench96_net": airbench96_net,
}


class UnknownModelError(UserError, ValueError):
    """Raised by build_model for a name not in MODELS; the message lists the known names."""

    def __init__(self, name: str):
        self.name = name
        self.known = sorted(MODELS)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.known)}")

    def __reduce__(self):
        # Rebuild from the name, not the message, so the error survives pickling (e.g. across workers).
        return type(self), (self.name,)


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered network with freshly initialised weights."""
    if name not in MODELS:
        raise UnknownModelError(name)
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (frozen ones and buffers such as BN statistics are excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)) -> int:
    """Forward FLOPs per image, counting only convolutions and linear layers.

    Convention: FLOPs = 2 * multiply-accumulates, where a conv costs
    out_elements * (in_channels / groups) * kernel_elements MACs and a linear layer
    out_elements * in_features. Biases, normalisation, activations, pooling and residual
    additions are not counted (they are a few percent at most for these nets). The count is
    taken from one forward pass of a zero tensor of `input_shape` in eval mode, under
    no_grad, on the device the model's parameters live on (CPU for a freshly built model),
    and divided by the batch size. The model's train/eval mode is restored afterwards.
    """
    macs = 0

    def count_conv(module: nn.modules.conv._ConvNd, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        kernel_elements = 1
        for size in module.kernel_size:
            kernel_elements *= size
        macs += output.numel() * (module.in_channels // module.groups) * kernel_elements

    def count_linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(count_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(count_linear))

    first_parameter = next(model.parameters(), None)
    device = first_parameter.device if first_parameter is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * macs // input_shape[0]


class ImageClassifier(nn.Module):
    """Wraps a network with its input normalisation so checkpoints and served models take raw pixels.

    mean and std are per channel on the [0, 1] scale and are stored as buffers, so they travel
    in the state dict with the weights. forward takes NCHW images as uint8 (0..255) or as
    floats on the same 0..255 scale, and returns the network's logits.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Follow the buffers' dtype so a wrapper cast with .to(dtype) feeds its net matching inputs.
        pixels = x.to(self.mean.dtype) / 255.0
        return (pixels - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor) -> None:
        """Give a network with a data-dependent init (whitened_resnet's stem) these raw
        training images; networks without one ignore the call."""
        fit = getattr(self.net, "init_from_images", None)
        if fit is not None:
            fit(self.normalise(images.to(self.mean.device)))

    def set_epoch(self, epoch: int) -> None:
        """Tell a network whose training changes by epoch (airbench_net freezes its stem's
        bias after a few) that training epoch ``epoch`` (1-based) starts; others ignore it."""
        set_epoch = getattr(self.net, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
