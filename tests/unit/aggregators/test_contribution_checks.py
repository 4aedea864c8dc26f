"""The pure checks of one contribution: round, weight, and values in the model's dtype."""

import math

import numpy as np
import pytest

from medflare.aggregators.contribution_checks import (
    ContributionRejected,
    check_round,
    check_weight,
    checked_contribution,
    model_spec,
)

SPEC = model_spec({"w": np.zeros((2, 2), np.float32), "n": np.array(0, np.int64), "b": np.zeros(2, bool)})


def _update(**changes):
    update = {"w": np.ones((2, 2), np.float32), "n": np.array(3, np.int64), "b": np.array([True, False])}
    update.update(changes)
    return update


@pytest.mark.parametrize(
    "contribution_round, current_round, message",
    [
        (None, 1, "CONTRIBUTION_ROUND cookie is missing"),
        (1, None, "the server has no current round"),
        (1, "1", r"the server's current round is '1' \(str\), not an int"),
        ("1", 1, r"its round '1' \(str\) is not an int"),
        (True, 1, r"its round True \(bool\) is not an int"),
        (1.0, 1, r"its round 1.0 \(float\) is not an int"),
        (np.bool_(True), 1, r"is not an int"),
        (0, 1, "it is for round 0, the current round is 1"),
    ],
)
def test_bad_rounds_are_refused(contribution_round, current_round, message):
    with pytest.raises(ContributionRejected, match=message):
        check_round(contribution_round, current_round)


def test_an_int_round_of_any_integral_type_is_accepted():
    assert check_round(np.int64(4), 4) == 4


@pytest.mark.parametrize(
    "weight, message",
    [
        (0, "is not a positive number"),
        (-1, "is not a positive number"),
        (math.nan, "is not a positive number"),
        (math.inf, "is not a positive number"),
        (True, r"\(bool\) is not a positive number"),
        ("5", r"\(str\) is not a positive number"),
        (np.array(5.0), r"\(ndarray\) is not a positive number"),
        (101, "exceeds max_weight 100"),
    ],
)
def test_bad_weights_are_refused(weight, message):
    with pytest.raises(ContributionRejected, match=message):
        check_weight(weight, "k", max_weight=100)


@pytest.mark.parametrize("weight", [1, 100, 2.5, np.float64(3.0), np.int64(7)])
def test_good_weights_are_floats(weight):
    assert check_weight(weight, "k", max_weight=100) == float(weight)


def test_floating_entries_are_checked_after_the_cast():
    cast, norm = checked_contribution(_update(w=np.full((2, 2), 0.5, np.float64)), SPEC)
    assert cast["w"].dtype == np.float32 and norm == pytest.approx(1.0)
    with pytest.raises(ContributionRejected, match=r"'w' holds values outside the range of the model's dtype float32 \(largest magnitude 1e\+300"):
        checked_contribution(_update(w=np.full((2, 2), 1e300)), SPEC)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n": np.array(3, np.int32)}, "'n' has dtype int32, the model has int64"),
        ({"n": np.array(3.0)}, "'n' has dtype float64, the model has int64"),
        ({"b": np.array([1, 0], np.uint8)}, "'b' has dtype uint8, the model has bool"),
        ({"b": np.array([1.0, 0.0], np.float32)}, "'b' has dtype float32, the model has bool"),
        ({"w": np.ones((2, 2), bool)}, "'w' has dtype bool, the model has float32"),
    ],
)
def test_integer_and_bool_entries_must_match_exactly(changes, message):
    with pytest.raises(ContributionRejected, match=message):
        checked_contribution(_update(**changes), SPEC)


def test_the_norm_bound_counts_only_floating_entries():
    _, norm = checked_contribution(_update(n=np.array(10**9, np.int64)), SPEC, max_norm=2.0)
    assert norm == pytest.approx(2.0)
    with pytest.raises(ContributionRejected, match="update norm 2 exceeds max_update_norm 1.5"):
        checked_contribution(_update(), SPEC, max_norm=1.5)
