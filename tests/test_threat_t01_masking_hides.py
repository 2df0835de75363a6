"""T01: a masked vector reveals nothing about its input (statistical tests over the ring Z_2^64).

The server's view of one client is its masked input ``y = encode(x) + self mask + pairwise masks``.
If the masks are uniform over Z_2^64, ``y`` is uniform whatever ``x`` is. The tests feed two very
different inputs, take client 1's masked vector from a real session, and check that (a) every
coordinate looks uniform over the ring (top byte, low byte, every bit), (b) a two-sample test cannot
tell the two masked vectors apart and (c) the masked vector is uncorrelated with its input. The same
tests on the unmasked encodings must distinguish them (sanity: the tests have power).

Inputs come from a fixed numpy seed; the masks come from the protocol's own OS randomness (as in a
deployment), so each check is run at significance 1e-6: a false failure is a < 1e-5 event per run.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from tests.threat_helpers import run_masking_session

N = 1 << 14
ALPHA = 1e-6
RNG = np.random.default_rng(20260101)
A = np.full(N, 0.9)                       # constant, large positive
B = np.linspace(-1.0, 1.0, N)             # a ramp across the whole clip range
OTHERS = {2: RNG.uniform(-0.5, 0.5, N), 3: RNG.uniform(-0.5, 0.5, N)}


def _masked_view(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(client 1's masked vector as the server received it, client 1's unmasked encoding)."""
    tr = run_masking_session({1: x, **OTHERS})
    return tr.masked[1], tr.config.encoder.encode(x)


def _unit(y: np.ndarray) -> np.ndarray:
    """Ring elements as floats in [0, 1)."""
    return y.astype(np.float64) / 2.0**64


def uniformity_p(y: np.ndarray) -> float:
    """Smallest p-value of chi-square tests of the top byte and the low byte against uniform on 256 bins."""
    ps = []
    for byte in ((y >> np.uint64(56)), (y & np.uint64(0xFF))):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        ps.append(stats.chisquare(counts).pvalue)
    return float(min(ps))


def bit_balance_p(y: np.ndarray) -> float:
    """Smallest two-sided binomial p-value over the 64 bit positions (each bit should be 1 half the time)."""
    ps = []
    for b in range(64):
        ones = int(((y >> np.uint64(b)) & np.uint64(1)).sum())
        ps.append(stats.binomtest(ones, y.size, 0.5).pvalue)
    return min(1.0, float(min(ps)) * 64)  # Bonferroni over the 64 positions


def two_sample_p(y1: np.ndarray, y2: np.ndarray) -> float:
    """Kolmogorov-Smirnov p-value that the two vectors' coordinates come from one distribution."""
    return float(stats.ks_2samp(_unit(y1), _unit(y2)).pvalue)


def correlation_p(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson p-value of a linear relation between the input and the ring element (as a float)."""
    return float(stats.pearsonr(x, _unit(y)).pvalue)


def test_masked_vectors_are_uniform_over_the_ring():
    ya, enc_a = _masked_view(A)
    yb, enc_b = _masked_view(B)
    for y in (ya, yb):
        assert y.dtype == np.uint64 and y.shape == (N,)
        assert uniformity_p(y) > ALPHA
        assert bit_balance_p(y) > ALPHA
    # sanity: the same tests reject the unmasked encodings (they have power)
    for enc in (enc_a, enc_b):
        assert uniformity_p(enc) < 1e-12
    assert bit_balance_p(enc_a) < 1e-12  # (a full-range ramp happens to balance every bit)


def test_masked_vectors_of_very_different_inputs_are_indistinguishable():
    ya, enc_a = _masked_view(A)
    yb, enc_b = _masked_view(B)
    assert two_sample_p(ya, yb) > ALPHA
    assert two_sample_p(enc_a, enc_b) < 1e-12  # sanity: unmasked, the inputs are told apart at once
    # the masked vector carries no linear trace of its input; the encoding does
    assert correlation_p(B, yb) > ALPHA
    assert correlation_p(B, enc_b) < 1e-12


def test_same_input_twice_gives_unrelated_masked_vectors():
    """Fresh masks per session: two sessions with the same input share nothing the server could match."""
    y1, enc = _masked_view(B)
    y2, _ = _masked_view(B)
    assert not np.any(y1 == y2)
    diff = y1 - y2  # uniform too: the difference of two independent masks
    assert uniformity_p(diff) > ALPHA
    assert uniformity_p(y1 - enc) > ALPHA  # the mask itself (what hides x) is uniform
