"""The chain view's health: whether its decisions may be trusted, and why not.

A view is unhealthy when it never synced, when applying an event failed (its state is then
unknown), or when it has not caught up with the chain for longer than ``max_staleness``;
every market decision is then no (fail closed). The transitions are logged, bounded: once per
change of kind, at most one line a minute for a view flapping at the staleness bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from blendsm.broker._log_limit import LogLimiter

__all__ = ["ViewHealth"]


class ViewHealth:
    """Mixed into :class:`~blendsm.broker._chain_view.ChainView`, which keeps these fields."""

    log: logging.Logger
    max_staleness: float
    _broken: str | None
    _synced: bool
    _running: bool
    _caught_up_at: float
    _clock: Callable[[], float]

    def _init_health(self) -> None:
        self._last_reason: str | None = "not synced"
        self._unhealthy_log = LogLimiter(self.log, logging.WARNING)
        self._healthy_log = LogLimiter(self.log, logging.INFO)

    @property
    def healthy(self) -> bool:
        """Whether decisions may be trusted: synced, following, caught up recently. Logged once
        per change of *kind* (the reason's lag grows per lookup), rate-limited (a view flapping
        at the staleness bound, a slow node, would log twice per poll)."""
        reason = self.unhealthy_reason
        kind = None if reason is None else reason.partition(",")[0]
        if kind != self._last_reason:
            if reason is None:
                self._healthy_log.note("chain view: healthy again")
            else:
                self._unhealthy_log.note(
                    "chain view: unhealthy, answering no to market decisions: %s", reason
                )
            self._last_reason = kind
        return reason is None

    @property
    def unhealthy_reason(self) -> str | None:
        """Why the view is unhealthy, None when it is healthy."""
        if self._broken is not None:
            return self._broken
        if not self._synced:
            return "not synced"
        lag = self._clock() - self._caught_up_at
        if lag > self.max_staleness:
            state = "following" if self._running else "not following"
            return (
                f"{state}, last caught up with the chain {lag:.1f}s ago (> {self.max_staleness}s)"
            )
        return None

    @property
    def synced(self) -> bool:
        return self._synced
