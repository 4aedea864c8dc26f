import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medflare.privacy.percentile_sharing import share_largest_fraction
from medflare.privacy.update_checks import UnsafeUpdateError

finite = st.floats(-10, 10, allow_nan=False, width=32)
updates = st.dictionaries(
    st.sampled_from(["conv.weight", "conv.bias", "norm.weight", "head.weight"]),
    arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 7)), elements=finite),
    min_size=1,
)
fractions = st.floats(0.01, 1.0, exclude_min=False)


def _flat(update):
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in update.values()])


def _reference(update, fraction, gamma):
    """Plain sort-based reference: the k largest magnitudes, ties in tensor order, clipped."""
    values = _flat(update)
    k = min(values.size, int(round(fraction * values.size)))
    order = np.lexsort((np.arange(values.size), -np.abs(values)))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    kept = values if gamma is None else np.clip(values, -gamma, gamma)
    return np.where(mask, kept, 0.0), k


@settings(max_examples=150, deadline=None)
@given(updates, fractions, st.one_of(st.none(), st.floats(0.01, 20)))
def test_exactly_the_largest_fraction_is_shared_and_clipped(update, fraction, gamma):
    shared, summary = share_largest_fraction(update, fraction, gamma)
    expected, k = _reference(update, fraction, gamma)
    assert summary.num_total == expected.size and summary.num_shared == k
    for key in update:
        assert shared[key].shape == update[key].shape and shared[key].dtype == update[key].dtype
    np.testing.assert_allclose(_flat(shared), expected.astype(np.float32), rtol=0, atol=0)
    if gamma is not None:
        assert all(np.all(np.abs(s) <= np.float32(gamma)) for s in shared.values())


@settings(max_examples=60, deadline=None)
@given(updates, fractions)
def test_caller_arrays_are_never_modified(update, fraction):
    before = {k: v.copy() for k, v in update.items()}
    shared, _ = share_largest_fraction(update, fraction, 0.5)
    for key in update:
        np.testing.assert_array_equal(update[key], before[key])
        assert not np.shares_memory(shared[key], update[key])


def test_shares_the_k_largest_with_ties_broken_in_tensor_order():
    update = {"a": np.array([3.0, -1.0, 2.0, -3.0], np.float32), "b": np.array([[3.0, 0.5]], np.float32)}
    shared, summary = share_largest_fraction(update, 2 / 6, None)
    assert summary.num_shared == 2 and summary.threshold == 3.0
    np.testing.assert_array_equal(shared["a"], [3.0, 0.0, 0.0, -3.0])  # the third 3 (in "b") is dropped
    np.testing.assert_array_equal(shared["b"], [[0.0, 0.0]])


def test_torch_tensors_give_the_same_result_as_numpy():
    rng = np.random.default_rng(0)
    update = {f"w{i}": rng.standard_normal((8, 5)).astype(np.float32) for i in range(3)}
    shared_np, summary_np = share_largest_fraction(update, 0.25, 0.7)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in update.items()}
    shared_t, summary_t = share_largest_fraction(tensors, 0.25, 0.7)
    assert summary_np == summary_t
    for key in update:
        assert isinstance(shared_t[key], torch.Tensor)
        np.testing.assert_array_equal(shared_t[key].numpy(), shared_np[key])
        np.testing.assert_array_equal(tensors[key].numpy(), update[key])


def test_non_float_buffers_are_withheld():
    update = {"w": np.ones(10, np.float32), "bn.num_batches_tracked": np.array(42, np.int64)}
    shared, summary = share_largest_fraction(update, 1.0, None)
    assert summary.num_total == 10
    assert shared["bn.num_batches_tracked"].dtype == np.int64 and shared["bn.num_batches_tracked"] == 0
    np.testing.assert_array_equal(shared["w"], update["w"])


@pytest.mark.parametrize(
    "update, message",
    [
        ({}, "non-empty mapping"),
        (3.0, "non-empty mapping"),
        ({"w": 1.5}, "not a numpy array"),
        ({"w": np.array([1.0, np.nan], np.float32)}, "NaN or infinite"),
        ({"w": np.array([np.inf], np.float32)}, "NaN or infinite"),
        ({"w": torch.tensor([1.0, float("nan")])}, "NaN or infinite"),
        ({"w": np.zeros(0, np.float32)}, "no floating-point values"),
        ({"n": np.array([1, 2], np.int64)}, "no floating-point values"),
    ],
)
def test_unsafe_updates_are_refused(update, message):
    with pytest.raises(UnsafeUpdateError, match=message):
        share_largest_fraction(update, 0.1, 1.0)


@pytest.mark.parametrize(
    "fraction, gamma, error, message",
    [
        (0.0, 1.0, ValueError, r"fraction_shared must be in \(0.0, 1.0\], got 0.0"),
        (1.5, 1.0, ValueError, r"fraction_shared must be in \(0.0, 1.0\], got 1.5"),
        (math.nan, 1.0, ValueError, "fraction_shared must be a finite real number"),
        (True, 1.0, TypeError, "fraction_shared must be a real number .* got True"),
        ("0.1", 1.0, TypeError, "fraction_shared must be a real number"),
        (0.1, 0.0, ValueError, r"gamma must be in \(0.0, inf\), got 0.0"),
        (0.1, -1.0, ValueError, "gamma must be in"),
        (0.1, math.inf, ValueError, "gamma must be a finite real number"),
        (0.1, False, TypeError, "gamma must be a real number"),
    ],
)
def test_bad_arguments_are_refused_naming_argument_value_and_range(fraction, gamma, error, message):
    with pytest.raises(error, match=message):
        share_largest_fraction({"w": np.ones(3, np.float32)}, fraction, gamma)


@settings(max_examples=40, deadline=None)
@given(updates, fractions, st.one_of(st.none(), st.floats(0.01, 20)))
def test_accelerator_path_matches_the_reference(update, fraction, gamma):
    """The torch-only path (used for tensors on a GPU) run on CPU tensors, against the reference."""
    from medflare.privacy.percentile_sharing import _share_torch

    tensors = {k: torch.from_numpy(v.copy()) for k, v in update.items()}
    shared, summary = _share_torch(tensors, fraction, gamma)
    expected, k = _reference(update, fraction, gamma)
    assert summary.num_shared == k
    np.testing.assert_array_equal(_flat({key: v.numpy() for key, v in shared.items()}), expected.astype(np.float32))
