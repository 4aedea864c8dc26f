import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medflare.privacy.gaussian_mechanism import gaussian_release, l2_norm
from medflare.privacy.noise_sources import SecureGaussianNoise, SeededGaussianNoise, make_noise_source
from medflare.privacy.update_checks import UnsafeUpdateError

updates = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    arrays(np.float32, st.integers(1, 50), elements=st.floats(-100, 100, allow_nan=False, width=32)),
    min_size=1,
)


@settings(max_examples=100, deadline=None)
@given(updates, st.floats(0.01, 50))
def test_clipping_bounds_the_norm_and_leaves_small_updates_alone(update, clipping_norm):
    tiny_noise = 1e-9
    before = {k: v.copy() for k, v in update.items()}
    released, info = gaussian_release(update, clipping_norm, tiny_noise, SeededGaussianNoise(0))
    norm = l2_norm(update)
    assert info.l2_norm == pytest.approx(norm, rel=1e-6)
    assert l2_norm(released) <= clipping_norm * (1 + 1e-5) + 1e-6
    if norm <= clipping_norm:
        for k in update:
            np.testing.assert_allclose(released[k], update[k], atol=1e-6 * max(clipping_norm, 1))
    else:
        assert info.clip_factor == pytest.approx(clipping_norm / norm, rel=1e-6)
        assert l2_norm(released) == pytest.approx(clipping_norm, rel=1e-4)
    for k in update:  # the caller's arrays are untouched
        np.testing.assert_array_equal(update[k], before[k])


@pytest.mark.parametrize("source", [SeededGaussianNoise(3), SecureGaussianNoise()], ids=["seeded", "secure"])
def test_empirical_noise_standard_deviation_is_multiplier_times_norm(source):
    update = {"w": np.zeros((400, 500), np.float32), "b": np.zeros(100_000, np.float32)}
    released, info = gaussian_release(update, clipping_norm=0.5, noise_multiplier=1.7, noise=source)
    samples = np.concatenate([released["w"].ravel(), released["b"].ravel()]).astype(np.float64)
    assert info.noise_std == pytest.approx(0.85)
    assert samples.std() == pytest.approx(0.85, rel=0.01)  # 300k samples: std error ~0.13%
    assert abs(samples.mean()) < 0.01
    # Gaussian tails: 4-sigma exceedances close to 2 * (1 - Phi(4)) = 6.3e-5
    assert np.mean(np.abs(samples) > 4 * 0.85) < 3e-4


def test_seeded_noise_is_reproducible_and_secure_noise_is_not():
    update = {"w": np.ones(1000, np.float32)}
    a, _ = gaussian_release(update, 1.0, 1.0, make_noise_source(7))
    b, _ = gaussian_release(update, 1.0, 1.0, make_noise_source(7))
    c, _ = gaussian_release(update, 1.0, 1.0, make_noise_source(None))
    d, _ = gaussian_release(update, 1.0, 1.0, make_noise_source(None))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert not np.array_equal(c["w"], d["w"])
    assert make_noise_source(None).cryptographically_secure and not make_noise_source(7).cryptographically_secure


def test_non_float_entries_are_withheld_and_tensors_stay_tensors():
    update = {"w": torch.ones(5), "count": torch.tensor(9)}
    released, _ = gaussian_release(update, 10.0, 0.1, SeededGaussianNoise(0))
    assert isinstance(released["w"], torch.Tensor) and released["w"].dtype == torch.float32
    assert int(released["count"]) == 0
    assert torch.equal(update["w"], torch.ones(5))


@pytest.mark.parametrize(
    "update, message",
    [
        ({}, "non-empty mapping"),
        (1.0, "non-empty mapping"),
        ({"w": np.array([np.nan], np.float32)}, "NaN or infinite"),
        ({"w": np.array([1, 2])}, "no floating-point values"),
    ],
)
def test_unsafe_updates_are_refused_before_noise(update, message):
    class Exploding(SeededGaussianNoise):
        def fill(self, out, chunk=1 << 20):
            raise AssertionError("noise must not be drawn")

    with pytest.raises(UnsafeUpdateError, match=message):
        gaussian_release(update, 1.0, 1.0, Exploding(0))


@pytest.mark.parametrize(
    "clip, z, message",
    [
        (0.0, 1.0, "clipping_norm must be in"),
        (math.nan, 1.0, "clipping_norm must be a finite"),
        (1.0, -1.0, "noise_multiplier must be in"),
        (1.0, math.inf, "noise_multiplier must be a finite"),
    ],
)
def test_bad_arguments_are_refused(clip, z, message):
    with pytest.raises(ValueError, match=message):
        gaussian_release({"w": np.ones(2, np.float32)}, clip, z, SeededGaussianNoise(0))
