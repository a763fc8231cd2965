"""Persistent sessions of one broker: expiry, a cap per identity, and bounded offline queues.

amqtt 0.12.1 keeps a disconnected persistent session (clean session 0) forever, lets one
client open as many as it has client ids, and queues every QoS 1/2 message for it without a
bound. Each is client-controlled memory. :class:`SessionKeeper` holds the bookkeeping:

* expiry without a task per session: disconnected sessions wait in insertion order (the
  expiry is one constant, so that order is also deadline order) and one loop, amqtt's session
  monitor, pops the due ones from the head, O(expired) per tick;
* the persistent sessions of each identity, so a CONNECT that would open one more than
  ``sessions.max_per_identity`` is refused (an existing session is never evicted: that would
  silently destroy a queue the client still expects);
* admission to the offline queue: a paid message only for a subscriber with a usable channel
  (not queued otherwise: it could never be delivered or charged fairly), and at most
  ``max_queued_messages`` / ``max_queued_bytes`` per session, newer messages dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from blendsm.broker._config_sessions import SessionsConfig
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._stats import ServiceStats

if TYPE_CHECKING:
    from amqtt.session import Session

    from blendsm.broker._service import MarketplaceService

__all__ = ["SessionKeeper", "is_persistent"]

_log = logging.getLogger("blendsm.broker")
_QUEUE_FULL_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Offline queues fill at the pace of publishers: one line a minute, with a count."""
_NO_CHANNEL_LOG: Final = LogLimiter(_log)
"""Paid messages not queued for want of a channel: one line a minute, with a count."""
_CAP_LOG: Final = LogLimiter(_log, logging.WARNING)
"""CONNECTs refused at the per-identity cap are client-controlled: one line a minute."""


def is_persistent(session: Session) -> bool:
    """A session amqtt keeps after its connection: clean session 0 and not anonymous (amqtt
    neither queues for nor keeps anonymous sessions)."""
    return not session.clean_session and not session.is_anonymous


def queued_bytes(session: Session) -> int:
    """Payload bytes in ``session``'s offline queue (kept by :meth:`SessionKeeper.admit`)."""
    return int(getattr(session, "blendsm_queued_bytes", 0))


class SessionKeeper:
    """Expiry order, per-identity index and queue admission (see the module docstring)."""

    def __init__(
        self,
        config: SessionsConfig,
        stats: ServiceStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = stats
        self._clock = clock
        self._expiring: OrderedDict[str, tuple[float, Session]] = OrderedDict()
        """Disconnected persistent sessions: client id -> (deadline, session), oldest first."""
        self._reaped: OrderedDict[str, Session] = OrderedDict()
        """Disconnected sessions amqtt does not keep (clean or anonymous): dropped next tick."""
        self._by_identity: dict[str, dict[str, None]] = {}
        """Identity key -> client ids of its persistent sessions."""
        self._identity_of: dict[str, str] = {}

    @property
    def tick_seconds(self) -> float:
        """How often the monitor looks for due sessions: 1 s, or faster for a short expiry."""
        return min(1.0, self.config.expiry_seconds / 2)

    # --- the cap per identity -------------------------------------------------------------

    def admit_new(self, client_id: str, key: str, alive: Callable[[str], bool]) -> bool:
        """May ``key`` open the persistent session ``client_id``? Records it if so; counted
        and logged if not. ``alive`` says whether a recorded client id still has a session
        (a CONNECT that failed after admission leaves nothing behind)."""
        held = self._by_identity.setdefault(key, {})
        if client_id in held:
            return True
        if len(held) >= self.config.max_per_identity:
            for stale in [c for c in held if not alive(c)]:
                self.forget(stale)
            held = self._by_identity.setdefault(key, {})
        if len(held) >= self.config.max_per_identity:
            self.stats.persistent_sessions_refused += 1
            _CAP_LOG.note(
                "CONNECT of client %r refused: %s already holds %d persistent sessions"
                " (sessions.max_per_identity)",
                client_id,
                key,
                len(held),
            )
            return False
        held[client_id] = None
        self._identity_of[client_id] = key
        return True

    def forget(self, client_id: str) -> None:
        """The session ``client_id`` was deleted (clean CONNECT, revocation, expiry)."""
        self._expiring.pop(client_id, None)
        self._reaped.pop(client_id, None)
        key = self._identity_of.pop(client_id, None)
        if key is not None:
            held = self._by_identity.get(key)
            if held is not None:
                held.pop(client_id, None)
                if not held:
                    del self._by_identity[key]

    # --- expiry ---------------------------------------------------------------------------

    def connected(self, client_id: str) -> None:
        """A session was taken up by a new connection: it no longer expires."""
        self._expiring.pop(client_id, None)
        self._reaped.pop(client_id, None)

    def disconnected(self, session: Session) -> None:
        """``session`` lost its connection: it expires (persistent) or goes (the rest)."""
        client_id = session.client_id
        if not client_id:
            return
        self.connected(client_id)
        if is_persistent(session):
            self._expiring[client_id] = (self._clock() + self.config.expiry_seconds, session)
        else:
            self._reaped[client_id] = session

    def due(self) -> list[tuple[str, Session, bool]]:
        """Sessions to drop now: (client id, session, expired persistent session?)."""
        out: list[tuple[str, Session, bool]] = [(c, s, False) for c, s in self._reaped.items()]
        self._reaped.clear()
        now = self._clock()
        while self._expiring:
            client_id, (deadline, session) = next(iter(self._expiring.items()))
            if deadline > now:
                break
            del self._expiring[client_id]
            out.append((client_id, session, True))
        return out

    # --- the offline queue ------------------------------------------------------------------

    def admit(self, service: MarketplaceService, session: Session, topic: str, data: Any) -> bool:
        """May this message join ``session``'s offline queue? Counted and logged if not."""
        view = service.view
        paid = False
        if view.is_market_topic(topic):
            info = view.topic_for_name(topic)
            paid = info is None or bool(info.price)
            ident = getattr(session, "blendsm", None)
            key = getattr(ident, "key", "")
            account = None
            if info is not None and info.price and key:
                account = service.meter.select(key, info, view)
            if paid and (account is None or not account.usable):
                self.stats.offline_refused_no_channel += 1
                _NO_CHANNEL_LOG.note(
                    "message on %r not queued for offline client %r: no usable channel"
                    " naming this broker's operator (not charged)",
                    topic,
                    session.client_id,
                )
                return False
        size = len(data) if data is not None else 0
        held = session.retained_messages.qsize()
        held_bytes = queued_bytes(session)
        config = self.config
        if held >= config.max_queued_messages or held_bytes + size > config.max_queued_bytes:
            if paid:
                self.stats.offline_dropped += 1
            else:
                self.stats.offline_dropped_public += 1
            _QUEUE_FULL_LOG.note(
                "offline queue of %r full (%d messages, %d bytes; sessions.max_queued_messages"
                " %d, max_queued_bytes %d): a message on %r dropped, not charged",
                session.client_id,
                held,
                held_bytes,
                config.max_queued_messages,
                config.max_queued_bytes,
                topic,
            )
            return False
        session.blendsm_queued_bytes = held_bytes + size
        return True

    @staticmethod
    def taken(session: Session, data: Any, back: bool = False) -> None:
        """A message left the offline queue (or went ``back`` into it)."""
        size = len(data) if data is not None else 0
        session.blendsm_queued_bytes = max(0, queued_bytes(session) + (size if back else -size))
