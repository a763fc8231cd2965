"""blendsm.backoff_delay: the one retry-delay formula of every retry loop."""

from __future__ import annotations

import random

import pytest

from blendsm import Jitter, backoff_delay


def test_doubles_from_base_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base=0.5, cap=5.0) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_nothing_failed_means_no_wait() -> None:
    assert backoff_delay(0, base=1.0, cap=10.0) == 0.0
    assert backoff_delay(-3, base=1.0, cap=10.0, jitter=Jitter.FULL) == 0.0


def test_huge_failure_counts_do_not_overflow() -> None:
    assert backoff_delay(10**6, base=1.0, cap=300.0) == 300.0
    assert backoff_delay(10**6, base=1e-9, cap=1e300) == pytest.approx(1e-9 * 2.0**30)


@pytest.mark.parametrize(
    ("jitter", "low", "high"),
    [(Jitter.NONE, 8.0, 8.0), (Jitter.HALF, 4.0, 8.0), (Jitter.FULL, 0.0, 8.0)],
)
def test_jitter_draws_within_its_share_of_the_delay(jitter: float, low: float, high: float) -> None:
    rng = random.Random(7)
    draws = [
        backoff_delay(4, base=1.0, cap=60.0, jitter=jitter, uniform=rng.uniform)
        for _ in range(2000)
    ]
    assert min(draws) >= low
    assert max(draws) <= high
    if jitter:
        # really random: the draws spread over most of their range
        assert max(draws) - min(draws) > 0.9 * (high - low)


def test_the_extremes_of_the_random_draw_are_the_bounds() -> None:
    assert backoff_delay(3, base=1.0, cap=9.0, jitter=Jitter.HALF, uniform=lambda a, b: a) == 2.0
    assert backoff_delay(3, base=1.0, cap=9.0, jitter=Jitter.HALF, uniform=lambda a, b: b) == 4.0
    assert backoff_delay(3, base=1.0, cap=9.0, jitter=Jitter.FULL, uniform=lambda a, b: a) == 0.0


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(1, base=1.0, cap=2.0, jitter=jitter)
