"""amqtt's subscription table and BlendSM's topic trie, kept equal, with filter caps.

amqtt 0.12.1 keeps subscriptions in ``Broker._subscriptions`` (filter -> [(session, QoS)]),
which third-party plugins read through ``BrokerContext.subscriptions`` and amqtt's own slow
paths still use. BlendSM's fan-out matches through a :class:`TopicIndex` instead, so both
must hold exactly the same subscriptions: every change to the table goes through
:class:`SubscriptionTable` (``BlendBroker`` routes amqtt's ``add_subscription``,
``_del_subscription`` and ``_del_all_subscriptions`` here, and session deletion and clean
sessions reach the table only through those).

Filters are client-controlled state that every publish may have to look at, so each session
holds at most ``limits.max_filters_per_session`` and all sessions of one member address at
most ``limits.max_filters_per_identity``; a filter past either cap gets SUBACK return code
0x80 (fail-closed), is counted and logged at most once a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from amqtt.session import Session

from blendsm.broker._config import LimitsConfig
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._stats import ServiceStats
from blendsm.broker._topic_index import TopicIndex

__all__ = ["SUBSCRIBE_REFUSED", "SubscriptionTable"]

SUBSCRIBE_REFUSED: Final = 0x80
"""SUBACK return code of a refused filter (MQTT 3.1.1, 3.9.3)."""

_log = logging.getLogger("blendsm.broker")
_CAP_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Filters refused at a cap are client-controlled: one log line a minute, with a count."""

Table = dict[str, list[tuple[Session, int]]]


class SubscriptionTable:
    """amqtt's ``_subscriptions`` dict plus the trie over the same entries, and the caps."""

    __slots__ = ("index", "limits", "stats", "table")

    def __init__(self, table: Table, limits: LimitsConfig, stats: ServiceStats) -> None:
        self.table = table
        self.limits = limits
        self.stats = stats
        self.index: TopicIndex[Session] = TopicIndex()
        for topic_filter, entries in table.items():  # e.g. a broker turned into ours late
            for session, qos in entries:
                self._index_add(topic_filter, session, qos)

    def _index_add(self, topic_filter: str, session: Session, qos: int) -> None:
        if session.client_id is not None:
            self.index.add(topic_filter, session.client_id, session, qos, _owner(session))

    async def subscribe(
        self,
        subscription: tuple[str, int],
        session: Session,
        amqtt_add: Callable[[tuple[str, int], Session], Awaitable[int]],
    ) -> int:
        """amqtt's ``add_subscription`` (validation, topic filtering, max-qos) within the
        caps, then the trie updated from what amqtt stored: the SUBACK return code."""
        topic_filter = subscription[0]
        client_id = session.client_id
        if client_id is not None and not self.index.has(topic_filter, client_id):
            refused = self._over_cap(session, client_id)
            if refused is not None:
                self.stats.subscriptions_refused_at_limit += 1
                _CAP_LOG.note(
                    "SUBSCRIBE %r of client %r refused: %s", topic_filter, client_id, refused
                )
                return SUBSCRIBE_REFUSED
        code = await amqtt_add(subscription, session)
        if code != SUBSCRIBE_REFUSED:
            for stored, qos in self.table.get(topic_filter, ()):
                if stored.client_id == client_id:  # amqtt keeps the first grant of a filter
                    self._index_add(topic_filter, stored, qos)
                    break
        return code

    def _over_cap(self, session: Session, client_id: str) -> str | None:
        limits = self.limits
        if self.index.count(client_id) >= limits.max_filters_per_session:
            return (
                f"the session holds limits.max_filters_per_session={limits.max_filters_per_session}"
            )
        owner = _owner(session)
        if owner is not None and self.index.owner_count(owner) >= limits.max_filters_per_identity:
            return (
                f"the member's sessions hold limits.max_filters_per_identity="
                f"{limits.max_filters_per_identity}"
            )
        return None

    def unsubscribe(self, topic_filter: str, session: Session) -> int:
        """amqtt's ``_del_subscription``: the number of subscriptions removed (0 or 1). An
        emptied filter is dropped from the table too (amqtt kept it forever)."""
        entries = self.table.get(topic_filter)
        if entries is None:
            return 0
        client_id = session.client_id
        for position, (stored, _) in enumerate(entries):
            if stored.client_id == client_id:
                del entries[position]
                if not entries:
                    del self.table[topic_filter]
                if client_id is not None:
                    self.index.remove(topic_filter, client_id)
                return 1
        return 0

    def unsubscribe_all(self, session: Session) -> None:
        """amqtt's ``_del_all_subscriptions``, in O(this session's filters) instead of a scan
        of every filter of every client."""
        if session.client_id is None:
            return
        for topic_filter in self.index.filters_of(session.client_id):
            self.unsubscribe(topic_filter, session)

    def match(self, topic: str) -> list[tuple[Session, int]]:
        """Every session subscribed to ``topic``, once, at its highest granted QoS."""
        return self.index.match(topic)


def _owner(session: Session) -> str | None:
    """The member address the per-identity cap counts against (None for anonymous clients,
    whose filters only the per-session cap bounds)."""
    ident = getattr(session, "blendsm", None)
    key = getattr(ident, "key", "")
    return key or None
