"""When the voucher intake takes its next batch: vouchers nobody waits on share a commit.

Why: a voucher's commit is an fsync, which costs more broker CPU than everything else a voucher
does, and at 50 % of stock's saturation a commit took only three to five vouchers; the voucher
store's thread was then about half the paid path's CPU beyond stock amqtt's. So a queued
voucher that no delivery waits on may wait a little for others to share its commit:

- ``payments.intake.unawaited_linger_seconds`` at most, and at most a quarter of the time
  since its channel's previous voucher. A payer pays every so many messages (the SDK: at half
  its credit), so that gap is about how long the credit the voucher arrives with lasts: a fast
  stream's voucher lingers briefly and is committed before its deliveries reach the credit
  edge, a slow one's up to the whole setting;
- never once a delivery is refused for credit on a queued voucher's channel: the refusal
  (the gate calls ``VoucherIntake.expedite``, which calls :meth:`CommitLinger.end`), a
  voucher arriving for a channel deliveries already wait on, and the broker stopping take
  the queued vouchers at once, whether the refused delivery is held, paused in an offline
  replay or dropped (``payments.hold_messages`` 0).

No delivery waits for the linger itself (the refusal that would hold one ends it), but a
voucher lingering counts later, so a stream nearer its credit edge may meet it sooner and wait
for a commit there (the pace cap is what keeps that rare; docs/benchmarks.md counts the
holds). A voucher's receipt comes at most the setting later.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final

__all__ = ["CommitLinger"]

_MAX_PACES: Final = 100_000
"""Channels whose last voucher time is kept; past it the record starts over (a bound)."""


class CommitLinger:
    """The unawaited linger of one intake (see the module docstring); used on the loop."""

    def __init__(self, spare_seconds: Callable[[], float]) -> None:
        self._spare_seconds = spare_seconds  # read per voucher: the config may be replaced
        self._last_arrival: dict[bytes, float] = {}
        """Channel id -> when its latest voucher arrived: the payer's pace (bounded)."""
        self._first_due = math.inf
        """The earliest time by which a queued voucher's batch is taken."""
        self._hurry: asyncio.Future[None] | None = None
        """Set while lingering; :meth:`_wake` resolves it."""
        self.closing = False

    def arrived(self, channel: bytes, now: float, awaited: bool) -> None:
        """A voucher of ``channel`` was queued at ``now`` (``awaited``: deliveries wait on
        ``channel``). A channel's first voucher may linger the whole setting: should its
        deliveries reach the credit edge, their refusal ends the linger."""
        arrivals = self._last_arrival
        previous = arrivals.get(channel)
        if previous is None and len(arrivals) >= _MAX_PACES:
            arrivals.clear()
        arrivals[channel] = now
        spare = self._spare_seconds()
        due = now + (spare if previous is None else min(spare, (now - previous) / 4))
        if awaited:
            self.end()
        elif due < self._first_due:
            self._first_due = due
            self._wake()  # if lingering: until this one is due

    def taken(self) -> None:
        """The queue was taken as a batch: nothing is due any more."""
        self._first_due = math.inf

    def end(self) -> None:
        """Take the queued vouchers now: no linger until the next batch."""
        self._first_due = -math.inf
        self._wake()

    def _wake(self) -> None:
        """The lingering runner looks again at what is due (or ends: :attr:`closing`)."""
        hurry = self._hurry
        if hurry is not None and not hurry.done():
            hurry.set_result(None)

    async def wait(self) -> None:
        """Until the first queued voucher is due (at once after :meth:`end`, which a refusal
        for credit or a voucher deliveries wait on calls), or :attr:`closing`."""
        loop = asyncio.get_running_loop()
        while not self.closing:
            due = self._first_due - loop.time()
            if due <= 0:
                return
            self._hurry = hurry = loop.create_future()
            timer = loop.call_later(due, self._wake)
            try:
                await hurry
            finally:
                timer.cancel()
                self._hurry = None
