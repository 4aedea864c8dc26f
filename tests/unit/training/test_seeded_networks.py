import pytest
import torch
from monai.networks.nets import SegResNet

from medflare.training.seeded_networks import SeededSegResNet

ARGS = {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}


def test_same_seed_same_weights_and_the_global_rng_is_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = SeededSegResNet(seed=5, **ARGS).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = SeededSegResNet(seed=5, **ARGS).state_dict()
    c = SeededSegResNet(seed=6, **ARGS).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_weights_fit_monai_segresnet():
    plain = SegResNet(**ARGS)
    plain.load_state_dict(SeededSegResNet(seed=0, **ARGS).state_dict(), strict=True)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        SeededSegResNet(seed=seed, **ARGS)
