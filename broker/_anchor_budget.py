"""What anchoring may cost the operator, and how much a seller may make the broker keep.

Why: the operator pays gas for every anchor transaction, and a transaction costs the same
(about 89k gas) whether its root covers one leaf or a million, so the cost driver is the
number of roots per hour, not the number of messages. Before this bound any seller could set
that number: a leaf waiting ``batch_seconds`` made a root, and every ``batch_max_leaves``
leaves made another, even on a topic nobody buys. The rules (docs/integrity.md):

* **Sold leaves drive anchoring.** A topic is *sold* once the broker delivered one of its
  messages (charged, or free on a price-0 topic); the leaves of that topic received up to its
  last delivery are sold leaves. Only they trigger roots by count and by ``batch_seconds``,
  and every root takes them first. Every message a subscriber received is therefore anchored
  as promptly as before; buyers' payments are what the operator's anchors serve.
* **Unsold leaves ride free.** They fill the room sold leaves leave in a root; alone they
  make a root only once the oldest is ``unsold_batch_seconds`` old (default an hour) and no
  root was sealed in that time, so all unsold topics together cost at most one root per
  period. None is dropped.
* **Paced roots.** A due root waits until the last one is ``3600 / max_roots_per_hour``
  seconds old (10 s by default), then takes every pending sold leaf, up to
  ``max_leaves_per_root``. So the hour's budget lasts the hour at any message rate: before,
  1,000 messages/s made a root a second for six minutes and none for the next 54, while the
  sellers' pending leaves grew toward their bound and then were refused.
* **A hard ceiling.** At most ``max_roots_per_hour`` roots are sealed in any hour, whatever
  triggers them (a seller buying its own topic, many buyers, :meth:`Anchorer.anchor_now`):
  past it sealing waits, counted in ``anchors_deferred``, and leaves keep accumulating on
  disk.
* **Bounded storage per seller.** At most ``max_pending_leaves_per_seller`` unanchored
  leaves per seller; past it that seller's envelopes are refused (:class:`LeafBudgetError`),
  counted in ``leaves_refused``. Anchored leaves are kept (see docs/integrity.md).

Everything here is in memory and synchronous (called on the event loop, per message); the
counts are reloaded from the leaf store after each seal, so a QoS 0 leaf lost in a crash or
a count that drifted is corrected at the next root.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from blendsm.broker._log_limit import LogLimiter
from blendsm.errors import LeafBudgetError

__all__ = ["HOUR", "AnchorBudget"]

HOUR: Final = 3600.0
"""The window of ``max_roots_per_hour``, in seconds."""


class AnchorBudget:
    """The anchorer's triggers and ceilings: sold marks, pending counts, the root window.

    ``seller_of(topic)`` names the seller a topic's leaves count against (None: the topic
    counts on its own, e.g. a topic the chain view no longer knows)."""

    def __init__(
        self,
        *,
        batch_seconds: float,
        batch_max_leaves: int,
        max_roots_per_hour: int,
        unsold_batch_seconds: float,
        spacing: float | None = None,
        max_pending_leaves_per_seller: int,
        seller_of: Callable[[str], str | None],
        logger: logging.Logger,
    ) -> None:
        self.batch_seconds = batch_seconds
        self.batch_max_leaves = batch_max_leaves
        self.max_roots = max_roots_per_hour
        self.spacing = HOUR / max_roots_per_hour if spacing is None else spacing
        """Seconds between two background roots at least (the pacing)."""
        self.unsold_seconds = unsold_batch_seconds
        self.max_pending = max_pending_leaves_per_seller
        self.seller_of = seller_of
        self.log = logger
        self.deferred = 0
        """Times a root was due but ``max_roots_per_hour`` made it wait."""
        self.refused = 0
        """Leaves refused because their seller had ``max_pending_leaves_per_seller`` waiting."""
        self.sold_backlog = False
        """The last root was full of sold leaves and more were left: another is due."""
        self._roots: deque[float] = deque()
        self._last_root: float | None = None
        self._last_delivery: dict[str, float] = {}
        self._marked: set[str] = set()
        self._sold_pending = 0
        self._sold_since: float | None = None
        self._topic_pending: dict[str, int] = {}
        self._seller_pending: dict[str, int] = {}
        self._waiting = False
        self._deferred_log = LogLimiter(logger, logging.WARNING)
        self._refused_log = LogLimiter(logger, logging.WARNING)

    @property
    def waiting(self) -> bool:
        """A root is due but waits for the pacing or the ceiling of ``max_roots_per_hour``."""
        return self._waiting

    @property
    def everything_sold(self) -> bool:
        """``unsold_batch_seconds`` 0: every leaf triggers like a sold one (the old rule)."""
        return self.unsold_seconds == 0

    # --- deliveries and leaves -----------------------------------------------------------

    def delivered(self, topic: str, now: float) -> bool:
        """A message of ``topic`` went to a subscriber: its leaves so far are sold. True when
        the anchorer should look again (the first sold leaf, or enough for a root)."""
        self._last_delivery[topic] = now
        if topic in self._marked:
            return False
        self._marked.add(topic)
        return self._count_sold(self._topic_pending.get(topic, 0), now)

    def _count_sold(self, leaves: int, now: float) -> bool:
        if not leaves:
            return False
        self._sold_pending += leaves
        first = self._sold_since is None
        if first:
            self._sold_since = now
        return first or self._sold_pending >= self.batch_max_leaves

    def reserve(self, topic: str, now: float) -> bool:
        """Count one leaf of ``topic`` about to be stored; raise :class:`LeafBudgetError` if
        its seller is at the bound. True when the anchorer should look again."""
        seller = self.seller_of(topic) or topic
        pending = self._seller_pending.get(seller, 0)
        if pending >= self.max_pending:
            self.refused += 1
            self._refused_log.note(
                "anchors: seller %s has %d unanchored leaves (anchoring."
                "max_pending_leaves_per_seller): message on %r refused (%d in all)",
                seller,
                pending,
                topic,
                self.refused,
            )
            raise LeafBudgetError(f"seller {seller}: {pending} leaves wait for an anchor")
        self._seller_pending[seller] = pending + 1
        self._topic_pending[topic] = self._topic_pending.get(topic, 0) + 1
        return topic in self._marked and self._count_sold(1, now)

    def unreserve(self, topic: str) -> None:
        """The leaf counted by :meth:`reserve` was not stored."""
        seller = self.seller_of(topic) or topic
        for counts, key in ((self._seller_pending, seller), (self._topic_pending, topic)):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)
        if topic in self._marked and self._sold_pending:
            self._sold_pending -= 1

    def reload(self, pending: Mapping[str, int]) -> None:
        """The leaf store's unbatched counts per topic (after a seal, at start): the truth."""
        self._topic_pending = dict(pending)
        sellers: dict[str, int] = {}
        for topic, count in pending.items():
            seller = self.seller_of(topic) or topic
            sellers[seller] = sellers.get(seller, 0) + count
        self._seller_pending = sellers

    def remark(self, since: float) -> None:
        """After a seal and its :meth:`reload`: topics delivered since ``since`` (when the
        seal chose its leaves) are sold again, with their pending leaves. Why: a leaf stored
        and delivered while the seal ran was not in it, and :meth:`sealed` cleared its topic's
        mark, so a stream that ended then left a bought leaf waiting for the unsold timer (an
        hour) with its buyer's proof requests refused meanwhile."""
        for topic, last in self._last_delivery.items():
            if last > since and topic not in self._marked:
                self._marked.add(topic)
                self._count_sold(self._topic_pending.get(topic, 0), last)

    def sold(self) -> dict[str, float]:
        """For the seal: each topic with pending leaves and a delivery, and its last one."""
        last = self._last_delivery
        return {t: last[t] for t in self._topic_pending if t in last}

    # --- roots ---------------------------------------------------------------------------

    def load_roots(self, sealed_at: list[float]) -> None:
        """Seal times from the store (any order), so a restart does not reset the ceiling."""
        self._roots = deque(sorted(sealed_at)[-self.max_roots :])
        self._last_root = self._roots[-1] if self._roots else None

    def due_in(self, now: float, pending: int, oldest: float | None) -> float:
        """Seconds until a root is due (0: now) by the trigger rules, before the ceiling."""
        if self.everything_sold:
            if pending >= self.batch_max_leaves:
                return 0.0
            if pending and oldest is not None:
                return max(0.0, oldest + self.batch_seconds - now)
            return self.batch_seconds
        waits = [self.batch_seconds]
        if self.sold_backlog or self._sold_pending >= self.batch_max_leaves:
            return 0.0
        if self._sold_since is not None:
            waits.append(max(0.0, self._sold_since + self.batch_seconds - now))
        if pending and oldest is not None:  # at most one unsold-only root per period
            start = max(oldest, self._last_root or oldest)
            waits.append(max(0.0, start + self.unsold_seconds - now))
        return min(waits)

    def root_wait(self, now: float) -> float:
        """Seconds until a due background root may be sealed (0: now): the pacing first, not
        counted (at a high rate it is the normal state), then :meth:`ceiling_wait`."""
        if self._last_root is not None:
            pace = min(self.spacing, self._last_root + self.spacing - now)  # clock stepped back
            if pace > 0:
                self._waiting = True
                return pace
        return self.ceiling_wait(now)

    def ceiling_wait(self, now: float) -> float:
        """Seconds until ``max_roots_per_hour`` lets another root be sealed (0: now); a wait
        is counted once and logged (rate-limited: a seller can cause it)."""
        roots = self._roots
        while roots and roots[0] <= now - HOUR:
            roots.popleft()
        if len(roots) < self.max_roots:
            self._waiting = False
            return 0.0
        wait = max(0.01, roots[0] + HOUR - now)
        if not self._waiting:
            self._waiting = True
            self.deferred += 1
            self._deferred_log.note(
                "anchors: %d roots sealed in the last hour (anchoring.max_roots_per_hour);"
                " the next waits %.0fs, leaves keep accumulating (%d deferrals in all)",
                len(roots),
                wait,
                self.deferred,
            )
        return wait

    def sealed(self, now: float, more_sold: bool) -> None:
        """A root was sealed: it counts against the hour; sold marks start again."""
        self._roots.append(now)
        self._last_root = now
        self._waiting = False
        self.sold_backlog = more_sold
        self._marked.clear()
        self._sold_pending = 0
        self._sold_since = None
