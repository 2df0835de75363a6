"""Block selection: top-K by score in original order; Offsite-Tuning uniform drop; bad ratios refused."""

from __future__ import annotations

import pytest

from fedproxy_secure.compress import kept_count, select_blocks, uniform_blocks
from fedproxy_secure.errors import ConfigError


def test_kept_count_formula():
    assert kept_count(30, 0.5) == 15
    assert kept_count(7, 0.5) == 4  # 7 - floor(3.5)
    assert kept_count(10, 0.9) == 9  # 10 * (1 - 0.9) = 0.9999999999999998: float error must not keep all 10
    assert kept_count(10, 0.3) == 3
    assert kept_count(2, 0.01) == 1


def test_select_top_k_in_original_order():
    scores = [0.9, 0.1, 0.5, 0.05, 0.7, 0.3]
    assert select_blocks(scores, 0.5) == [0, 2, 4]
    assert select_blocks(scores, 0.3) == [0, 4]  # K = 6 - floor(4.2) = 2
    assert select_blocks([0.2, 0.2, 0.2, 0.1], 0.5) == [0, 1]  # ties -> earlier block


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_bad_keep_ratio(ratio):
    with pytest.raises(ConfigError, match="keep_ratio"):
        select_blocks([0.1, 0.2, 0.3], ratio)
    with pytest.raises(ConfigError, match="keep_ratio"):
        uniform_blocks(10, ratio)


def test_uniform_keeps_adapters_and_spreads_middle():
    keep = uniform_blocks(30, 0.5, adapter_blocks=2)
    assert len(keep) == 15 and keep == sorted(set(keep))
    assert keep[:2] == [0, 1] and keep[-2:] == [28, 29]
    middle = keep[2:-2]
    gaps = [b - a for a, b in zip(middle, middle[1:])]
    assert middle[0] == 2 and middle[-1] == 27 and max(gaps) - min(gaps) <= 1
    assert uniform_blocks(6, 0.5, adapter_blocks=0) == [0, 2, 5]
    assert uniform_blocks(8, 0.5, adapter_blocks=2) == [0, 1, 6, 7]


def test_uniform_adapters_must_fit():
    with pytest.raises(ConfigError, match="ot_adapter_blocks"):
        uniform_blocks(6, 0.5, adapter_blocks=2)  # K = 3 < 4
