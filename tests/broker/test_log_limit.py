"""LogLimiter: client-caused log lines are bounded, and the count of those left out is told."""

from __future__ import annotations

import logging

import pytest

from blendsm.broker._log_limit import LogLimiter


def test_one_line_per_interval_then_the_count_of_those_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limiter = LogLimiter(logging.getLogger("test.limit"), interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limit"):
        assert limiter.note("idle socket from %s", "a") is True
        for second in range(1, 60):
            now[0] = 100.0 + second
            assert limiter.note("idle socket from %s", "b") is False
        now[0] = 160.0
        assert limiter.note("idle socket from %s", "c") is True
        now[0] = 161.0
        assert limiter.note("idle socket from %s", "d") is False
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "idle socket from a",
        "idle socket from c (59 more like it in the last 60s not logged)",
    ]


def test_a_flood_writes_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("test.flood"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.flood"):
        for i in range(100_000):  # 100,000 events over 10 s
            now[0] = i / 10_000
            limiter.note("refused %d", i)
    assert len(caplog.records) == 10
