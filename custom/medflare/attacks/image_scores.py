"""How close a reconstruction is to a patient's image, and to whom it points.

Scores of an attack's output that a reader can judge: SSIM and PSNR against the true image, the
same scores for the *prior baseline* (what an attacker guesses knowing only the population: the
mean image of the other cases), and re-identification (is the reconstruction most similar to the
true case among all the site's cases?). Pure torch: the images' device is used.

Images are ``(N, C, H, W)`` batches or single ``(H, W)`` images, as torch tensors or numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from medflare.privacy.argument_checks import check_int, check_real

__all__ = ["ssim", "psnr", "prior_baseline", "reidentification", "Reidentification", "as_image_batch", "gaussian_window"]

ImageLike = Union[torch.Tensor, np.ndarray]


def as_image_batch(name: str, images: ImageLike) -> torch.Tensor:
    """``images`` as a float64 ``(N, C, H, W)`` tensor on its device (a ``(H, W)`` image is one
    case of one channel).

    Raises:
        TypeError: not a tensor or an array.
        ValueError: another number of dimensions, an empty axis, or a NaN or infinite value.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dim() == 2:
        images = images[None, None]
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W) or (H, W), got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    if images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {images.dtype}")
    images = images.detach().to(torch.float64)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} must be finite; it holds {int((~torch.isfinite(images)).sum())} NaN or infinite values")
    return images


def _paired(x: ImageLike, y: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches, checked; a batch of one is compared with every image of the other."""
    x, y = as_image_batch("x", x), as_image_batch("y", y)
    if x.shape[1:] != y.shape[1:] or (x.shape[0] != y.shape[0] and 1 not in (x.shape[0], y.shape[0])):
        raise ValueError(
            f"x and y must have the same (C, H, W) and the same number of images (or one of them 1), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x, y.to(x.device)


def gaussian_window(window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 2D Gaussian window ``w(i, j) ∝ exp(-((i - c)^2 + (j - c)^2) / (2 sigma^2))``."""
    check_int("window_size", window_size, low=1)
    if window_size % 2 == 0:
        raise ValueError(f"window_size must be odd, got {window_size!r}")
    check_real("sigma", sigma, low=0.0, low_open=True)
    offsets = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    g = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: ImageLike,
    y: ImageLike,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Mean structural similarity of each pair of images, as Wang et al. (2004).

    Args:
        x, y: ``(N, C, H, W)`` (or ``(H, W)``); a batch of one is compared with each of the other.
        data_range: ``L``, the span of the pixel values (1 for images in [0, 1]); > 0.
        window_size, sigma: the Gaussian window (odd size, no larger than the image).
        k1, k2: the stabilising constants' factors.

    Returns:
        ``(N,)`` float64: the SSIM map's mean over every channel and window position.

    Notes:
        With the Gaussian-weighted local statistics ``mu_x = w * x``,
        ``sigma_x^2 = w * x^2 - mu_x^2``, ``sigma_xy = w * (x y) - mu_x mu_y`` (valid positions only,
        population moments, as the authors' reference code) and ``C1 = (k1 L)^2``,
        ``C2 = (k2 L)^2``::

            SSIM(x, y) = mean over windows of
                (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

        It is 1 only for identical images and is symmetric. Channels are scored separately and
        averaged.

    References:
        1. Wang Z., Bovik A. C., Sheikh H. R., Simoncelli E. P., "Image quality assessment: from
           error visibility to structural similarity", IEEE Trans. Image Process. 13(4), 600-612
           (2004), Sec. III-B and III-C.

    Raises:
        ValueError: shapes that do not pair, non-finite values, ``data_range <= 0`` or an image
            smaller than the window.
    """
    x, y = _paired(x, y)
    data_range = check_real("data_range", data_range, low=0.0, low_open=True)
    check_real("k1", k1, low=0.0, low_open=True)
    check_real("k2", k2, low=0.0, low_open=True)
    window = gaussian_window(window_size, sigma).to(x.device)
    height, width = x.shape[-2:]
    if height < window_size or width < window_size:
        raise ValueError(f"images must be at least window_size={window_size} on each side, got {height}x{width}")
    channels = x.shape[1]
    kernel = window.expand(channels, 1, window_size, window_size)
    x, y = torch.broadcast_tensors(x, y)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).cpu().numpy()


def psnr(x: ImageLike, y: ImageLike, data_range: float) -> np.ndarray:
    """Peak signal-to-noise ratio of each pair, ``10 log10(L^2 / MSE(x, y))`` in dB.

    Args:
        x, y: ``(N, C, H, W)`` (or ``(H, W)``); a batch of one is compared with each of the other.
        data_range: ``L``, the span of the pixel values; > 0.

    Returns:
        ``(N,)`` float64; ``inf`` for identical images.
    """
    x, y = _paired(x, y)
    data_range = check_real("data_range", data_range, low=0.0, low_open=True)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse.cpu().numpy())


def prior_baseline(images: ImageLike, exclude: Union[int, Sequence[int]]) -> ImageLike:
    """The attacker's guess from the population alone: the mean image of the cases not excluded.

    Args:
        images: the site's cases, ``(N, C, H, W)``.
        exclude: the index (or indices) of the attacked case(s), left out of the mean.

    Returns:
        ``(1, C, H, W)``, a tensor or an array as ``images`` was (float64).

    Raises:
        ValueError: an index out of range, or no case left to average.
    """
    batch = as_image_batch("images", images)
    count = batch.shape[0]
    indices = [exclude] if not isinstance(exclude, (list, tuple, range, np.ndarray)) else list(exclude)
    for index in indices:
        check_int("exclude", int(index) if isinstance(index, np.integer) else index, low=0, high=count - 1)
    keep = torch.ones(count, dtype=torch.bool, device=batch.device)
    keep[torch.as_tensor([int(i) for i in indices], dtype=torch.long, device=batch.device)] = False
    if not bool(keep.any()):
        raise ValueError(f"exclude={exclude!r} leaves none of the {count} cases for the prior baseline")
    mean = batch[keep].mean(dim=0, keepdim=True)
    return mean.cpu().numpy() if isinstance(images, np.ndarray) else mean


@dataclass(frozen=True)
class Reidentification:
    """Which case each reconstruction is most similar to.

    Attributes:
        similarity: ``(M, N)`` SSIM of reconstruction ``m`` against candidate ``n``.
        best_match: ``(M,)`` the most similar candidate (the first on a tie).
        correct: ``(M,)`` whether that is the true case.
        rate: the fraction correct.
        chance: ``1 / N``, the rate of a guess.
    """

    similarity: np.ndarray
    best_match: np.ndarray
    correct: np.ndarray
    rate: float
    chance: float


def reidentification(
    reconstructions: ImageLike, candidates: ImageLike, true_indices: Sequence[int], data_range: float
) -> Reidentification:
    """For each reconstruction, is the candidate it is most similar to (by SSIM) the true case?

    Args:
        reconstructions: ``(M, C, H, W)``, one per attacked case.
        candidates: ``(N, C, H, W)``, all the site's cases (the true ones among them).
        true_indices: ``M`` indices into ``candidates``.
        data_range: the span of the pixel values, as :func:`ssim`.

    Notes:
        ``best(m) = argmax_n SSIM(x'_m, x_n)``; ``rate = mean_m 1[best(m) = true(m)]``, to be
        read against the rate ``1/N`` of picking a case at random.
    """
    recon = as_image_batch("reconstructions", reconstructions)
    cands = as_image_batch("candidates", candidates)
    truth = np.asarray(true_indices)
    if truth.shape != (recon.shape[0],) or not np.issubdtype(truth.dtype, np.integer):
        raise ValueError(f"true_indices must be {recon.shape[0]} ints (one per reconstruction), got {true_indices!r}")
    if truth.min() < 0 or truth.max() >= cands.shape[0]:
        raise ValueError(f"true_indices must lie in [0, {cands.shape[0] - 1}], got {true_indices!r}")
    if recon.shape[1:] != cands.shape[1:]:
        raise ValueError(f"reconstructions {tuple(recon.shape)} and candidates {tuple(cands.shape)} differ in (C, H, W)")
    similarity = np.stack([ssim(recon[m : m + 1], cands, data_range) for m in range(recon.shape[0])])
    best = similarity.argmax(axis=1)
    correct = best == truth
    return Reidentification(similarity, best, correct, float(correct.mean()), 1.0 / cands.shape[0])
