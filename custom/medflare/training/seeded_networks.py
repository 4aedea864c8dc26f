"""Networks whose initial weights are fixed by a seed, so that a federation starts from the same
global model every run (the server builds the initial model; NVFlare does not seed it)."""

from __future__ import annotations

import torch
from monai.networks.nets import SegResNet

__all__ = ["SeededSegResNet"]


class SeededSegResNet(SegResNet):
    """MONAI's ``SegResNet`` initialised from ``torch.manual_seed(seed)``.

    The global random state is left as it was. The state dict is SegResNet's, so weights move
    freely between the two classes.

    Args:
        seed: seed of the initial weights, an int >= 0.
        **kwargs: ``SegResNet``'s arguments.
    """

    def __init__(self, seed: int = 0, **kwargs):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(**kwargs)
        self.seed = seed
