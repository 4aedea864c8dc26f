"""A LeNet-size image network for small sites and for checking that an attack works.

:class:`SmallConvNet` is two 3x3 convolutions with ReLU (the second of stride 2) and a linear
layer to ``out_channels`` features; no normalisation layer, so it is DP-SGD compatible as built.
It fits an :class:`~medflare.training.outcome_networks.OutcomeNet` as its ``image_network``
(``{"path": "medflare.training.small_networks.SmallConvNet", "args": {"image_size": [64, 64]},
"config_type": "dict"}``). Shallow networks like it are where gradient inversion is known to
succeed (Geiping et al. 2020; Zhu et al. 2019): ``medflare audit`` uses it to show that its
attack rebuilds images where it should.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["SmallConvNet"]


class SmallConvNet(nn.Module):
    """``conv3x3(in, width) - ReLU - conv3x3/2(width, width) - ReLU - flatten - linear(out)``.

    Args:
        image_size: ``[H, W]`` of the input (sets the linear layer's width).
        in_channels: input channels (1 for a radiograph).
        out_channels: output features.
        width: channels of both convolutions.

    Raises:
        ValueError: for sizes that are not positive ints (an image edge must be >= 4).
    """

    def __init__(self, image_size: Sequence[int] = (64, 64), in_channels: int = 1, out_channels: int = 32, width: int = 8):
        super().__init__()
        if not isinstance(image_size, (list, tuple)) or len(image_size) != 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 4 for s in image_size
        ):
            raise ValueError(f"image_size must be [H, W], ints >= 4, got {image_size!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        height, wide = ((s + 1) // 2 for s in image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width * height * wide, out_channels)

    def forward(self, x):
        return self.fc(self.features(x))
