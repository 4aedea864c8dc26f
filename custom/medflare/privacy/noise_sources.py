"""Where Gaussian noise comes from: an injected source, never the global RNG.

- :class:`SecureGaussianNoise` draws from the operating system's cryptographically secure
  generator (``os.urandom``, the kernel's ChaCha20 CSPRNG on Linux) through the Box-Muller
  transform. Use it for releases that must carry a guarantee: a predictable generator lets an
  observer subtract the noise.
- :class:`SeededGaussianNoise` wraps ``numpy.random.Generator`` (PCG64) with a seed, for tests
  and reproducible experiments only.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["GaussianNoiseSource", "SecureGaussianNoise", "SeededGaussianNoise", "make_noise_source"]


class GaussianNoiseSource:
    """Standard normal samples, filled into a caller's array."""

    #: True only for sources whose output cannot be predicted from anything an observer sees.
    cryptographically_secure = False

    def standard_normal(self, size: int, dtype=np.float32) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def fill(self, out: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """Fill the 1-D float array ``out`` with standard normals, ``chunk`` at a time (bounded memory)."""
        for start in range(0, out.size, chunk):
            stop = min(start + chunk, out.size)
            out[start:stop] = self.standard_normal(stop - start, dtype=out.dtype)
        return out


class SeededGaussianNoise(GaussianNoiseSource):
    """PCG64 with a fixed seed: reproducible, **not** secure."""

    def __init__(self, seed: int):
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, size: int, dtype=np.float32) -> np.ndarray:
        return self._rng.standard_normal(size, dtype=dtype)

    def fill(self, out: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        return self._rng.standard_normal(out=out, dtype=out.dtype)


class SecureGaussianNoise(GaussianNoiseSource):
    """Box-Muller over uniforms built from ``os.urandom`` bytes.

    Notes:
        For independent :math:`U_1 \\in (0, 1]`, :math:`U_2 \\in [0, 1)`,
        :math:`Z_1 = \\sqrt{-2 \\ln U_1} \\cos(2 \\pi U_2)` and
        :math:`Z_2 = \\sqrt{-2 \\ln U_1} \\sin(2 \\pi U_2)` are independent standard normals
        (Box and Muller, 1958). Uniforms carry 53 random bits each.
    """

    cryptographically_secure = True

    def fill(self, out: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
        # smaller chunks than the base class: Box-Muller's float64 temporaries are ~32 bytes a sample
        return super().fill(out, chunk)

    def standard_normal(self, size: int, dtype=np.float32) -> np.ndarray:
        half = (size + 1) // 2
        bits = np.frombuffer(os.urandom(16 * half), dtype=np.uint64).reshape(2, half) >> np.uint64(11)
        scale = 1.0 / (1 << 53)
        u1 = 1.0 - bits[0] * scale  # in (0, 1]: log is finite
        u2 = bits[1] * scale
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        out = np.empty(2 * half, dtype=dtype)
        np.multiply(radius, np.cos(angle), out=out[:half], casting="same_kind")
        np.multiply(radius, np.sin(angle), out=out[half:], casting="same_kind")
        return out[:size]


def make_noise_source(noise_seed: Optional[int]) -> GaussianNoiseSource:
    """The secure source when ``noise_seed`` is None, a seeded one otherwise."""
    return SecureGaussianNoise() if noise_seed is None else SeededGaussianNoise(noise_seed)
