"""SSIM, PSNR, the prior baseline and re-identification on small constructed images."""

import math

import numpy as np
import pytest
import torch

from medflare.attacks.image_scores import gaussian_window, prior_baseline, psnr, reidentification, ssim


def brute_force_ssim(x: np.ndarray, y: np.ndarray, data_range: float, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. (2004) written out with loops: Gaussian-weighted means, variances and covariance
    over every window lying wholly inside the (H, W) image, then the mean of the SSIM map."""
    c = (size - 1) / 2
    w = np.array([[math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma**2)) for j in range(size)] for i in range(size)])
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for top in range(x.shape[0] - size + 1):
        for left in range(x.shape[1] - size + 1):
            px, py = x[top : top + size, left : left + size], y[top : top + size, left : left + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_of_an_image_with_itself_is_one():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ssim(images, images, 1.0), [1.0, 1.0], atol=1e-12)
    single = np.random.default_rng(0).random((12, 12)) * 255
    np.testing.assert_allclose(ssim(single, single, 255.0), [1.0], atol=1e-12)


def test_ssim_falls_as_noise_grows_and_is_symmetric():
    rng = np.random.default_rng(1)
    clean = np.clip(np.add.outer(np.linspace(0, 1, 24), np.linspace(0, 0.5, 24)) / 1.5, 0, 1)
    scores = [ssim(clean, clean + rng.normal(0, s, clean.shape), 1.0)[0] for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    noisy = clean + rng.normal(0, 0.1, clean.shape)
    np.testing.assert_allclose(ssim(clean, noisy, 1.0), ssim(noisy, clean, 1.0), rtol=1e-12)


@pytest.mark.parametrize("shape,window,sigma,data_range", [((12, 13), 11, 1.5, 1.0), ((7, 6), 3, 0.8, 2.0)])
def test_ssim_matches_the_formula_written_out(shape, window, sigma, data_range):
    rng = np.random.default_rng(2)
    x = rng.random(shape) * data_range
    y = np.clip(x + rng.normal(0, 0.2 * data_range, shape), 0, data_range)
    expected = brute_force_ssim(x, y, data_range, window, sigma)
    assert ssim(x, y, data_range, window_size=window, sigma=sigma)[0] == pytest.approx(expected, rel=1e-10)


def test_ssim_averages_channels_and_compares_a_batch_of_one_with_each_image():
    rng = np.random.default_rng(3)
    x = rng.random((1, 2, 11, 11))
    ys = rng.random((3, 2, 11, 11))
    expected = [np.mean([brute_force_ssim(x[0, c], ys[n, c], 1.0) for c in range(2)]) for n in range(3)]
    np.testing.assert_allclose(ssim(x, ys, 1.0), expected, rtol=1e-10)


def test_gaussian_window_is_normalised_and_symmetric():
    w = gaussian_window(11, 1.5)
    assert float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(w, w.T)
    assert w.argmax() == 5 * 11 + 5


@pytest.mark.parametrize(
    "x,y,data_range,kwargs,error,message",
    [
        (np.zeros((12, 12)), np.zeros((12, 13)), 1.0, {}, ValueError, "same"),
        (np.zeros((2, 1, 12, 12)), np.zeros((3, 1, 12, 12)), 1.0, {}, ValueError, "same number of images"),
        (np.full((12, 12), np.nan), np.zeros((12, 12)), 1.0, {}, ValueError, "x must be finite"),
        (np.zeros((12, 12)), np.full((12, 12), np.inf), 1.0, {}, ValueError, "y must be finite"),
        (np.zeros((1, 12, 12)), np.zeros((1, 12, 12)), 1.0, {}, ValueError, r"\(N, C, H, W\) or \(H, W\)"),
        (np.zeros((12, 12)), np.zeros((12, 12)), 0.0, {}, ValueError, r"data_range must be in \(0.0, inf\), got 0.0"),
        (np.zeros((12, 12)), np.zeros((12, 12)), -1.0, {}, ValueError, "data_range"),
        (np.zeros((12, 12)), np.zeros((12, 12)), float("nan"), {}, ValueError, "data_range must be a finite"),
        (np.zeros((12, 12)), np.zeros((12, 12)), True, {}, TypeError, "data_range"),
        (np.zeros((10, 12)), np.zeros((10, 12)), 1.0, {}, ValueError, "at least window_size=11"),
        (np.zeros((12, 12)), np.zeros((12, 12)), 1.0, {"window_size": 4}, ValueError, "window_size must be odd"),
        (np.zeros((12, 12)), np.zeros((12, 12)), 1.0, {"sigma": 0.0}, ValueError, "sigma"),
        ([[0.0]], np.zeros((12, 12)), 1.0, {}, TypeError, "x must be a torch.Tensor or numpy array"),
    ],
)
def test_ssim_refuses_bad_inputs(x, y, data_range, kwargs, error, message):
    with pytest.raises(error, match=message):
        ssim(x, y, data_range, **kwargs)


def test_psnr_is_ten_log10_of_peak_squared_over_mse():
    x = np.zeros((2, 1, 4, 4))
    y = np.stack([np.full((1, 4, 4), 0.1), np.full((1, 4, 4), 0.5)])
    np.testing.assert_allclose(psnr(x, y, 1.0), [20.0, 10 * math.log10(1 / 0.25)])
    assert psnr(x, y, 255.0)[0] == pytest.approx(10 * math.log10(255.0**2 / 0.01))
    assert psnr(y, y, 1.0).tolist() == [math.inf, math.inf]
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, y, 0)


def test_prior_baseline_is_the_mean_of_the_other_cases():
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    torch.testing.assert_close(prior_baseline(images, 1), torch.full((1, 1, 2, 2), (0 + 2 + 3) / 3, dtype=torch.float64))
    baseline = prior_baseline(images.numpy(), [0, 3])
    assert isinstance(baseline, np.ndarray) and np.allclose(baseline, 1.5)
    with pytest.raises(ValueError, match=r"exclude must be an int in \[0, 3\], got 4"):
        prior_baseline(images, 4)
    with pytest.raises(ValueError, match="leaves none of the 1 cases"):
        prior_baseline(images[:1], 0)


def _distinct_cases():
    """Four 12x12 cases that differ in structure: stripes, checks, a square, a gradient."""
    i, j = np.mgrid[0:12, 0:12]
    return np.stack([(i // 2) % 2, (i // 3 + j // 3) % 2, ((3 < i) & (i < 9) & (3 < j) & (j < 9)), j / 11.0]).astype(float)[:, None]


def test_reidentification_finds_the_true_case_of_noisy_copies():
    cases = _distinct_cases()
    rng = np.random.default_rng(4)
    reconstructions = cases[[2, 0, 3]] + rng.normal(0, 0.05, (3, 1, 12, 12))
    result = reidentification(reconstructions, cases, [2, 0, 3], data_range=1.0)
    assert result.best_match.tolist() == [2, 0, 3]
    assert result.correct.tolist() == [True, True, True] and result.rate == 1.0
    assert result.chance == 0.25 and result.similarity.shape == (3, 4)


def test_reidentification_counts_a_reconstruction_closer_to_another_case_as_a_miss():
    cases = _distinct_cases()
    # attacked case 1, but the "reconstruction" looks like case 0 (and one like case 3)
    result = reidentification(cases[[0, 3]], cases, [1, 3], data_range=1.0)
    assert result.best_match.tolist() == [0, 3]
    assert result.correct.tolist() == [False, True] and result.rate == 0.5


@pytest.mark.parametrize(
    "truth,message", [([0], "2 ints"), ([0, 4], r"\[0, 3\]"), ([0.0, 1.0], "2 ints"), ([-1, 0], r"\[0, 3\]")]
)
def test_reidentification_refuses_bad_true_indices(truth, message):
    cases = _distinct_cases()
    with pytest.raises(ValueError, match=message):
        reidentification(cases[:2], cases, truth, 1.0)
