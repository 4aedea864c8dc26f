"""Networks whose initial weights are fixed by a seed, so that a federation starts from the same
global model every run (the server builds the initial model; NVFlare does not seed it)."""

from __future__ import annotations

import torch
from monai.networks.nets import SegResNet

__all__ = ["SeededSegResNet", "SeededDPSegResNet"]


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


class SeededDPSegResNet(SeededSegResNet):
    """A ``SeededSegResNet`` that DP-SGD can train: GroupNorm (SegResNet's default, required
    here), ReLU not in place and residual blocks that add out of place.

    The state dict is SegResNet's (no parameter or buffer changes), so a job's server may build
    either class; SegResNet has no BatchNorm, so under DP-SGD only learned weights change.

    Args:
        seed: seed of the initial weights, an int >= 0.
        **kwargs: ``SegResNet``'s arguments; ``act`` is forced to a ReLU that is not in place
            and ``norm`` must be a group norm.

    Raises:
        ValueError: ``norm`` is not GroupNorm, or ``act`` is given as something else than ReLU.
    """

    def __init__(self, seed: int = 0, **kwargs):
        from medflare.training.dp_networks import check_dp_compatible, make_dp_compatible

        norm = kwargs.get("norm", ("GROUP", {"num_groups": 8}))
        norm_name = norm[0] if isinstance(norm, (tuple, list)) else norm
        if not isinstance(norm_name, str) or norm_name.lower() != "group":
            raise ValueError(f"norm must be a group norm, e.g. ('GROUP', {{'num_groups': 8}}), for DP-SGD; got {norm!r}")
        act = kwargs.pop("act", ("RELU", {"inplace": False}))
        act_name = act[0] if isinstance(act, (tuple, list)) else act
        if not isinstance(act_name, str) or act_name.upper() != "RELU":
            raise ValueError(f"act must be ReLU (it is made not in place) for SeededDPSegResNet, got {act!r}")
        super().__init__(seed=seed, act=("RELU", {"inplace": False}), **kwargs)
        make_dp_compatible(self)
        check_dp_compatible(self)
