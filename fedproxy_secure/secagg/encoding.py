"""Fixed-point encoding of float vectors into Z_{2^64} for masked summation.

Value semantics (exact):
- an input is a finite float vector; every element must lie in ``[-clip_range, clip_range]``,
  otherwise :meth:`FixedPointEncoder.encode` refuses it with ``ConfigError`` (the trainer clips
  updates beforehand; silently clipping here would hide a bug). Weighted sums: the client multiplies
  by its weight *before* encoding, and the weighted value must still respect the clip range;
- ``encode(x) = round(x * 2^frac_bits) mod 2^64`` (two's complement in ``uint64``);
- sums are computed with wrap-around ``uint64`` arithmetic; ``decode`` reads the sum as a signed
  64-bit integer and divides by ``2^frac_bits``;
- the encoder is built for at most ``max_clients`` summands and refuses (``ConfigError``) any
  configuration where ``max_clients * round(clip_range * 2^frac_bits) >= 2^63``, so a sum of valid
  inputs can never overflow. Per-element error of a decoded sum of n inputs is at most
  ``n * 2^-(frac_bits + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedproxy_secure.errors import ConfigError

MODULUS_BITS = 64


@dataclass(frozen=True)
class FixedPointEncoder:
    """Encodes float vectors in ``[-clip_range, clip_range]`` as ``uint64`` with ``frac_bits``."""

    clip_range: float = 1.0
    frac_bits: int = 32
    max_clients: int = 1024

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"secagg.clip_range: {self.clip_range!r} must be a positive finite number")
        if not (isinstance(self.frac_bits, int) and 0 <= self.frac_bits <= 62):
            raise ConfigError(f"secagg.frac_bits: {self.frac_bits!r} must be an int in [0, 62]")
        if not (isinstance(self.max_clients, int) and self.max_clients >= 1):
            raise ConfigError(f"secagg.max_clients: {self.max_clients!r} must be a positive int")
        bound = self.max_clients * (int(round(self.clip_range * self.scale)) + 1)
        if bound >= 1 << (MODULUS_BITS - 1):
            raise ConfigError(
                f"secagg: max_clients={self.max_clients} x clip_range={self.clip_range} x "
                f"2^{self.frac_bits} reaches 2^{bound.bit_length() - 1}, which can overflow the "
                f"2^64 modulus; lower secagg.frac_bits or secagg.clip_range"
            )

    @property
    def scale(self) -> float:
        """Multiplier applied before rounding: ``2 ** frac_bits``."""
        return float(1 << self.frac_bits)

    def check_cohort(self, n: int) -> None:
        """Refuse (``ConfigError``) a cohort larger than the encoder's overflow headroom."""
        if n > self.max_clients:
            raise ConfigError(
                f"secagg.max_clients: cohort of {n} exceeds the encoder's headroom "
                f"({self.max_clients}); raise max_clients (the encoder re-checks overflow)"
            )

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Return ``round(x * scale)`` as ``uint64`` (two's complement); refuses out-of-range input."""
        x = np.asarray(x)
        if x.ndim != 1 or x.dtype.kind != "f":
            raise ConfigError(f"secagg input: expected a 1-D float vector, got {x.dtype} shape {x.shape}")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ConfigError("secagg input: vector contains NaN or inf; fix the update before summing")
        if lo < -self.clip_range or hi > self.clip_range:
            raise ConfigError(
                f"secagg input: values span [{lo:.4g}, {hi:.4g}], outside clip_range "
                f"[-{self.clip_range}, {self.clip_range}]; clip the update first or raise secagg.clip_range"
            )
        y = np.multiply(x, self.scale, dtype=np.float64)
        np.rint(y, out=y)
        return y.astype(np.int64).view(np.uint64)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Read a ``uint64`` sum as signed fixed point and return it as ``float64``."""
        total = np.asarray(total, dtype=np.uint64)
        return total.view(np.int64).astype(np.float64) / self.scale
