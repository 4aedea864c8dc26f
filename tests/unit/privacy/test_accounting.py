import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from medflare.privacy.accounting import epsilon_spent, noise_multiplier_for


@pytest.mark.parametrize(
    "z, rounds, expected",
    [(1.0, 100, 96.1163), (2.4, 20, 9.8416)],  # Opacus 1.6 RDP at delta 1e-5, sampling rate 1 (FACTS.md)
)
def test_fixed_epsilon_values(z, rounds, expected):
    assert epsilon_spent([(z, rounds)], 1e-5) == pytest.approx(expected, rel=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 10), st.integers(1, 200), st.sampled_from([1e-5, 1e-6, 1e-3]))
def test_epsilon_equals_opacus(z, rounds, delta):
    rdp = RDPAccountant()
    rdp.history = [(z, 1.0, rounds)]
    assert epsilon_spent([(z, rounds)], delta, "rdp") == pytest.approx(rdp.get_epsilon(delta=delta))


def test_prv_equals_opacus_and_is_tighter_than_rdp():
    prv = PRVAccountant()
    prv.history = [(2.4, 1.0, 20)]
    ours = epsilon_spent([(2.4, 20)], 1e-5, "prv")
    assert ours == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-6)
    assert ours < epsilon_spent([(2.4, 20)], 1e-5, "rdp")


@settings(max_examples=20, deadline=None)
@given(st.floats(0.5, 5), st.integers(1, 50), st.integers(1, 50))
def test_composition_grows_with_releases_and_is_order_free(z, a, b):
    one = epsilon_spent([(z, a)], 1e-5)
    both = epsilon_spent([(z, a), (2 * z, b)], 1e-5)
    assert both > one
    assert both == pytest.approx(epsilon_spent([(2 * z, b), (z, a)], 1e-5))


@pytest.mark.parametrize("target, rounds", [(1.0, 10), (10.0, 10), (8.0, 100)])
def test_solved_noise_multiplier_meets_the_target(target, rounds):
    z = noise_multiplier_for(target, 1e-5, rounds)
    spent = epsilon_spent([(z, rounds)], 1e-5)
    assert spent <= target * 1.0001
    assert spent >= target * 0.98  # tight: no needless noise


def test_no_release_costs_nothing():
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent([(1.0, 0)], 1e-5) == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: epsilon_spent([(1.0, 1)], 0.0), "delta must be in"),
        (lambda: epsilon_spent([(1.0, 1)], 1e-5, "gdp"), "accountant must be one of"),
        (lambda: epsilon_spent([(0.0, 1)], 1e-5), "noise_multiplier must be in"),
        (lambda: noise_multiplier_for(math.nan, 1e-5, 10), "target_epsilon must be a finite"),
        (lambda: noise_multiplier_for(1.0, 1e-5, 0), "num_releases must be an int"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
