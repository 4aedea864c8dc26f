"""Distributed Gaussian noise (:mod:`medflare.privacy.distributed_dp`): the shares, their sum, and
what an observer who pools some of the noises is left with."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medflare.privacy.distributed_dp import noise_multiplier_against, site_noise_multiplier, sum_noise_multiplier

multipliers = st.floats(0.01, 50, allow_nan=False, allow_infinity=False)
site_counts = st.integers(2, 200)


@pytest.mark.parametrize("z, n, expected", [(2.4, 3, 2.4 / math.sqrt(3)), (1.0, 4, 0.5), (3.0, 9, 1.0), (2.4, 2, 2.4 / math.sqrt(2))])
def test_each_site_adds_z_over_sqrt_n(z, n, expected):
    assert site_noise_multiplier(z, n) == pytest.approx(expected, rel=1e-12)


def test_the_research_scope_share_is_1_386():
    # site_configs/research/privacy.json, secure_distributed_dp: z = 2.4, N = 3
    assert site_noise_multiplier(2.4, 3) == pytest.approx(1.3856, abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(multipliers, site_counts)
def test_the_sum_of_n_shares_has_multiplier_z(z, n):
    share = site_noise_multiplier(z, n)
    assert math.sqrt(n * share**2) == pytest.approx(z, rel=1e-12)  # variances add
    assert sum_noise_multiplier(z, n, n) == pytest.approx(z, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_the_sum_of_n_sampled_shares_has_standard_deviation_z_c(n):
    z, clipping_norm, draws = 2.4, 0.5, 200_000
    rng = np.random.default_rng(n)
    shares = rng.normal(0.0, site_noise_multiplier(z, n) * clipping_norm, size=(n, draws))
    assert np.std(shares.sum(axis=0)) == pytest.approx(z * clipping_norm, rel=0.02)
    # one share alone is sqrt(N) weaker than the sum
    assert np.std(shares[0]) == pytest.approx(z * clipping_norm / math.sqrt(n), rel=0.02)


@settings(max_examples=50, deadline=None)
@given(multipliers, site_counts, st.data())
def test_fewer_sites_in_the_sum_give_z_sqrt_k_over_n(z, n, data):
    k = data.draw(st.integers(1, n))
    assert sum_noise_multiplier(z, n, k) == pytest.approx(z * math.sqrt(k / n), rel=1e-12)
    assert sum_noise_multiplier(z, n, k) <= z * (1 + 1e-12)


def test_more_sites_than_n_add_noise():
    assert sum_noise_multiplier(2.4, 3, 6) == pytest.approx(2.4 * math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize(
    "observers, expected",
    [(0, 2.4), (1, 2.4 * math.sqrt(2 / 3)), (2, 2.4 * math.sqrt(1 / 3))],
    ids=["the-server", "one-curious-site", "two-colluding-sites"],
)
def test_observers_who_pool_their_noises_leave_z_sqrt_k_minus_c_over_n(observers, expected):
    assert noise_multiplier_against(2.4, 3, 3, observers) == pytest.approx(expected, rel=1e-12)


def test_the_research_scope_against_another_site_is_1_96():
    # the scope's description: "Against another site ... 2.4 sqrt(2/3) = 1.96"
    assert noise_multiplier_against(2.4, 3, 3, 1) == pytest.approx(1.96, abs=0.005)


@settings(max_examples=50, deadline=None)
@given(multipliers, site_counts, st.data())
def test_more_observers_never_leave_more_noise(z, n, data):
    k = data.draw(st.integers(2, n + 5))
    values = [noise_multiplier_against(z, n, k, c) for c in range(k)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(sum_noise_multiplier(z, n, k), rel=1e-12)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: site_noise_multiplier(2.4, 1), ValueError, r"num_sites must be an int in \[2, inf\], got 1"),
        (lambda: site_noise_multiplier(2.4, 0), ValueError, "num_sites must be an int"),
        (lambda: site_noise_multiplier(2.4, True), TypeError, r"num_sites must be an int .* got True \(bool\)"),
        (lambda: site_noise_multiplier(2.4, 3.0), TypeError, r"num_sites must be an int .* got 3.0 \(float\)"),
        (lambda: site_noise_multiplier(2.4, "3"), TypeError, "num_sites must be an int"),
        (lambda: site_noise_multiplier(0.0, 3), ValueError, r"noise_multiplier must be in \(0.0, inf\), got 0.0"),
        (lambda: site_noise_multiplier(-1.0, 3), ValueError, "noise_multiplier must be in"),
        (lambda: site_noise_multiplier(float("nan"), 3), ValueError, "noise_multiplier must be a finite"),
        (lambda: site_noise_multiplier(float("inf"), 3), ValueError, "noise_multiplier must be a finite"),
        (lambda: site_noise_multiplier(True, 3), TypeError, "noise_multiplier must be a real number"),
        (lambda: site_noise_multiplier(None, 3), TypeError, "noise_multiplier must be a real number"),
        (lambda: sum_noise_multiplier(2.4, 3, 0), ValueError, r"sites_in_sum must be an int in \[1, inf\], got 0"),
        (lambda: sum_noise_multiplier(2.4, 3, True), TypeError, "sites_in_sum must be an int"),
        (lambda: noise_multiplier_against(2.4, 3, 3, 3), ValueError, r"observers_in_sum \(3\) must be fewer than sites_in_sum \(3\)"),
        (lambda: noise_multiplier_against(2.4, 3, 2, 5), ValueError, r"observers_in_sum \(5\) must be fewer"),
        (lambda: noise_multiplier_against(2.4, 3, 3, -1), ValueError, r"observers_in_sum must be an int in \[0, inf\]"),
        (lambda: noise_multiplier_against(2.4, 3, 3, True), TypeError, "observers_in_sum must be an int"),
        (lambda: noise_multiplier_against(2.4, 1, 3, 0), ValueError, "num_sites must be an int"),
    ],
    ids=[
        "one-site", "zero-sites", "sites-bool", "sites-float", "sites-str", "z-zero", "z-negative", "z-nan", "z-inf",
        "z-bool", "z-none", "sum-of-none", "sum-bool", "observers-are-all", "observers-more-than-sum",
        "observers-negative", "observers-bool", "against-one-site",
    ],
)
def test_arguments_are_refused_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
