"""Tiny fixed cases, networks and local updates for the attack tests (CPU, seconds)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def toy_cases(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(count, 1, size, size)`` images in [0, 1]: a shared elliptic "body" (what the prior
    baseline can guess) plus three Gaussian blobs placed per case (what it cannot)."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    images = []
    for _ in range(count):
        image = 0.3 * ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float()
        for _ in range(3):
            centre = torch.rand(2, generator=generator) * 1.2 - 0.6
            radius = 0.1 + 0.2 * torch.rand(1, generator=generator)
            image = image + 0.5 * torch.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * radius**2))
        images.append(image.clamp(0, 1))
    return torch.stack(images)[:, None]


def seeded(build, seed: int = 0) -> nn.Module:
    """``build()`` with weights from ``seed``, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_cnn(size: int, outputs: int = 2, seed: int = 0) -> nn.Module:
    """Two convolutions and a linear head: the small CNN of the "truthful by construction" check."""
    return seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * (size // 2) ** 2, outputs)
        ),
        seed,
    )


def sgd_update(model: nn.Module, forward, loss_fn, labels: torch.Tensor, learning_rate: float, steps: int = 1) -> dict:
    """A site's weight difference: ``steps`` plain SGD steps on one batch from the model's weights;
    ``forward(model)`` gives the logits."""
    site = copy.deepcopy(model)
    optimizer = torch.optim.SGD(site.parameters(), lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(forward(site), labels).backward()
        optimizer.step()
    before = model.state_dict()
    return {name: (after - before[name]).detach() for name, after in site.state_dict().items()}


def clip_and_noise(update: dict, clipping_norm: float, noise_std: float, seed: int) -> dict:
    """The update clipped to ``clipping_norm`` in L2 over all tensors, plus N(0, noise_std^2) per entry."""
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    generator = torch.Generator().manual_seed(seed)
    return {name: v * scale + noise_std * torch.randn(v.shape, generator=generator) for name, v in update.items()}
