"""The pieces of a gradient-matching attack: the observed update as a gradient, which of its
entries were released, the cosine matching loss and the total-variation image prior.

Pure torch functions, used by :mod:`medflare.attacks.inverting_gradients` and callable on their
own with plain tensors.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from medflare.privacy.argument_checks import check_real

__all__ = ["UPDATE_KINDS", "observed_gradient", "released_masks", "cosine_matching_loss", "total_variation"]

#: what a site's update may be: the gradient itself, or new weights minus the weights sent
UPDATE_KINDS = ("gradient", "weight_difference")

TensorLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(name: str, value: TensorLike) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"update[{name!r}] must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"update[{name!r}] must hold real numbers, got dtype {value.dtype}")
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"update[{name!r}] must be finite; it holds NaN or infinite values")
    return value


def observed_gradient(
    update: Mapping[str, TensorLike], update_kind: str = "gradient", learning_rate: Optional[float] = None
) -> dict[str, torch.Tensor]:
    """What the attacker takes for the gradient of the site's loss at the weights it sent.

    Args:
        update: tensor name -> the released tensor (what the site sent).
        update_kind: ``"gradient"`` (taken as is) or ``"weight_difference"`` (new weights minus
            the weights sent, ``Delta``).
        learning_rate: the site's local learning rate ``eta`` (> 0); needed for a weight difference.

    Notes:
        For ``S`` local SGD steps ``Delta = -eta sum_s g_s``, so the attacker takes
        ``g = -Delta / eta``: the assumption is that the steps' gradients, each at slightly moved
        weights and on its own batch, add up to something close to one gradient at the sent
        weights. The cosine matching loss is blind to a positive scale, so ``eta`` and ``S``
        change nothing beyond the sign; the assumption weakens as ``S eta`` grows and fails for an
        adaptive optimizer (one Adam step is ``Delta ~ -eta sign(g)``) or weight decay.
    """
    if update_kind not in UPDATE_KINDS:
        raise ValueError(f"update_kind must be one of {list(UPDATE_KINDS)}, got {update_kind!r}")
    if not isinstance(update, Mapping) or not update:
        raise ValueError(f"update must be a non-empty mapping of tensor name -> tensor, got {type(update).__name__}")
    tensors = {name: _as_tensor(name, value) for name, value in update.items()}
    if update_kind == "gradient":
        return {name: value.to(torch.float32) if not value.is_floating_point() else value for name, value in tensors.items()}
    if learning_rate is None:
        raise ValueError("learning_rate must be given (> 0) for update_kind='weight_difference'")
    eta = check_real("learning_rate", learning_rate, low=0.0, low_open=True)
    return {name: -value.to(torch.float64 if value.dtype == torch.float64 else torch.float32) / eta for name, value in tensors.items()}


def released_masks(
    gradient: Mapping[str, torch.Tensor], released: Union[str, Mapping[str, TensorLike]] = "nonzero"
) -> dict[str, torch.Tensor]:
    """Which entries of each tensor the site released, as boolean masks.

    Args:
        gradient: tensor name -> observed tensor.
        released: ``"nonzero"`` (an entry withheld by partial sharing arrives as exactly 0),
            ``"all"`` (every entry), or tensor name -> boolean mask of the same shape.

    Raises:
        ValueError: an unknown mode, a mask of the wrong shape or for a tensor not in ``gradient``.
    """
    if isinstance(released, str):
        if released == "nonzero":
            return {name: value != 0 for name, value in gradient.items()}
        if released == "all":
            return {name: torch.ones_like(value, dtype=torch.bool) for name, value in gradient.items()}
        raise ValueError(f"released must be 'nonzero', 'all' or a mapping of tensor name -> mask, got {released!r}")
    if not isinstance(released, Mapping):
        raise TypeError(f"released must be 'nonzero', 'all' or a mapping of tensor name -> mask, got {type(released).__name__}")
    masks = {}
    for name, value in gradient.items():
        if name not in released:
            raise ValueError(f"released has no mask for update tensor {name!r}")
        mask = torch.as_tensor(np.asarray(released[name]) if isinstance(released[name], np.ndarray) else released[name])
        if tuple(mask.shape) != tuple(value.shape):
            raise ValueError(f"released[{name!r}] has shape {tuple(mask.shape)}, the update tensor {tuple(value.shape)}")
        masks[name] = mask.to(device=value.device, dtype=torch.bool)
    extra = sorted(set(released) - set(gradient))
    if extra:
        raise ValueError(f"released names tensors that are not in the update: {extra}")
    return masks


def cosine_matching_loss(
    trial: Sequence[torch.Tensor], target: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """One minus the cosine similarity of the trial and observed gradients over the released entries.

    Notes:
        With all tensors' released entries taken as one vector (Geiping et al. 2020, Eq. 4)::

            L_grad(x') = 1 - <m ⊙ grad_theta L(x', y), m ⊙ g> / (||m ⊙ grad_theta L(x', y)|| ||m ⊙ g||)

        in [0, 2]; ``m`` is the released mask (withheld entries carry no information and are left
        out of both vectors).
    """
    if not (len(trial) == len(target) == len(masks)) or not trial:
        raise ValueError(f"trial, target and masks must be equally long and non-empty, got {len(trial)}, {len(target)}, {len(masks)}")
    dot = trial[0].new_zeros(())
    trial_sq = trial[0].new_zeros(())
    target_sq = trial[0].new_zeros(())
    for t, g, m in zip(trial, target, masks):
        t = t[m]
        g = g[m].to(t.dtype)
        dot = dot + (t * g).sum()
        trial_sq = trial_sq + (t * t).sum()
        target_sq = target_sq + (g * g).sum()
    tiny = torch.finfo(dot.dtype).tiny
    return 1.0 - dot / (trial_sq.clamp_min(tiny).sqrt() * target_sq.clamp_min(tiny).sqrt())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a ``(N, C, H, W)`` batch, as Geiping et al.'s code::

        TV(x) = mean |x[..., i, j+1] - x[..., i, j]| + mean |x[..., i+1, j] - x[..., i, j]|
    """
    if x.dim() != 4:
        raise ValueError(f"total_variation expects (N, C, H, W), got shape {tuple(x.shape)}")
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy
