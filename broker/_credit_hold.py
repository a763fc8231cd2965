"""Paid deliveries refused for credit are held, not dropped, until a voucher lands.

Why: the credit gate lets a subscriber be at most ``payments.credit_messages`` unpaid, and the
SDK pays for what it *received*. Between the broker writing a message and its voucher raising
``paid`` lie the subscriber's socket buffer, its reading and verifying, its signing, the
intake's linger and one fsync: under a burst, or any stall of the subscriber longer than a
few messages' time, the credit was empty and every delivery in that window was dropped
(counted in ``deliveries_denied_no_credit``) though the subscriber was paying as fast as it
received. Holding them turns a payment stall into latency instead of loss.

The rule, per connected session served inline by the fan-out (:mod:`~blendsm.broker._fanout`,
:mod:`~blendsm.broker._fanout_acked`):

* a delivery refused for credit (``Verdict.NO_CREDIT``; never one refused for deposit, entitlement
  or channel) is appended to the session's :class:`CreditHold`, a FIFO, and the hold waits on
  the account (``Account.waiters``); the payment request still goes out as before;
* a later delivery on a topic with a message held queues behind it, ungated (it is gated when
  its turn comes), so the order per topic is kept;
* when a voucher raises ``paid`` (:mod:`~blendsm.broker._voucher_intake`), :meth:`CreditHold.resume`
  gates, reserves, writes and charges the held deliveries in order, exactly as live ones
  (charged only when written); a topic whose head is still refused stays held, behind it;
* bounds: ``payments.hold_messages`` held per session (past it the oldest is dropped) and
  ``payments.hold_seconds`` of age (a timer drops the expired ones); their bytes and count are
  held against the session's outgoing bound (``sessions.max_outgoing_bytes`` /
  ``max_outgoing_messages``) like deliveries in flight, but give way there: a delivery or
  notice that would pass the bound drops the oldest held first (:meth:`CreditHold.give_room`),
  and only what waits on the client's socket can make it a slow consumer (a member that reads
  but pays late was paused, then disconnected). A dropped held delivery was never
  reserved nor charged; it is counted as a denial for credit (as before the hold existed) and in
  ``blendsm_deliveries_held_dropped_total``, logged at most once a minute;
* a disconnect (or a transport found closing) ends the hold: QoS 1/2 to a persistent session go
  to its offline queue, in order (gated and charged at the replay, as the other paths do), the
  rest are dropped, counted, never charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from amqtt.adapters import StreamWriterAdapter
from amqtt.events import MQTTEvents

from blendsm.broker._access import Verdict
from blendsm.broker._handoff import is_resend
from blendsm.broker._log_limit import LogLimiter

if TYPE_CHECKING:
    from amqtt.session import Session

    from blendsm.broker._backpressure import Flow
    from blendsm.broker._meter import Account
    from blendsm.broker._service import MarketplaceService

__all__ = [
    "CreditHold",
    "end_credit_hold",
    "hold_for_credit",
    "holding",
    "session_hold",
]

_ATTR: Final = "blendsm_credit_hold"
"""The session attribute holding its :class:`CreditHold` (set at its first hold)."""

_log = logging.getLogger("blendsm.broker")
_drop_logs: weakref.WeakKeyDictionary[Any, LogLimiter] = weakref.WeakKeyDictionary()
"""Per service: held deliveries dropped, one INFO line a minute with a count."""


def _drop_log(service: MarketplaceService) -> LogLimiter:
    limiter = _drop_logs.get(service)
    if limiter is None:
        limiter = _drop_logs[service] = LogLimiter(service.log)
    return limiter


class _Held:
    """One delivery waiting for credit: what the fan-out had in hand when it was refused."""

    __slots__ = (
        "account",
        "broadcast",
        "data",
        "granted",
        "qos",
        "since",
        "size",
        "topic",
        "window",
    )

    def __init__(
        self,
        broadcast: dict[str, Any],
        topic: str,
        data: Any,
        qos: int,
        granted: int,
        size: int,
        since: float,
        account: Account | None,
        window: bool = False,
    ) -> None:
        self.broadcast = broadcast
        self.topic = topic
        self.data = data
        self.qos = qos
        """The QoS it is delivered with (min of publish and granted)."""
        self.granted = granted
        """The subscription's QoS (what the offline queue keeps it at)."""
        self.size = size
        self.since = since
        self.account = account
        """The account it was refused on (for one queued behind: its topic's last one)."""
        self.window = window
        """Held for the in-flight window, not for credit (or queued behind one that was)."""


def session_hold(session: Any) -> CreditHold | None:
    """The session's hold, if it ever held a delivery."""
    hold: CreditHold | None = getattr(session, _ATTR, None)
    return hold


def holding(session: Session, topic: str) -> CreditHold | None:
    """The session's hold if it holds a message of ``topic`` (a new one queues behind it)."""
    hold = session_hold(session)
    if hold is not None and topic in hold.topics:
        return hold
    return None


def hold_for_credit(
    service: MarketplaceService,
    session: Session,
    broadcast: dict[str, Any],
    topic: str,
    data: Any,
    qos: int,
    granted: int,
    size: int,
    flow: Flow | None,
    *,
    window: bool = False,
) -> bool:
    """Hold a delivery the gate just refused for credit (``ident.owing`` is its account),
    or, ``window``, a QoS 1/2 one that met a full in-flight window (not gated yet) until an
    acknowledgement frees it. False when holding is off (``payments.hold_messages`` 0): it
    stays dropped."""
    if service.config.payments.hold_messages <= 0:
        return False
    hold = _hold_of(service, session, flow)
    if window:
        hold.window_waiting = True
        hold.push(broadcast, topic, data, qos, granted, size, window=True)
        return True
    ident = getattr(session, "blendsm", None)
    account = ident.owing if ident is not None else None
    service.meter.held(account)  # a hold, not a denial (yet): the gate counted one
    service.stats.deliveries_denied -= 1
    hold.push(broadcast, topic, data, qos, granted, size, account)
    return True


def _hold_of(service: MarketplaceService, session: Session, flow: Flow | None) -> CreditHold:
    hold = session_hold(session)
    if hold is None:
        hold = CreditHold(service, session)
        setattr(session, _ATTR, hold)
    if flow is not None:
        hold.adopt(flow)
    return hold


async def end_credit_hold(broker: Any, session: Session) -> None:
    """The session's connection ended: its held QoS 1/2 messages go to a persistent
    session's offline queue, in order; the rest are dropped (counted, never charged)."""
    hold = session_hold(session)
    if hold is not None:
        await hold.evacuate(broker)


class CreditHold:
    """One connected session's deliveries waiting for credit (see the module doc)."""

    __slots__ = (
        "_accounts",
        "_flow",
        "_loop",
        "_max_items",
        "_service",
        "_timer",
        "_windows",
        "bytes",
        "items",
        "session",
        "topics",
        "window_waiting",
    )

    def __init__(self, service: MarketplaceService, session: Session) -> None:
        self._service = service
        self.session = session
        self.items: deque[_Held] = deque()
        self.topics: dict[str, int] = {}
        """Held messages per topic: a new delivery of one of them queues behind."""
        self._accounts: dict[str, Account | None] = {}
        """Per held topic, the account its latest refusal was on (one queued behind: that)."""
        self._windows: dict[str, bool] = {}
        """Per held topic, whether its latest hold was for the in-flight window."""
        self.window_waiting = False
        """A delivery here waits for the in-flight window: an acknowledgement resumes."""
        self.bytes = 0
        """The held deliveries' bytes (their share of the outgoing bound)."""
        self._flow: Flow | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._max_items = service.config.payments.hold_messages

    def adopt(self, flow: Flow) -> None:
        """Count the held bytes against this connection's outgoing bound from now on."""
        if flow is self._flow:
            return
        old, self._flow = self._flow, flow
        if old is not None and old.hold is self:
            old.hold = None
        flow.hold = self
        for item in self.items:
            if old is not None:
                old.task_ended(item.size)
            flow.task_started(item.size)

    # --- the outgoing bound (:class:`~blendsm.broker._backpressure.HeldForCredit`) -------

    def share(self) -> tuple[int, int]:
        """(bytes, messages) held here, all counted against the connection's bound."""
        return self.bytes, len(self.items)

    def give_room(self, nbytes: int, messages: int) -> tuple[int, int]:
        """The connection's outgoing bound is reached: drop the oldest held deliveries (for
        credit: counted, never charged) until ``nbytes`` and ``messages`` are freed or none
        is left. The (bytes, messages) freed."""
        freed_bytes = freed_messages = 0
        dropped: list[_Held] = []
        while self.items and (freed_bytes < nbytes or freed_messages < messages):
            item = self.items.popleft()
            dropped.append(item)
            self._drop(item, "its share of sessions.max_outgoing_bytes/messages reached")
            freed_bytes += item.size
            freed_messages += 1
        if dropped and not self.items:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._unwait(dropped)  # nothing left to send: no account keeps this hold alive
        return freed_bytes, freed_messages

    # --- in ---------------------------------------------------------------------------

    def push(
        self,
        broadcast: dict[str, Any],
        topic: str,
        data: Any,
        qos: int,
        granted: int,
        size: int,
        account: Account | None = None,
        *,
        window: bool | None = None,
    ) -> None:
        """Append a delivery (refused for credit, met a full in-flight window, or queued
        behind one of its topic)."""
        if account is None:
            account = self._accounts.get(topic)
        else:
            self._accounts[topic] = account
        if window is None:
            window = self._windows.get(topic, False)
        else:
            self._windows[topic] = window
        items = self.items
        while len(items) >= self._max_items:
            self._drop(items.popleft(), "payments.hold_messages reached")
        now = self._loop.time()
        items.append(_Held(broadcast, topic, data, qos, granted, size, now, account, window))
        topics = self.topics
        topics[topic] = topics.get(topic, 0) + 1
        self.bytes += size
        if self._flow is not None:
            self._flow.task_started(size)
        if window:
            self._service.stats.deliveries_held_for_window += 1
        else:
            self._service.stats.deliveries_held_for_credit += 1
        if account is not None and self not in account.waiters:
            self._wait_on(account)
        if self._timer is None:
            hold_seconds = self._service.config.payments.hold_seconds
            self._timer = self._loop.call_at(items[0].since + hold_seconds, self._expire)

    # --- out: a voucher landed ----------------------------------------------------------

    def resume(self) -> None:
        """A voucher raised ``paid`` on an account this hold waits on: deliver what now fits,
        in order, in one write (synchronous: the intake calls it right after the commit)."""
        service = self._service
        broker = service.broker
        session = self.session
        handler = broker._get_handler(session) if broker is not None else None
        writer: Any = getattr(handler, "writer", None)
        if (
            handler is None
            or session.transitions.state != "connected"
            or type(writer) is not StreamWriterAdapter
            or writer.is_closed
            or writer._writer.transport.is_closing()
        ):
            if broker is not None:
                service._spawn(self.evacuate(broker), "blendsm-credit-hold-end")
            return
        from blendsm.broker._fanout import Outbox, deliver_qos0_now  # imports this module
        from blendsm.broker._fanout_acked import AckedFrame, deliver_acked

        plugins = broker.plugins_manager
        outbox = Outbox(MQTTEvents.PACKET_SENT in plugins._event_plugin_callbacks)
        meter = service.meter
        blocked: set[str] = set()
        kept: deque[_Held] = deque()
        # The topic's half of the gate, decided once per topic for this resume (synchronous:
        # the chain view cannot change under it), as the fan-out does once per broadcast.
        gates: dict[str, Callable[[Session], Any]] = {}
        items = self.items
        while items:
            if blocked and len(blocked) == len(self.topics):
                # Every topic still held is refused again: the rest stays where it is, in
                # order, not looked at nor moved (a burst holds up to ``hold_messages`` of one
                # topic and a voucher frees a credit's worth: walking, or even moving, all of
                # them per voucher cost more than the deliveries it released).
                break
            item = items.popleft()
            if item.topic in blocked:
                kept.append(item)
                continue
            if item.qos and handler.window_full():
                # The in-flight window is full: this and everything after it wait for an
                # acknowledgement (:meth:`window_freed`), in order.
                self.window_waiting = True
                kept.append(item)
                break
            self._forget(item)
            resend = is_resend(item.data)
            try:
                if item.qos == 0:
                    gate = gates.get(item.topic)
                    if gate is None:
                        gate = gates[item.topic] = service.gate(item.topic)
                    verdict = deliver_qos0_now(
                        service,
                        gate,
                        session,
                        writer,
                        item.topic,
                        item.data,
                        outbox,
                        resend=resend,
                        broadcast=item.broadcast,
                    )
                else:
                    verdict = deliver_acked(
                        handler,
                        session,
                        writer,
                        AckedFrame(item.topic, bytes(item.data), item.qos),
                        outbox,
                        resend=resend,
                    )
            except Exception as exc:
                _log.warning("held delivery on %r failed: %r", item.topic, exc)
                continue
            if verdict is None and (writer.is_closed or writer._writer.transport.is_closing()):
                # The connection failed under this write: the rest ends with it (evacuated).
                self._keep(item)
                kept.append(item)
                break
            if verdict is Verdict.NO_CREDIT:
                ident = getattr(session, "blendsm", None)
                if ident is not None and ident.owing is not None:
                    item.account = ident.owing
                if item.window:  # its window came free, its credit did not: held for that
                    item.window = False
                    service.stats.deliveries_held_for_credit += 1
                meter.held(item.account)  # still held: the gate counted a denial
                service.stats.deliveries_denied -= 1
                self._keep(item)
                kept.append(item)
                blocked.add(item.topic)
        if kept:  # what was taken and is still held goes back in front of the rest, in order
            items.extendleft(reversed(kept))
        sent = outbox.flush(meter)
        if not self.items and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.items and (writer.is_closed or writer._writer.transport.is_closing()):
            service._spawn(self.evacuate(broker), "blendsm-credit-hold-end")
        for s, packet in sent:
            service._spawn(
                plugins.fire_event(MQTTEvents.PACKET_SENT, packet=packet, session=s),
                "blendsm-packet-sent",
            )

    def window_freed(self) -> None:
        """An acknowledgement made room in the in-flight window: resume if a delivery here
        waits for it (synchronous: the acknowledgement's handler calls it)."""
        if self.window_waiting:
            self.window_waiting = False
            self.resume()

    # --- bounds and the end --------------------------------------------------------------

    def _expire(self) -> None:
        """``payments.hold_seconds`` after the oldest arrived: drop what is that old."""
        self._timer = None
        if self.session.transitions.state != "connected":
            broker = self._service.broker
            if broker is not None:
                self._service._spawn(self.evacuate(broker), "blendsm-credit-hold-end")
            return
        loop = asyncio.get_running_loop()
        seconds = self._service.config.payments.hold_seconds
        now = loop.time()
        dropped: list[_Held] = []
        while self.items and now - self.items[0].since >= seconds:
            dropped.append(self.items.popleft())
            self._drop(dropped[-1], "payments.hold_seconds passed")
        if self.items:
            self._timer = loop.call_at(self.items[0].since + seconds, self._expire)
        else:
            self._unwait(dropped)  # nothing left to send: no account keeps this hold alive

    async def evacuate(self, broker: Any) -> None:
        """The connection is gone: QoS 1/2 of a persistent session to its offline queue, in
        order; the rest dropped."""
        items, self.items = self.items, deque()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session = self.session
        persistent = not session.clean_session and not session.is_anonymous
        queue: list[_Held] = []
        for item in items:
            self._forget(item)
            if item.qos and persistent:
                queue.append(item)
            else:
                self._service.stats.deliveries_held_dropped += 1
        for item in queue:
            with contextlib.suppress(Exception):
                await broker._retain_broadcast_message(item.broadcast, item.granted, session)
        self._unwait(items)

    def _unwait(self, items: Iterable[_Held]) -> None:
        """Stop waiting on the accounts of ``items`` (the hold is empty)."""
        for account in {id(i.account): i.account for i in items if i.account}.values():
            with contextlib.suppress(ValueError):
                account.waiters.remove(self)

    def _drop(self, item: _Held, why: str) -> None:
        self._forget(item)
        stats = self._service.stats
        stats.deliveries_held_dropped += 1
        if item.window:
            stats.inflight_dropped += 1
            _drop_log(self._service).note(
                "message on %r to client %r dropped after waiting for its in-flight window"
                " (sessions.max_inflight_messages): %s (not charged)",
                item.topic,
                getattr(self.session, "client_id", None),
                why,
            )
            return
        stats.deliveries_denied += 1
        self._service.meter.dropped_for_credit(item.account)
        _drop_log(self._service).note(
            "paid message on %r to client %r dropped after waiting for credit: %s (not charged)",
            item.topic,
            getattr(self.session, "client_id", None),
            why,
        )

    def _forget(self, item: _Held) -> None:
        """``item`` leaves the hold: its topic count and its share of the outgoing bound."""
        count = self.topics[item.topic] - 1
        if count:
            self.topics[item.topic] = count
        else:
            del self.topics[item.topic]
            self._accounts.pop(item.topic, None)
            self._windows.pop(item.topic, None)
        self.bytes -= item.size
        if self._flow is not None:
            self._flow.task_ended(item.size)

    def _keep(self, item: _Held) -> None:
        """``item`` stays (refused again on resume): counted back in."""
        self.topics[item.topic] = self.topics.get(item.topic, 0) + 1
        self._accounts[item.topic] = item.account
        self._windows[item.topic] = item.window
        self.bytes += item.size
        if self._flow is not None:
            self._flow.task_started(item.size)
        account = item.account
        if account is not None and self not in account.waiters:
            self._wait_on(account)

    def _wait_on(self, account: Account) -> None:
        """Wait for a voucher of ``account`` (the gate's refusal already expedited one on its
        way: :meth:`~blendsm.broker._voucher_intake.VoucherIntake.expedite`)."""
        account.waiters.append(self)
