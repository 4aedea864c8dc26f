"""Rebuilding a site's images from its released update: inverting gradients (Geiping et al. 2020).

The attacker holds the model it sent, the update that came back and the labels; it optimises a
dummy image until the gradient that image would produce matches the observed one in direction.
Pure torch; it runs on the site's GPU when asked (``device="auto"``). The matching pieces live in
:mod:`medflare.attacks.gradient_matching`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from medflare.attacks.gradient_matching import cosine_matching_loss, observed_gradient, released_masks, total_variation
from medflare.privacy.argument_checks import check_int, check_real
from medflare.training.device import select_device

__all__ = ["InversionSettings", "Inversion", "invert_gradients", "LOSSES", "MODEL_MODES", "GRADIENT_TRANSFORMS"]

#: how the site's optimizer turned its gradient into the update (see :func:`invert_gradients`)
GRADIENT_TRANSFORMS = ("none", "adam_step")

#: the site's training loss, by name (or pass a callable ``loss(logits, labels)``)
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce_with_logits": nn.BCEWithLogitsLoss(),
    "cross_entropy": nn.CrossEntropyLoss(),
}

#: ``"train"``: BatchNorm normalises by the batch's own statistics, as in the site's step (dropout
#: is switched off: its mask is the site's secret); ``"eval"``: the model as in inference
MODEL_MODES = ("train", "eval")


@dataclass(frozen=True)
class InversionSettings:
    """How hard the attacker works. Defaults suit one 64x64 image on a CPU: one CPU thread takes
    about 0.07 s per iteration on the cxr jobs' OutcomeNet (a 312k-parameter ResNet with
    BatchNorm), about 20 s for the default 300. That budget rebuilds a small CNN's input; on the
    OutcomeNet neither 300 nor 2,000 iterations beat the prior (matching loss still ~0.16-0.29),
    so give deep networks a GPU and the paper's budget (4,800 to 24,000 iterations, restarts)
    before crediting the network.

    Args:
        iterations: optimiser steps per restart (>= 1).
        step_size: Adam's learning rate on the image (> 0); cut by 10 at 3/8, 5/8 and 7/8 of
            the iterations, as the paper.
        tv_weight: ``alpha``, the weight of the total-variation prior (>= 0).
        signed: use the sign of the image gradient (the paper's choice), else the gradient.
        restarts: independent random starts (>= 1); the lowest final matching loss wins.
        seed: seed of the starting images (the global generator is left alone).
        model_mode: one of :data:`MODEL_MODES`.
    """

    iterations: int = 300
    step_size: float = 0.1
    tv_weight: float = 0.01
    signed: bool = True
    restarts: int = 1
    seed: int = 0
    model_mode: str = "train"

    def __post_init__(self):
        check_int("iterations", self.iterations, low=1)
        check_real("step_size", self.step_size, low=0.0, low_open=True)
        check_real("tv_weight", self.tv_weight, low=0.0)
        if not isinstance(self.signed, bool):
            raise TypeError(f"signed must be a bool, got {self.signed!r}")
        check_int("restarts", self.restarts, low=1)
        check_int("seed", self.seed, low=0)
        if self.model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {list(MODEL_MODES)}, got {self.model_mode!r}")


@dataclass(frozen=True)
class Inversion:
    """The attack's result.

    Attributes:
        reconstruction: ``input_shape``, on the CPU, within the data range.
        matching_loss: its cosine matching loss (without the prior), in [0, 2].
        restart_losses: the final matching loss of each restart.
        matched: names of the parameter tensors matched.
        ignored: names in the update that are buffers (e.g. BatchNorm running statistics), not
            matched by this attack.
        released_fraction: the fraction of the matched entries taken as released (under
            ``released="nonzero"`` an unfiltered gradient's exact zeros, e.g. behind dead ReLUs,
            count as withheld too).
    """

    reconstruction: torch.Tensor
    matching_loss: float
    restart_losses: tuple
    matched: tuple
    ignored: tuple
    released_fraction: float


def _matched_parameters(model: nn.Module, gradient: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The update's tensors that are parameters of the model (matched) and buffers (ignored)."""
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    matched, ignored = [], []
    for name, value in gradient.items():
        if name in parameters:
            if tuple(parameters[name].shape) != tuple(value.shape):
                raise ValueError(f"update[{name!r}] has shape {tuple(value.shape)}, the model's parameter {tuple(parameters[name].shape)}")
            matched.append(name)
        elif name in buffers:
            ignored.append(name)
        else:
            raise ValueError(f"update tensor {name!r} is neither a parameter nor a buffer of the model: does the architecture match?")
    if not matched:
        raise ValueError("the update holds none of the model's parameters: nothing to match")
    return matched, ignored


def _attack_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """A copy of the model for the attacker (the caller's model and its statistics are untouched)."""
    twin = copy.deepcopy(model).to(device)
    twin.train(mode == "train")
    for module in twin.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    return twin


def _forward(model: nn.Module, x: torch.Tensor, extra_inputs) -> torch.Tensor:
    if isinstance(extra_inputs, Mapping):
        return model(x, **extra_inputs)
    return model(x, *extra_inputs)


def _check_shape_and_range(input_shape, data_range) -> tuple[tuple, float, float]:
    shape = tuple(input_shape)
    if len(shape) != 4 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be (N, C, H, W), positive ints, got {input_shape!r}")
    if not isinstance(data_range, (tuple, list)) or len(data_range) != 2:
        raise ValueError(f"data_range must be (low, high), got {data_range!r}")
    low = check_real("data_range[0]", data_range[0])
    high = check_real("data_range[1]", data_range[1])
    if high <= low:
        raise ValueError(f"data_range must have low < high, got {data_range!r}")
    return shape, low, high


def invert_gradients(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    input_shape: Sequence[int],
    *,
    loss: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "bce_with_logits",
    update_kind: str = "gradient",
    learning_rate: Optional[float] = None,
    released: Union[str, Mapping[str, torch.Tensor]] = "nonzero",
    extra_inputs: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]] = (),
    data_range: tuple = (0.0, 1.0),
    settings: InversionSettings = InversionSettings(),
    device: str = "auto",
    gradient_transform: str = "none",
) -> Inversion:
    """Reconstruct the input batch behind an observed update by cosine gradient matching.

    Args:
        model: the architecture with the weights the server sent (not modified).
        update: tensor name -> what the site released: its gradient, or its new weights minus
            the weights sent (``update_kind``). Parameters are matched; buffers (BatchNorm
            running statistics) are listed in the result and ignored; any other name is refused.
        labels: the batch's labels, as the site's loss takes them (known to the attacker).
        input_shape: the image batch's shape, ``(N, C, H, W)``.
        loss: the site's loss, a name in :data:`LOSSES` or ``loss(logits, labels)``.
        update_kind: ``"gradient"`` or ``"weight_difference"``
            (see :func:`~medflare.attacks.gradient_matching.observed_gradient`).
        learning_rate: the site's local learning rate, for a weight difference.
        released: which entries were released: ``"nonzero"`` (partial sharing sends withheld
            entries as 0; matching them as zeros would mislead the attack), ``"all"``, or
            name -> boolean mask when the filter's choice is known. A tensor left out of
            ``update`` altogether is not matched.
        extra_inputs: fixed inputs the model takes after the image, positional (a sequence) or
            by keyword (a mapping), e.g. ``{"clinical": values}`` for an
            :class:`~medflare.training.outcome_networks.OutcomeNet`; the attacker does not
            optimise them.
        data_range: ``(low, high)`` of the pixel values: the box the reconstruction is kept in.
        settings: iterations, step size, prior weight, restarts (:class:`InversionSettings`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        gradient_transform: one of :data:`GRADIENT_TRANSFORMS`: ``"none"``, or ``"adam_step"``
            when the site's optimizer is Adam: its first step moves each weight by
            ``eta * g / (|g| + 1e-8)``, about ``eta * sign(g)``, so ``-Delta / eta`` is the sign of
            the gradient and the trial gradient is matched through the soft sign
            ``g' / (|g'| + tau)``, ``tau = 0.1 mean|g'|`` per tensor (a differentiable stand-in).

    Returns:
        :class:`Inversion`: the reconstruction and its final matching loss.

    Notes:
        The attacker solves (Geiping et al. 2020, Eq. 4)::

            x* = argmin_{x' in [low, high]^n}  1 - <grad_theta L(f_theta(x'), y), g> / (||grad_theta L(f_theta(x'), y)|| ||g||)
                                              + alpha TV(x')

        over the released entries only (``m ⊙`` both gradients), with Adam on ``sign(grad_x)``
        (the paper's signed gradients), the step size cut by 10 at 3/8, 5/8 and 7/8 of the
        iterations, and the image projected onto the box after every step. For a weight
        difference ``Delta`` from ``S`` local SGD steps the attacker takes ``g = -Delta / eta``:
        it assumes the steps' gradients sum to roughly one gradient at the sent weights (exact
        for one full-batch step; weaker for many steps, wrong for Adam or weight decay).

        Threat model: an honest-but-curious server that knows the architecture, the weights it
        sent, the labels, the input shape, the learning rate and the number of local steps, and
        the extra inputs (the clinical values) when given. It does not send crafted weights.

        Not covered: BatchNorm running statistics in the update (per-channel moments of the
        patient's own activations) are not matched, though they leak too; the site's dropout
        mask is unknown, so dropout is off in the attacker's model. A failed reconstruction at a
        small iteration budget bounds nothing: deep networks need thousands of iterations.

    References:
        1. Geiping J., Bauermeister H., Dröge H., Moeller M., "Inverting Gradients - How easy is
           it to break privacy in federated learning?", NeurIPS 2020, Sec. 4 (Eq. 4) and Sec. 5.
        2. Zhu L., Liu Z., Han S., "Deep Leakage from Gradients", NeurIPS 2019 (the Euclidean
           matching this attack replaces by the cosine).

    Raises:
        ValueError: an update that does not fit the model, nothing released, a bad shape, range,
            loss or labels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(settings, InversionSettings):
        raise TypeError(f"settings must be an InversionSettings, got {type(settings).__name__}")
    shape, low, high = _check_shape_and_range(input_shape, data_range)
    if gradient_transform not in GRADIENT_TRANSFORMS:
        raise ValueError(f"gradient_transform must be one of {list(GRADIENT_TRANSFORMS)}, got {gradient_transform!r}")
    loss_fn = LOSSES.get(loss) if isinstance(loss, str) else loss
    if not callable(loss_fn):
        raise ValueError(f"loss must be one of {list(LOSSES)} or a callable, got {loss!r}")
    if not isinstance(labels, torch.Tensor) or labels.shape[:1] != (shape[0],):
        raise ValueError(f"labels must be a tensor with one entry per case ({shape[0]}), got {getattr(labels, 'shape', labels)!r}")
    target = device if isinstance(device, torch.device) else select_device(device)

    gradient = observed_gradient(update, update_kind, learning_rate)
    matched, ignored = _matched_parameters(model, gradient)
    masks_all = released_masks({name: gradient[name] for name in matched}, released)
    released_count = sum(int(masks_all[name].sum()) for name in matched)
    total = sum(gradient[name].numel() for name in matched)
    if released_count == 0:
        raise ValueError(f"none of the {total} entries of the matched parameters was released: nothing to match")

    twin = _attack_model(model, settings.model_mode, target)
    parameters = dict(twin.named_parameters())
    params = [parameters[name].requires_grad_(True) for name in matched]
    targets = [gradient[name].to(target, torch.float32) for name in matched]
    masks = [masks_all[name].to(target) for name in matched]
    labels = labels.to(target)
    extras = {k: v.to(target) for k, v in extra_inputs.items()} if isinstance(extra_inputs, Mapping) else tuple(v.to(target) for v in extra_inputs)

    def matching(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        task_loss = loss_fn(_forward(twin, x, extras), labels)
        trial = torch.autograd.grad(task_loss, params, create_graph=create_graph)
        if gradient_transform == "adam_step":
            trial = [g / (g.abs() + 0.1 * g.detach().abs().mean() + 1e-12) for g in trial]
        return cosine_matching_loss(trial, targets, masks)

    generator = torch.Generator().manual_seed(settings.seed)
    best, best_loss, losses = None, float("inf"), []
    for _ in range(settings.restarts):
        start = low + (high - low) * torch.rand(shape, generator=generator)
        x = _optimise(start.to(target), matching, settings, low, high)
        final = float(matching(x.requires_grad_(True), create_graph=False).detach())
        losses.append(final)
        if final < best_loss or best is None:
            best, best_loss = x.detach(), final
    return Inversion(best.cpu(), best_loss, tuple(losses), tuple(matched), tuple(ignored), released_count / total)


def _optimise(x: torch.Tensor, matching, settings: InversionSettings, low: float, high: float) -> torch.Tensor:
    """One restart: Adam on the (signed) image gradient, step cuts, projection onto the box."""
    x = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.step_size)
    n = settings.iterations
    milestones = sorted({max(1, int(n * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(n):
        objective = matching(x, create_graph=True)
        if settings.tv_weight > 0:
            objective = objective + settings.tv_weight * total_variation(x)
        (grad,) = torch.autograd.grad(objective, x)
        x.grad = grad.sign() if settings.signed else grad
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(low, high)
    return x.detach()
