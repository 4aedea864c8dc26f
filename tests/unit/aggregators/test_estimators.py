"""The estimators' weight arithmetic: shares without overflow, results in the requested dtype."""

import math

import numpy as np
import pytest

from medflare.aggregators.estimators import combine, total_weight, weight_shares


@pytest.mark.parametrize(
    "weights, shares",
    [
        ([1e308, 1e308], [0.5, 0.5]),  # a naive sum is inf and every share 0
        ([1e308, 1e308, 1e308, 1e308], [0.25] * 4),
        ([5e-324, 5e-324], [0.5, 0.5]),  # subnormal weights
        ([1, 3], [0.25, 0.75]),
    ],
)
def test_weight_shares_sum_to_one_without_overflow(weights, shares):
    got = weight_shares(weights)
    np.testing.assert_allclose(got, shares, rtol=1e-15)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("weights", [[], [0.0, 1.0], [-1.0], [math.nan], [math.inf, 1.0]])
def test_weight_shares_refuse_non_positive_or_non_finite_weights(weights):
    with pytest.raises(ValueError, match="weights must be finite positive numbers"):
        weight_shares(weights)


def test_total_weight_is_exact_and_overflows_only_past_the_float_range():
    assert total_weight([0.1] * 10) == pytest.approx(1.0, abs=1e-15)
    assert total_weight([1e308, 1e308]) == math.inf
    assert total_weight([8e307, 8e307]) == pytest.approx(1.6e308)


def test_combine_computes_in_float64_and_returns_the_requested_dtype():
    # float16 inputs whose float16 sum would round: the mean is taken in float64
    updates = [{"w": np.array([2048.0, 1.0], np.float16)}, {"w": np.array([1.0, 2049.0], np.float32)}]
    out = combine(updates, [1.0, 1.0], dtypes={"w": "float32"})
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.array([1024.5, 1025.0], np.float32))
