"""CKKS parameter sets for the HE secure-aggregation mode, and the checks that refuse unsafe ones.

Security table: HomomorphicEncryption.org security standard (Albrecht et al., 2018), 128-bit
classical security, ternary secret, error sigma 3.2: the largest total coefficient-modulus size
(bits, *all* primes including the special prime) allowed for each ring dimension N.

Precision model (message domain, i.e. after dividing by the scale):
* the first prime ``q0`` of ``coeff_mod_bit_sizes`` is the only prime left at the lowest level;
  a decoded value ``v`` survives iff ``|v| * 2^scale_bits < q0 / 2``. We keep two more bits of
  margin, so the *aggregate* must satisfy ``|sum| < 2^(q0_bits - scale_bits - 3)``;
* a fresh encryption carries an error of at most ``FRESH_ERROR_BITS`` bits above ``2^-scale_bits``
  per slot (measured max for N = 8192, scale 2^40: 7.6e-9 = 2^-27 with the public key,
  6.5e-10 with the secret key; the bound 2^-24 keeps a factor 8 of margin); additions add errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedproxy_secure.errors import ConfigError

#: N -> max total coefficient-modulus bits for 128-bit classical security (HE standard, 2018).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Per-slot error bound of one fresh ciphertext, in bits above 2^-scale_bits (see module docstring).
FRESH_ERROR_BITS = 16

#: Smallest scale we accept: below 2^20 the encoding error alone exceeds 1e-6 per value.
MIN_SCALE_BITS = 20

ENCRYPTION_TYPES = ("public", "symmetric")


@dataclass(frozen=True)
class CKKSParams:
    """A validated CKKS parameter set (build with :func:`validate_params`)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 40
    encryption: str = "public"  # "public": clients encrypt under the public key; "symmetric": secret key

    @property
    def slots(self) -> int:
        """Number of values one ciphertext carries (N / 2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        """Primes left in a ciphertext at the top level (all but the special prime)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest magnitude the decrypted aggregate may have (see module docstring)."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 3

    @property
    def max_abs_value(self) -> float:
        """Largest |value| any slot of the aggregate may reach without wrapping around q0."""
        return float(2 ** self.headroom_bits)

    @property
    def fresh_error(self) -> float:
        """Bound on the per-slot error of one fresh ciphertext (message domain)."""
        return 2.0 ** (FRESH_ERROR_BITS - self.scale_bits)

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on one serialised ciphertext: 2 polys x N coeffs x primes x 8 B + 4 KiB header."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8 + 4096

    def to_json(self) -> dict:
        """JSON-able description (no key material)."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "encryption": self.encryption,
        }


def validate_params(
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: tuple[int, ...] | list[int] = (60, 40),
    scale_bits: int = 40,
    encryption: str = "public",
) -> CKKSParams:
    """Return a :class:`CKKSParams` or raise ``ConfigError`` naming the unsafe field.

    Guarantees: N is a power of two listed in the 128-bit security table, the total modulus is
    within that table's bound, every prime is 20..60 bits, the scale is at least
    2^MIN_SCALE_BITS and the first prime leaves non-negative headroom above the scale (values of
    magnitude >= 1 are representable; :func:`check_capacity` then checks a concrete cohort).
    """
    n = int(poly_modulus_degree)
    bits = tuple(int(b) for b in coeff_mod_bit_sizes)
    if n not in MAX_COEFF_BITS_128:
        raise ConfigError(
            f"secagg.he.poly_modulus_degree: {n} is not one of {sorted(MAX_COEFF_BITS_128)}; use 8192"
        )
    if len(bits) < 2:
        raise ConfigError(
            f"secagg.he.coeff_mod_bit_sizes: {list(bits)} needs at least two primes (data + special); "
            "use [60, 40]"
        )
    if any(b < 20 or b > 60 for b in bits):
        raise ConfigError(
            f"secagg.he.coeff_mod_bit_sizes: {list(bits)} has a prime outside 20..60 bits (SEAL limit)"
        )
    total, limit = sum(bits), MAX_COEFF_BITS_128[n]
    if total > limit:
        raise ConfigError(
            f"secagg.he.coeff_mod_bit_sizes: total {total} bits exceeds {limit} bits, the 128-bit "
            f"security bound for N = {n} (HomomorphicEncryption.org standard); use fewer/smaller "
            "primes or a larger poly_modulus_degree"
        )
    s = int(scale_bits)
    if s < MIN_SCALE_BITS:
        raise ConfigError(
            f"secagg.he.scale_bits: 2^{s} is below 2^{MIN_SCALE_BITS}; the encoding error would "
            "swamp model updates; use 40"
        )
    if bits[0] - s - 3 < 0:
        raise ConfigError(
            f"secagg.he.scale_bits: first prime {bits[0]} bits minus scale {s} bits leaves "
            f"{bits[0] - s - 3} bits of headroom (< 0): no value of magnitude 1 fits; lower the scale "
            "or raise the first prime"
        )
    if encryption not in ENCRYPTION_TYPES:
        raise ConfigError(
            f"secagg.he.encryption: {encryption!r} unknown; use one of {', '.join(ENCRYPTION_TYPES)}"
        )
    return CKKSParams(n, bits, s, encryption)


def check_capacity(params: CKKSParams, clip: float, weight_total: int, tolerance: float) -> None:
    """Refuse (``ConfigError``) a cohort whose aggregate cannot be carried or decoded precisely.

    ``clip`` bounds every |value| a client sends, ``weight_total`` is the sum of the integer
    weights (the number of clients when unweighted) and ``tolerance`` the absolute error the
    caller accepts on each aggregate value (flooding noise included).
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"secagg.he.clip: {clip!r} must be a positive finite number")
    worst = clip * weight_total
    if worst >= params.max_abs_value:
        raise ConfigError(
            f"secagg.he.clip: clip {clip:g} x total weight {weight_total} = {worst:g} exceeds the "
            f"{params.max_abs_value:g} the parameters can carry (first prime "
            f"{params.coeff_mod_bit_sizes[0]} bits, scale 2^{params.scale_bits}); lower the clip, "
            "the weights or the scale"
        )
    if tolerance <= params.fresh_error * weight_total:
        raise ConfigError(
            f"secagg.he.tolerance: {tolerance:g} is below the CKKS error bound "
            f"{params.fresh_error * weight_total:g} for total weight {weight_total}; raise "
            "scale_bits or the tolerance"
        )
