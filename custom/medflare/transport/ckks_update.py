"""CKKS-encrypted model updates: what a site encrypts, what the server can check and add, what a site decrypts.

Notes:
    CKKS (Cheon, Kim, Kim and Song 2017 [1]) encrypts a vector of reals so that ciphertexts can
    be added, and multiplied by plaintext scalars, without the secret key. medflare uses it as
    NVFlare 2.9 does (``nvflare/app_opt/he``), through TenSEAL [2]: ``nvflare provision`` with
    the ``HEBuilder`` (``nvflare poc prepare -he``) writes one CKKS context with the secret key
    to every client's startup kit (``client_context.tenseal``) and the same context *without*
    it to the server's (``server_context.tenseal``). The layout on the wire is NVFlare's, so
    NVFlare's ``HEModelShareableGenerator``, ``HEModelSerializeFilter``, ``HEModelDecryptor``
    and ``HECrossSiteModelEval`` work on what medflare sends:

    - DXO data: ``{parameter name: serialized CKKSVector (bytes)}``, each the parameter
      flattened in row-major order, already multiplied by the site's aggregation weight
      :math:`w_k`;
    - DXO meta: ``PROCESSED_KEYS`` (every name: ``True``) and ``PROCESSED_ALGORITHM = "CKKS"``.

    The server computes, per parameter,

    .. math::
        \\mathrm{Enc}\\Big(\\frac{1}{W}\\sum_k w_k \\Delta_k\\Big)
        = \\frac{1}{W} \\odot \\bigoplus_k \\mathrm{Enc}(w_k \\Delta_k), \\qquad W = \\sum_k w_k,

    one plaintext multiplication (one CKKS level) after the additions; with NVFlare's default
    parameters (degree 8192, moduli [60, 40, 40] bits, scale :math:`2^{40}`) one level is
    what there is, so the sites weight before encrypting, never the server after.

    **What the server can check** without the key (:func:`read_ciphertexts`): that the names
    are exactly the model's, each value is bytes of at most :func:`max_ciphertext_bytes`, each
    deserializes under the server's context (a ciphertext made with other CKKS parameters
    does not), holds exactly the parameter's number of values, and is fresh: at the context's
    scale and the first level of its modulus chain (anything else could not be added). It cannot see a value: not
    NaN, not a norm, not a sign. Finiteness and the norm bound are therefore checked at the
    site before encryption (:func:`encrypt_update` refuses non-finite input; the site's
    ``HEUpdateEncryptor`` holds the norm bound). A site that runs modified software can put any
    values of the right sizes into the sum and the server cannot tell: under HE the
    aggregate's robustness rests on the sites' own filters.

    **Precision.** A fresh ciphertext at scale :math:`2^{40}` decrypts with an absolute error of
    about :math:`10^{-9}` per value. The server's mean (sum, then one plaintext multiplication
    by :math:`1/W` and a rescale) errs by about :math:`3 \cdot 10^{-8}` on updates of size
    0.04, almost all of it one common factor of :math:`1 + 7 \cdot 10^{-7}` on the whole mean
    (measured by ``benchmarks/he_round_cost.py``): a few float32 steps of a model weight.

    **Size.** A degree-:math:`N` ciphertext holds :math:`N/2` values; a parameter of
    :math:`n` values takes :math:`\lceil 2n/N \rceil` ciphertexts, so a bias of 32 values
    costs as much as one of 4,096. Measured at :math:`N = 8192` on the BraTS SegResNet's 83
    tensors: 14.5-17.4x the float32 bytes up (a fresh ciphertext), 8.1-9.7x down (after the
    server's rescaling), from 20M to 1M parameters.

    References:
        [1] J. H. Cheon, A. Kim, M. Kim and Y. Song, "Homomorphic Encryption for Arithmetic of
            Approximate Numbers", ASIACRYPT 2017.
        [2] A. Benaissa et al., "TenSEAL: A Library for Encrypted Tensor Operations Using
            Homomorphic Encryption", ICLR 2021 workshop on distributed and private ML.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

__all__ = [
    "CKKS",
    "CiphertextRejected",
    "ciphertext_bytes",
    "context_slots",
    "decrypt_update",
    "encrypt_update",
    "encrypted_mean",
    "load_context",
    "max_ciphertext_bytes",
    "read_ciphertexts",
]

#: NVFlare's name of the scheme (``nvflare.app_opt.he.constant.HE_ALGORITHM_CKKS``)
CKKS = "CKKS"
#: bytes a serialized ciphertext may take beyond its polynomials (SEAL's header, TenSEAL's framing)
_FRAMING_BYTES = 4096


class CiphertextRejected(ValueError):
    """An encrypted contribution that does not fit the model or the federation's CKKS parameters."""


def _tenseal():
    import tenseal

    return tenseal


def load_context(serialized: bytes):
    """A TenSEAL context from its serialized bytes (as NVFlare's provisioning writes them)."""
    return _tenseal().context_from(serialized)


def context_slots(context) -> int:
    """Values one ciphertext holds: half the polynomial degree."""
    return int(context.seal_context().data.key_context_data().parms().poly_modulus_degree()) // 2


def max_ciphertext_bytes(context, num_values: int) -> int:
    """The most bytes a serialized CKKS vector of ``num_values`` may take under ``context``:
    two polynomials of degree :math:`N` over the context's primes, 8 bytes a coefficient, per
    ciphertext, plus framing. SEAL's compression only makes it smaller."""
    key_level = context.seal_context().data.key_context_data()
    degree = int(key_level.parms().poly_modulus_degree())
    primes = int(key_level.chain_index()) + 1  # every prime of the chain: more than a ciphertext carries
    chunks = max(1, math.ceil(num_values / (degree // 2)))
    return chunks * (2 * degree * primes * 8 + _FRAMING_BYTES)


def encrypt_update(update: Mapping[str, np.ndarray], context, weight: float = 1.0) -> dict[str, bytes]:
    """Each tensor flattened, multiplied by ``weight`` and encrypted: ``{name: bytes}``.

    Raises:
        ValueError: an empty update, a non-numeric or non-finite entry, or a weight that is not
            a positive finite number; nothing is encrypted.
    """
    if not isinstance(update, Mapping) or not update:
        raise ValueError(f"nothing to encrypt: the update is {type(update).__name__} with no entries")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be a positive finite number, got {weight!r}")
    flat = {}
    for name, value in update.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiub" or array.size == 0:
            raise ValueError(f"{name!r} is not a non-empty numeric array ({array.dtype}, {array.size} values)")
        array = array.astype(np.float64).ravel()
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name!r} holds NaN or infinite values; nothing is encrypted")
        flat[name] = array * float(weight) if weight != 1.0 else array
    ts = _tenseal()
    return {name: ts.ckks_vector(context, values).serialize() for name, values in flat.items()}


def read_ciphertexts(data, context, sizes: Mapping[str, int]) -> dict:
    """Deserialize a contribution under the server's ``context``, checking all it can check.

    Args:
        data: the DXO data a site sent.
        context: the server's TenSEAL context (no secret key).
        sizes: ``{parameter name: number of values}`` of the global model.

    Returns:
        ``{name: CKKSVector}``.

    Raises:
        CiphertextRejected: naming the first missing or unexpected name, the first value that is
            not bytes, too large, unreadable under these CKKS parameters, or of the wrong size.
    """
    if not isinstance(data, Mapping):
        raise CiphertextRejected(f"encrypted data must be a mapping of parameter names to ciphertexts, got {type(data).__name__}")
    missing = sorted(set(sizes) - set(data))
    unexpected = sorted(str(k) for k in set(data) - set(sizes))
    if missing or unexpected:
        raise CiphertextRejected(f"names do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ts = _tenseal()
    out = {}
    for name, size in sizes.items():
        value = data[name]
        if not isinstance(value, (bytes, bytearray)):
            raise CiphertextRejected(f"{name!r} is {type(value).__name__}, not a serialized CKKS vector")
        limit = max_ciphertext_bytes(context, size)
        if len(value) > limit:
            raise CiphertextRejected(f"{name!r} is {len(value)} bytes; a CKKS vector of {size} values takes at most {limit}")
        try:
            vector = ts.ckks_vector_from(context, bytes(value))
        except Exception as e:
            raise CiphertextRejected(f"{name!r} is not a CKKS vector under the federation's parameters ({type(e).__name__}: {e})") from None
        if vector.size() != size:
            raise CiphertextRejected(f"{name!r} holds {vector.size()} values, the model's parameter has {size}")
        _check_fresh(name, vector, context)
        out[name] = vector
    return out


def _check_fresh(name: str, vector, context) -> None:
    """Every ciphertext of ``vector`` at the context's scale and its first data level, as a site's
    fresh encryption is: another scale, or a ciphertext already multiplied and rescaled, would
    deserialize and then fail in the sum (one site would break every site's round)."""
    scale = float(context.global_scale)
    first = list(context.seal_context().data.first_parms_id())
    for n, ciphertext in enumerate(vector.ciphertext()):
        if float(ciphertext.scale) != scale:
            raise CiphertextRejected(f"{name!r}: ciphertext {n} is at scale {ciphertext.scale:g}, the federation's is {scale:g}")
        if list(ciphertext.parms_id()) != first:
            raise CiphertextRejected(
                f"{name!r}: ciphertext {n} is not at the first level of the federation's modulus chain "
                f"({ciphertext.coeff_modulus_size()} primes left): it was not freshly encrypted"
            )


def encrypted_mean(contributions: list, weights: list) -> dict:
    """``(1/W) * sum_k c_k`` per name, for contributions each already multiplied by its weight.

    Args:
        contributions: ``[{name: CKKSVector}, ...]``, all with the same names.
        weights: the weight each site multiplied by (its ``w_k``), positive.

    Returns:
        ``{name: CKKSVector}``.
    """
    if not contributions or len(contributions) != len(weights):
        raise ValueError(f"{len(contributions)} contributions and {len(weights)} weights")
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"the weights sum to {total}, not a positive finite number")
    out = {}
    for name in contributions[0]:
        acc = contributions[0][name]  # TenSEAL's copy() needs the secret key: sums make new vectors
        for contribution in contributions[1:]:
            acc = acc + contribution[name]
        out[name] = acc * (1.0 / total) if total != 1.0 else acc
    return out


def decrypt_update(data: Mapping, context, shapes: Optional[Mapping[str, tuple]] = None) -> dict[str, np.ndarray]:
    """Decrypt ``{name: CKKSVector or bytes}`` with the site's ``context`` (which holds the
    secret key) into float64 arrays, reshaped to ``shapes`` when given."""
    ts = _tenseal()
    out = {}
    for name, value in data.items():
        if isinstance(value, (bytes, bytearray)):
            array = np.asarray(ts.ckks_vector_from(context, bytes(value)).decrypt(), dtype=np.float64)
        else:  # a vector linked to another (the server's) context: decrypt with this one's key
            array = np.asarray(value.decrypt(context.secret_key()), dtype=np.float64)
        out[name] = array.reshape(shapes[name]) if shapes is not None else array
    return out


def ciphertext_bytes(data: Mapping) -> int:
    """Bytes of a ``{name: bytes or CKKSVector}`` payload as serialized."""
    return sum(len(v) if isinstance(v, (bytes, bytearray)) else len(v.serialize()) for v in data.values())
