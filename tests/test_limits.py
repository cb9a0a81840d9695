"""The per-source rate limit, with an explicit clock."""

from __future__ import annotations

import pytest

from corem.net.limits import SourceLimiter


def test_burst_then_rate():
    lim = SourceLimiter(rate=10, burst=5)
    assert [lim.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.allow("b", 0.0)  # another source has its own bucket
    assert not lim.allow("a", 0.05)  # 0.5 token back: not enough
    assert lim.allow("a", 0.1)  # one token back
    assert not lim.allow("a", 0.1)
    assert [lim.allow("a", 100.0) for _ in range(6)] == [True] * 5 + [False]  # refills to the burst, no more
    assert lim.dropped == 5


def test_table_is_bounded():
    lim = SourceLimiter(rate=1, burst=1, max_sources=3)
    for i in range(10):
        lim.allow(f"10.0.0.{i}", 0.0)
    assert len(lim) == 3 and lim.evicted == 7


def test_bad_parameters():
    with pytest.raises(ValueError, match="rate"):
        SourceLimiter(rate=0)
    with pytest.raises(ValueError, match="burst"):
        SourceLimiter(rate=1, burst=0.5)
