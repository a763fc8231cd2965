"""Log lines a client can cause, bounded: at most one line per interval, with a count.

Whatever a client does over and over (idle sockets, replayed envelopes, refused packets) must
not grow the log without bound: a flood of 20,000 idle sockets once wrote 54 MB of log in 40 s.
A :class:`LogLimiter` writes the first occurrence at once, then at most one line per
``interval`` that says how many were left out in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogLimiter"]


class LogLimiter:
    """At most one ``level`` line per ``interval`` seconds on ``logger``; the rest counted."""

    __slots__ = ("_clock", "_last", "_level", "_logger", "_suppressed", "interval")

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.INFO,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def note(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line went out less than ``interval`` ago (then it is
        only counted, and the next line says how many were left out). True when logged."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more like it in the last %.0fs not logged)"
            args = (*args, self._suppressed, now - self._last if self._last is not None else 0.0)
        self._last = now
        self._suppressed = 0
        self._logger.log(self._level, message, *args)
        return True
