"""SmallConvNet: a LeNet-size image network that fits OutcomeNet and DP-SGD as built."""

import pytest
import torch

from medflare.training.dp_networks import check_dp_compatible
from medflare.training.outcome_networks import OutcomeNet
from medflare.training.small_networks import SmallConvNet


@pytest.mark.parametrize("size", [[32, 32], [33, 31], [64, 48]])
def test_it_maps_an_image_of_its_size_to_its_features(size):
    net = SmallConvNet(image_size=size, out_channels=5)
    assert net(torch.rand(3, 1, *size)).shape == (3, 5)


def test_it_is_an_outcome_nets_image_network_and_dp_sgd_compatible():
    spec = {"path": "medflare.training.small_networks.SmallConvNet", "args": {"image_size": [32, 32]}, "config_type": "dict"}
    net = OutcomeNet(num_outputs=2, clinical_features=3, image_network=spec, image_features=7, seed=0)
    assert net(image=torch.rand(2, 1, 32, 32), clinical=torch.rand(2, 3)).shape == (2, 2)
    check_dp_compatible(net)  # no BatchNorm, no in-place activations: raises otherwise


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": [3, 32]}, "image_size must be"),
        ({"image_size": 32}, "image_size must be"),
        ({"image_size": [32, True]}, "image_size must be"),
        ({"out_channels": 0}, "out_channels must be"),
        ({"width": 2.5}, "width must be"),
        ({"in_channels": True}, "in_channels must be"),
    ],
)
def test_bad_sizes_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmallConvNet(**kwargs)
