"""CKKS-encrypted updates (:mod:`medflare.transport.ckks_update`): the round trip a site and the
server make, and every hostile ciphertext the server can and cannot tell from an honest one.

Keys are NVFlare's ``HEBuilder`` defaults (degree 8192, moduli [60, 40, 40], scale 2^40), made
once per session by :mod:`tests.he_keys`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts

from medflare.transport.ckks_update import (
    CiphertextRejected,
    ciphertext_bytes,
    context_slots,
    decrypt_update,
    encrypt_update,
    encrypted_mean,
    load_context,
    max_ciphertext_bytes,
    read_ciphertexts,
)
from tests.he_keys import contexts, serialized_contexts

SHAPES = {"conv.weight": (4, 3), "conv.bias": (4,), "head.weight": (1, 4)}
SIZES = {name: math.prod(shape) for name, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def keys():
    """``(client context with the secret key, server context without it)``."""
    return contexts()


def _update(seed: int, scale: float = 0.1) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


def _weighted_mean(updates: list, weights: list) -> dict:
    total = float(sum(weights))
    return {name: sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights)) / total for name in SHAPES}


def _server_round(updates: list, weights: list, keys) -> dict:
    """Encrypt at each site, read and average at the server, serialize for the wire."""
    client, server = keys
    read = [read_ciphertexts(encrypt_update(u, client, w), server, SIZES) for u, w in zip(updates, weights)]
    return {name: vector.serialize() for name, vector in encrypted_mean(read, weights).items()}


# --- the round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[10, 30], [1, 1, 1], [3.5, 120, 7]], ids=["two-by-cases", "three-equal", "three-uneven"])
def test_the_encrypted_weighted_mean_decrypts_to_the_float64_weighted_mean(weights, keys):
    updates = [_update(seed) for seed in range(len(weights))]
    mean = decrypt_update(_server_round(updates, weights, keys), keys[0], shapes=SHAPES)
    expected = _weighted_mean(updates, weights)
    assert set(mean) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert mean[name].shape == shape and mean[name].dtype == np.float64
        np.testing.assert_allclose(mean[name], expected[name], rtol=0, atol=1e-6)


def test_decrypt_without_shapes_gives_flat_row_major_vectors(keys):
    update = _update(0)
    flat = decrypt_update(encrypt_update(update, keys[0]), keys[0])
    for name, value in update.items():
        assert flat[name].shape == (value.size,)
        np.testing.assert_allclose(flat[name], value.ravel(), atol=1e-6)


def test_a_tensor_larger_than_one_ciphertext_round_trips(keys):
    client, server = keys
    assert context_slots(server) == 4096
    values = np.linspace(-0.5, 0.5, 10_000).reshape(100, 100)
    encrypted = encrypt_update({"big": values}, client, weight=2.0)
    read = read_ciphertexts(encrypted, server, {"big": 10_000})
    assert read["big"].size() == 10_000
    mean = encrypted_mean([read], [2.0])
    out = decrypt_update({"big": mean["big"].serialize()}, client, shapes={"big": (100, 100)})
    np.testing.assert_allclose(out["big"], values, atol=1e-6)


def test_a_zero_dimensional_entry_round_trips(keys):
    client, server = keys
    encrypted = encrypt_update({"scale": np.array(0.25, np.float32), "bias": np.zeros(2)}, client)
    read = read_ciphertexts(encrypted, server, {"scale": 1, "bias": 2})
    out = decrypt_update({k: v.serialize() for k, v in read.items()}, client, shapes={"scale": (), "bias": (2,)})
    assert out["scale"].shape == ()
    assert out["scale"] == pytest.approx(0.25, abs=1e-6)


def test_integer_and_bool_entries_are_encrypted_as_numbers(keys):
    out = decrypt_update(encrypt_update({"steps": np.array([3, 4], np.int64), "flag": np.array([True, False])}, keys[0]), keys[0])
    np.testing.assert_allclose(out["steps"], [3, 4], atol=1e-6)
    np.testing.assert_allclose(out["flag"], [1, 0], atol=1e-6)


def test_the_weight_multiplies_before_encrypting(keys):
    update = {"w": np.array([0.1, -0.2, 0.3])}
    out = decrypt_update(encrypt_update(update, keys[0], weight=40), keys[0])
    np.testing.assert_allclose(out["w"], [4.0, -8.0, 12.0], atol=1e-6)


def test_the_input_update_is_not_modified(keys):
    update = _update(3)
    before = {k: v.copy() for k, v in update.items()}
    encrypt_update(update, keys[0], weight=7)
    for name in update:
        np.testing.assert_array_equal(update[name], before[name])


def test_load_context_reads_what_provisioning_writes():
    client_bytes, server_bytes = serialized_contexts()
    client, server = load_context(client_bytes), load_context(server_bytes)
    assert client.has_secret_key() and not server.has_secret_key()
    assert context_slots(client) == context_slots(server) == 4096


@pytest.mark.parametrize("num_values", [1, 10, 4096, 4097, 10_000])
def test_max_ciphertext_bytes_bounds_real_ciphertexts(num_values, keys):
    client, server = keys
    values = np.full(num_values, 0.123)
    fresh = encrypt_update({"x": values}, client)["x"]
    limit = max_ciphertext_bytes(server, num_values)
    assert len(fresh) <= limit
    # after the server's rescaling the ciphertext only shrinks
    mean = encrypted_mean([read_ciphertexts({"x": fresh}, server, {"x": num_values})], [3.0])
    assert len(mean["x"].serialize()) <= len(fresh)
    assert ciphertext_bytes({"x": fresh}) == len(fresh) and ciphertext_bytes(mean) == len(mean["x"].serialize())


def test_max_ciphertext_bytes_grows_with_the_ciphertexts_needed(keys):
    server = keys[1]
    assert max_ciphertext_bytes(server, 1) == max_ciphertext_bytes(server, 4096)
    assert max_ciphertext_bytes(server, 4097) == 2 * max_ciphertext_bytes(server, 4096)


# --- what the server refuses ---------------------------------------------------------------------


def _other_parameters_ciphertext(num_values: int) -> bytes:
    small = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    small.global_scale = 2**20
    return ts.ckks_vector(small, np.zeros(num_values)).serialize()


@pytest.fixture(scope="module")
def honest(keys):
    return encrypt_update(_update(0), keys[0])


def _replace(name, value):
    def build(honest):
        data = dict(honest)
        data[name] = value(honest) if callable(value) else value
        return data

    return build


HOSTILE = {
    # (builds the data from an honest contribution, expected message)
    "not-a-mapping": (lambda h: list(h.values()), "must be a mapping"),
    "missing-name": (lambda h: {k: v for k, v in h.items() if k != "conv.bias"}, r"missing \['conv.bias'\]"),
    "extra-name": (lambda h: {**h, "extra.weight": h["conv.bias"]}, r"unexpected \['extra.weight'\]"),
    "str-instead-of-bytes": (_replace("conv.bias", "AAAA"), "'conv.bias' is str"),
    "ndarray-instead-of-bytes": (_replace("conv.bias", np.zeros(4)), "'conv.bias' is ndarray"),
    "none-instead-of-bytes": (_replace("conv.bias", None), "'conv.bias' is NoneType"),
    "list-of-floats": (_replace("conv.bias", [0.0, 0.0, 0.0, 0.0]), "'conv.bias' is list"),
    "truncated-bytes": (_replace("conv.bias", lambda h: h["conv.bias"][: len(h["conv.bias"]) // 2]), "'conv.bias' is not a CKKS vector"),
    "random-bytes": (_replace("conv.bias", np.random.default_rng(0).bytes(2000)), "'conv.bias' is not a CKKS vector"),
    "too-many-bytes": (_replace("conv.bias", lambda h: h["conv.bias"] + bytes(400_000)), r"'conv.bias' is \d+ bytes; a CKKS vector of 4 values takes at most"),
    "other-ckks-parameters": (_replace("conv.bias", lambda h: _other_parameters_ciphertext(4)), "'conv.bias' is not a CKKS vector under the federation's parameters"),
    "wrong-number-of-values": (lambda h: {**h, "conv.weight": h["conv.bias"], "conv.bias": h["conv.weight"]}, "'conv.weight' holds 4 values, the model's parameter has 12"),
    "empty-bytes": (_replace("conv.bias", b""), "'conv.bias' holds 0 values"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_read_ciphertexts_refuses_what_does_not_fit_naming_the_entry(case, honest, keys):
    build, message = HOSTILE[case]
    with pytest.raises(CiphertextRejected, match=message):
        read_ciphertexts(build(honest), keys[1], SIZES)


def test_read_ciphertexts_accepts_the_honest_contribution_and_bytearrays(honest, keys):
    read = read_ciphertexts({k: bytearray(v) for k, v in honest.items()}, keys[1], SIZES)
    assert {k: v.size() for k, v in read.items()} == SIZES


def test_a_ciphertext_under_another_secret_key_with_the_same_parameters_is_accepted_the_server_cannot_tell(keys):
    # the documented limit: without the key the server sees sizes and parameters, never whose key
    client, server = keys
    stranger = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40], encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC
    )
    stranger.global_scale = 2**40
    data = encrypt_update(_update(0), stranger)
    read = read_ciphertexts(data, server, SIZES)
    assert {k: v.size() for k, v in read.items()} == SIZES
    # ... and the federation's key decrypts it to garbage, not to the stranger's values
    garbage = decrypt_update({k: v.serialize() for k, v in read.items()}, client)
    assert not np.allclose(garbage["conv.weight"], _update(0)["conv.weight"].ravel(), atol=1e-3)


# --- what a site refuses to encrypt --------------------------------------------------------------


@pytest.mark.parametrize(
    "update, message",
    [
        ({"w": np.array([0.1, np.nan])}, "'w' holds NaN or infinite"),
        ({"w": np.array([0.1, np.inf])}, "'w' holds NaN or infinite"),
        ({"w": np.array([-np.inf])}, "'w' holds NaN or infinite"),
        ({}, "nothing to encrypt"),
        ([("w", np.ones(2))], "nothing to encrypt: the update is list"),
        ({"w": np.zeros(0)}, r"'w' is not a non-empty numeric array \(float64, 0 values\)"),
        ({"w": np.array([1.0, "x"], dtype=object)}, "'w' is not a non-empty numeric array"),
        ({"w": np.array(["0.1", "0.2"])}, "'w' is not a non-empty numeric array"),
        ({"w": np.array([1 + 2j])}, "'w' is not a non-empty numeric array"),
        ({"ok": np.ones(2), "w": np.array([np.nan])}, "'w' holds NaN"),
    ],
    ids=["nan", "inf", "-inf", "empty-mapping", "not-a-mapping", "empty-array", "object-array", "str-array", "complex", "second-entry-nan"],
)
def test_encrypt_update_refuses_what_is_not_a_finite_numeric_update(update, message, keys):
    with pytest.raises(ValueError, match=message):
        encrypt_update(update, keys[0])


@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5, float("nan"), float("inf"), True, False, "2", None])
def test_encrypt_update_refuses_a_weight_that_is_not_a_positive_finite_number(weight, keys):
    with pytest.raises(ValueError, match="weight must be a positive finite number"):
        encrypt_update({"w": np.ones(2)}, keys[0], weight=weight)


def test_encrypt_update_refuses_weighted_values_ckks_cannot_encode(keys):
    # finite before weighting, too large for scale 2^40 after: refused, never wrapped around
    with pytest.raises(ValueError, match="too large"):
        encrypt_update({"w": np.array([1.0])}, keys[0], weight=1e300)


def test_encrypted_mean_refuses_mismatched_lengths_and_a_zero_total(honest, keys):
    read = read_ciphertexts(honest, keys[1], SIZES)
    with pytest.raises(ValueError, match="2 contributions and 1 weights"):
        encrypted_mean([read, read], [1.0])
    with pytest.raises(ValueError, match="0 contributions and 0 weights"):
        encrypted_mean([], [])
    with pytest.raises(ValueError, match="not a positive finite number"):
        encrypted_mean([read, read], [0.0, 0.0])
    with pytest.raises(ValueError, match="not a positive finite number"):
        encrypted_mean([read, read], [1.0, -1.0])
    with pytest.raises(ValueError, match="not a positive finite number"):
        encrypted_mean([read], [float("nan")])


def test_decrypt_update_decrypts_ckks_vectors_with_the_given_context(honest, keys):
    client, server = keys
    mean = encrypted_mean([read_ciphertexts(honest, server, SIZES)], [1.0])  # vectors of the server's context
    out = decrypt_update(mean, client, shapes=SHAPES)
    np.testing.assert_allclose(out["conv.bias"], _update(0)["conv.bias"], atol=1e-6)


def _off_standard_ciphertext(kind: str, client, num_values: int) -> bytes:
    """A well-formed ciphertext of the federation's parameters and size that cannot be added to
    a fresh one: at another scale, or already multiplied and rescaled to a lower level."""
    values = np.full(num_values, 0.01)
    if kind == "other-scale":
        return ts.ckks_vector(client, values, scale=2**30).serialize()
    return (ts.ckks_vector(client, values) * 1.0).serialize()  # "lower-level"


@pytest.mark.parametrize("kind", ["other-scale", "lower-level"])
def test_read_ciphertexts_refuses_a_ciphertext_that_cannot_be_added(kind, honest, keys):
    client, server = keys
    with pytest.raises(CiphertextRejected, match="conv.bias"):
        read_ciphertexts({**honest, "conv.bias": _off_standard_ciphertext(kind, client, 4)}, server, SIZES)
