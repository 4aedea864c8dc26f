"""Which networks DP-SGD can train, and how to make a MONAI network one of them.

DP-SGD needs each sample's gradient to depend on that sample alone and the model to change only
through its noised gradient. Three things in MONAI's networks break that, and each is refused
by :func:`check_dp_compatible` before any step, naming the layer and the fix:

- **BatchNorm** mixes the samples of a batch in training mode and keeps running statistics of
  the patients' images (buffers that leave the site un-noised): replace it with GroupNorm;
- **in-place activations** (MONAI's default ``ReLU(inplace=True)``) and **in-place residual
  additions** (``x += identity`` in SegResNet's ``ResBlock`` and ResNet's blocks) overwrite
  tensors that per-sample gradient hooks need (measured: Opacus's hooks fail on them);
- any other layer Opacus's ``ModuleValidator`` refuses (e.g. LSTM without Opacus's DPLSTM).

:func:`make_dp_compatible` fixes the first two in place of a built network (GroupNorm by
Opacus's ``ModuleValidator.fix``, out-of-place residual blocks with the same state dict).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DPIncompatibleNetworkError", "dp_incompatibilities", "check_dp_compatible", "make_dp_compatible"]


class DPIncompatibleNetworkError(ValueError):
    """A network DP-SGD cannot train; the message names each layer and the fix."""


def _in_place_residual_blocks() -> dict[type, type]:
    """MONAI's residual blocks that add in place -> medflare's out-of-place twins."""
    from monai.networks.blocks.segresnet_block import ResBlock
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    class OutOfPlaceResBlock(ResBlock):
        """SegResNet's ResBlock with ``x + identity`` instead of ``x += identity``."""

        def forward(self, x):
            identity = x
            x = self.conv1(self.act(self.norm1(x)))
            x = self.conv2(self.act(self.norm2(x)))
            return x + identity

    class OutOfPlaceResNetBlock(ResNetBlock):
        def forward(self, x):
            residual = x if self.downsample is None else self.downsample(x)
            out = self.act(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.act(out + residual)

    class OutOfPlaceResNetBottleneck(ResNetBottleneck):
        def forward(self, x):
            residual = x if self.downsample is None else self.downsample(x)
            out = self.act(self.bn1(self.conv1(x)))
            out = self.act(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.act(out + residual)

    return {ResBlock: OutOfPlaceResBlock, ResNetBlock: OutOfPlaceResNetBlock, ResNetBottleneck: OutOfPlaceResNetBottleneck}


_BLOCKS: dict = {}


def _blocks() -> dict:
    if not _BLOCKS:
        _BLOCKS.update(_in_place_residual_blocks())
    return _BLOCKS


def dp_incompatibilities(model: nn.Module) -> list[str]:
    """One line per layer that DP-SGD cannot train, naming the layer and the fix; [] when none."""
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(
                f"{where} ({type(module).__name__}) mixes patients in a batch and keeps running statistics: "
                f"use GroupNorm (OutcomeNet(norm='group'), SeededDPSegResNet, or make_dp_compatible)"
            )
        elif type(module) in _blocks():
            problems.append(
                f"{where} ({type(module).__name__}) adds its residual in place (x += identity): use "
                f"SeededDPSegResNet / OutcomeNet(norm='group') or make_dp_compatible"
            )
        elif getattr(module, "inplace", False) is True:
            problems.append(
                f"{where} ({type(module).__name__}(inplace=True)) overwrites its input: use inplace=False "
                f"(act=('RELU', {{'inplace': False}}) in MONAI) or make_dp_compatible"
            )
    for error in ModuleValidator.validate(model, strict=False):
        text = str(error)
        # BatchNorm is named per layer above; the trainer puts the model in training mode itself
        if not text.startswith(("BatchNorm cannot support", "Model needs to be in training mode")):
            problems.append(f"{text[:300]} (Opacus's ModuleValidator)")
    return problems


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a network DP-SGD cannot train.

    Raises:
        DPIncompatibleNetworkError: listing each offending layer and its fix.
    """
    problems = dp_incompatibilities(model)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DPIncompatibleNetworkError(f"DP-SGD cannot train this network ({len(problems)} layer(s)): {shown}")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """BatchNorm replaced by GroupNorm (``ModuleValidator.fix``), in-place activations turned off and
    MONAI's in-place residual blocks made out-of-place; returns the (possibly new) module.

    The state dict changes where BatchNorm is replaced (GroupNorm has no running statistics), so
    the server must build the same converted network.
    """
    from opacus.validators import ModuleValidator

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        with torch.random.fork_rng(devices=[]):
            model = ModuleValidator.fix(model)
    blocks = _blocks()
    for module in model.modules():
        if type(module) in blocks:
            module.__class__ = blocks[type(module)]
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model
