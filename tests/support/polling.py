"""Bounded waits: poll a predicate until it holds, or fail with a clear message.

``poll`` (async) answers whether the predicate came true in time; ``eventually`` (async) and
``wait_until`` (sync, for tests whose broker runs on another thread or process) fail the test
with an ``AssertionError`` naming what did not happen. The async ones sleep on the event loop,
so a broker running on that loop keeps serving while the test waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["eventually", "poll", "wait_until"]

INTERVAL = 0.01
"""Seconds between two looks at the predicate."""


async def poll(
    predicate: Callable[[], bool], within: float = 5.0, *, interval: float = INTERVAL
) -> bool:
    """Poll ``predicate`` for up to ``within`` seconds; whether it held (looked at once more
    at the deadline)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


async def eventually(
    predicate: Callable[[], bool],
    within: float = 5.0,
    *,
    what: str = "condition",
    interval: float = INTERVAL,
) -> None:
    """Wait until ``predicate`` holds; fail with ``what`` if it does not within ``within`` s."""
    if not await poll(predicate, within, interval=interval):
        raise AssertionError(f"not met within {within:g} s: {what}")


def wait_until(
    predicate: Callable[[], bool],
    within: float = 5.0,
    *,
    what: str = "condition",
    interval: float = INTERVAL,
) -> None:
    """Block until ``predicate`` holds; fail with ``what`` if it does not within ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {within:g} s: {what}")
        time.sleep(interval)
