"""BlendSM's fan-out: one broadcast to every matching session, without a task per delivery.

amqtt 0.12.1's ``Broker._run_broadcast`` scans every subscription filter for each publish,
awaits the topic plugins (one Task per plugin) for each subscriber, and starts one Task per
delivery, in which the PUBLISH is encoded again for every subscriber. Here (``BlendBroker``
calls :func:`run_broadcast` instead):

* the matching sessions come from the topic trie (:class:`SubscriptionTable`), once per
  session at its highest granted QoS;
* a delivery to a connected session on a TCP or TLS transport is decided and metered inline,
  with no task: the gate (``service.gate`` for QoS 0, ``admit`` with the topic's half decided
  once per broadcast; it reserves a paid delivery), then the PUBLISH bytes, encoded once per
  broadcast, queued in the batch's :class:`Outbox`. At QoS 1/2 the packet id is taken and the
  message recorded in flight as well, the header and topic encoded once per broadcast and QoS
  (:mod:`blendsm.broker._fanout_acked`); one that meets a full in-flight window is held until
  an acknowledgement frees it (:mod:`~blendsm.broker._credit_hold`). The broadcasts already
  waiting in amqtt's queue, and
  those arriving within two loop turns (:data:`COALESCE_TURNS`, at most
  :data:`COALESCE_WINDOW` from the batch's start), are taken as one batch (up to
  :data:`MAX_BATCH`), and at its end each session's bytes are handed to its transport in one
  write, then its charges committed (or released when the transport is closing): charged
  exactly when written, as on amqtt's path, and a burst to one session costs one system call.
  A quote goes right before the first charged delivery of a price, a payment request when
  the credit ran out, both queued the same way;
* WebSocket transports, a session whose reconnect is still redelivering its messages in
  flight and replaying its queue (``blendsm_hold``: those go first) or that still has a
  delivery pending on this path (a later one must not overtake it), every delivery while
  ``MeteredHandler.mqtt_publish`` is replaced by a wrapper, and anything else keep amqtt's
  path: one Task running the handler's ``mqtt_publish``, gated and metered by
  :class:`MeteredHandler`;
* messages for an offline session are queued by ``_retain_broadcast_message`` as before;
* before any of this, a delivery to a session over its outgoing bound (a client that does not
  read) is not admitted: not gated, not charged, counted, or for QoS 1/2 to a persistent
  session put in its offline queue (:mod:`~blendsm.broker._backpressure`); every task started
  on amqtt's path is held against that bound until it ends.

Third-party amqtt plugins keep working: with a third-party topic plugin every delivery awaits
``_topic_filtering(RECEIVE)`` (amqtt's slower path), and a plugin listening to
``on_mqtt_packet_sent`` gets the event for every PUBLISH and notice written here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Action
from amqtt.events import MQTTEvents
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from blendsm.broker._access import Verdict
from blendsm.broker._backpressure import publish_size, track
from blendsm.broker._credit_hold import hold_for_credit, holding
from blendsm.broker._fanout_acked import (
    AckedFrames,
    add_notice,
    deliver_acked,
    tasked,
    track_task,
)
from blendsm.broker._handler import MeteredHandler, PublishedPayload
from blendsm.broker._handoff import Ticket, claim, handed, is_resend, uncharged
from blendsm.broker._inflight import note_window_full
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._meter import Charge, Meter

if TYPE_CHECKING:
    from blendsm.broker._delivery import DeliveryPath
    from blendsm.broker._service import MarketplaceService

__all__ = ["MAX_BATCH", "Outbox", "deliver_qos0_now", "run_broadcast", "write_to_session"]

MAX_BATCH: Final = 64
"""Broadcasts taken from amqtt's queue per ``_run_broadcast`` call: amqtt's loop starts one
Task per call, so a burst is handled in batches rather than one task per message."""

COALESCE_TURNS: Final = 2
"""Loop turns a batch waits for the next broadcast before it is written. amqtt's client loop
hands the broadcast queue one PUBLISH per one or two loop turns (an ``asyncio.wait`` per
message), so without waiting a batch held one broadcast and every delivery cost its own
``send`` system call (the paid benchmark: 30,000 writes for 30,000 deliveries); waiting two
turns halved that. The wait ends when two turns in a row bring nothing or the window is over,
so an idle broker adds two loop turns (microseconds) to a message's latency."""

COALESCE_WINDOW: Final = 0.001
"""Seconds from a batch's start after which it stops waiting for more broadcasts: bounds the
latency coalescing adds, and how many messages a session is sent ahead of its vouchers in one
write (the credit gate refuses paid deliveries beyond ``credit_messages`` unpaid)."""

_METERED_PUBLISH: Final = MeteredHandler.mqtt_publish
"""What the inline path stands in for: if ``MeteredHandler.mqtt_publish`` was replaced
(wrapped by an extension, or by a test playing a hostile broker), every delivery calls the
replacement instead."""

_log = logging.getLogger("blendsm.broker")
_FAILURE_LOG: Final = LogLimiter(_log, logging.ERROR)
"""A delivery that raised: logged once a minute at most (it may repeat per message)."""


_HELD_FRAME: Final = "blendsm_held_frame"
"""The key of amqtt's broadcast dict under which a held delivery's encoded PUBLISH is kept."""


class _Frame:
    """One broadcast's QoS 0 PUBLISH, encoded once and written to every session."""

    __slots__ = ("data", "packet", "topic")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.packet = PublishPacket.build(topic, payload, None, False, 0, False)
        self.data = self.packet.to_bytes()


class _Pending:
    """What one session gets at the end of a batch: its bytes, in order, and the charges
    that are committed once those bytes were written (released otherwise)."""

    __slots__ = ("charges", "chunks", "packets", "session", "size", "writer")

    def __init__(self, session: Session, writer: StreamWriterAdapter) -> None:
        self.session = session
        self.writer = writer
        self.size = 0
        self.chunks: list[bytes] = []
        self.charges: list[Charge] = []
        self.packets: list[PublishPacket] = []


class Outbox:
    """The inline deliveries of one batch of broadcasts, per session: each session's bytes
    are handed to its transport in one write when the batch ends (a burst of N messages to a
    session costs one system call, not N), and its charges committed right after.

    A session that gets a delivery on amqtt's path (a task) within the batch keeps its order:
    what was queued for it is written first, and its later deliveries of the batch take the
    task path too, behind that one."""

    __slots__ = ("_pending", "_sent", "_tasked", "count", "listeners", "size")

    def __init__(self, listeners: bool) -> None:
        self._pending: dict[int, _Pending] = {}
        self.size = 0
        """Bytes queued here for all sessions (an upper bound of any one session's share)."""
        self.count = 0
        """Packets queued here for all sessions."""
        self._tasked: set[int] = set()
        self._sent: list[tuple[Session, PublishPacket]] = []
        self.listeners = listeners
        """Whether a plugin listens to amqtt's PACKET_SENT event (then packets are kept)."""

    def takes(self, writer: object) -> bool:
        """Whether this writer's deliveries may still be queued here in this batch."""
        return id(writer) not in self._tasked

    def add(
        self,
        session: Session,
        writer: StreamWriterAdapter,
        packet: PublishPacket,
        data: bytes,
        charge: Charge | None = None,
    ) -> None:
        """Queue ``data`` (the encoding of ``packet``) for ``session``; ``charge`` is settled
        by :meth:`flush` with the write."""
        pending = self._pending.get(id(writer))
        if pending is None:
            pending = self._pending[id(writer)] = _Pending(session, writer)
        pending.chunks.append(data)
        pending.size += len(data)
        self.size += len(data)
        self.count += 1
        if charge is not None:
            pending.charges.append(charge)
        if self.listeners:
            pending.packets.append(packet)

    def pending(self, writer: object) -> tuple[int, int]:
        """(bytes, messages) queued here for this writer and not yet written."""
        pending = self._pending.get(id(writer))
        return (0, 0) if pending is None else (pending.size, len(pending.chunks))

    def before_task(self, writer: object, meter: Meter) -> None:
        """A delivery to this writer goes on amqtt's path: write what is queued for it now,
        and queue nothing more for it in this batch."""
        self._tasked.add(id(writer))
        pending = self._pending.pop(id(writer), None)
        if pending is not None:
            self._write(pending, meter)

    def write_now(self, writer: object, meter: Meter) -> None:
        """Write what is queued for this writer now and settle its charges (its later
        deliveries of the batch are queued again as usual)."""
        pending = self._pending.pop(id(writer), None)
        if pending is not None:
            self._write(pending, meter)

    def flush(self, meter: Meter) -> list[tuple[Session, PublishPacket]]:
        """Write every session's bytes; commit the charges of what was written, release the
        rest. Returns the (session, packet) pairs written, for PACKET_SENT listeners."""
        pending_all, self._pending = self._pending, {}
        self.size = self.count = 0
        for pending in pending_all.values():
            self._write(pending, meter)
        sent, self._sent = self._sent, []
        return sent

    def _write(self, pending: _Pending, meter: Meter) -> None:
        written = False
        try:
            chunks = pending.chunks
            written = write_to_session(
                pending.writer, chunks[0] if len(chunks) == 1 else b"".join(chunks), len(chunks)
            )
        finally:
            for charge in pending.charges:
                if written:
                    meter.commit(charge)
                else:
                    meter.release(charge)
        if written and pending.packets:
            self._sent.extend((pending.session, packet) for packet in pending.packets)


async def run_broadcast(broker: DeliveryPath, running_tasks: deque[asyncio.Task[Any]]) -> None:
    """One pass of amqtt's broadcast loop: the next broadcast and those already queued behind
    it (up to :data:`MAX_BATCH`), then every session's queued bytes written at once."""
    queue = broker._broadcast_queue
    broadcast = await queue.get()
    plugins = broker.plugins_manager
    outbox = Outbox(MQTTEvents.PACKET_SENT in plugins._event_plugin_callbacks)
    claimed: list[Ticket] = []  # market messages handed on (_handoff): acked after the write
    clock = asyncio.get_running_loop().time
    until = clock() + COALESCE_WINDOW
    try:
        taken = 1
        while True:
            if claim(broadcast, claimed):
                await deliver(broker, broadcast, running_tasks, outbox)
            # Take the next one only if this batch will deliver it: one taken off the queue
            # at the batch's bound and not delivered would be lost.
            if taken >= MAX_BATCH:
                break
            if queue.empty() and not await _next_within(queue, until, clock):
                break
            broadcast = queue.get_nowait()
            taken += 1
    finally:
        sent = outbox.flush(broker.service.meter)
        handed(claimed)
    for session, packet in sent:
        await plugins.fire_event(MQTTEvents.PACKET_SENT, packet=packet, session=session)


async def _next_within(queue: asyncio.Queue[Any], until: float, clock: Any) -> bool:
    """Whether another broadcast arrived within :data:`COALESCE_TURNS` loop turns and before
    ``until`` (the batch window)."""
    for _ in range(COALESCE_TURNS):
        if clock() >= until:
            return False
        await asyncio.sleep(0)
        if not queue.empty():
            return True
    return False


async def deliver(
    broker: DeliveryPath,
    broadcast: dict[str, Any],
    running_tasks: deque[asyncio.Task[Any]],
    outbox: Outbox,
) -> None:
    """Send one broadcast to every session subscribed to its topic (see the module doc):
    inline deliveries into ``outbox``, the others as tasks on amqtt's path."""
    topic = broadcast.get("topic")
    if not topic:
        return
    targets = broker.subscription_table().match(topic)
    if not targets:
        return
    service = broker.service
    data = broadcast.get("data")
    forced: int | None = broadcast.get("qos")
    publish_qos = data.publish_qos if type(data) is PublishedPayload else 2
    screened = broker.other_topic_plugins()
    inline = MeteredHandler.mqtt_publish is _METERED_PUBLISH
    frame: _Frame | None = None
    bound = service.backpressure
    size = publish_size(topic, data)
    acked: AckedFrames | None = None
    gate: Callable[[Session], Charge | Verdict] | None = None
    for session, granted in targets:
        qos = granted if forced is None else forced
        connected = session.transitions.state == "connected"
        if screened or not connected:
            gate = None  # decided again after the await: the chain view may have changed
            if not await broker._topic_filtering(session, topic, Action.RECEIVE):
                continue
            connected = session.transitions.state == "connected"
        if not connected:
            # MQTT 3.1.2.4: kept for a persistent session at QoS 1/2 (amqtt: not anonymous).
            if not session.clean_session and qos in (1, 2) and not session.is_anonymous:
                await broker._retain_broadcast_message(broadcast, qos, session)
            continue
        handler = broker._get_handler(session)
        if handler is None:
            continue
        writer = handler.writer
        flow = getattr(writer, "blendsm_flow", None) or bound.flow(writer)
        if (
            flow is not None
            # the common case first: nothing in the session's transport buffer, and what it
            # holds plus the whole batch so far fits its bounds (else: its own share of the
            # batch is looked up)
            and not flow.fits_now(outbox.size + size, outbox.count + 1)
            and not flow.admits(session, size, 1, *outbox.pending(writer))
        ):
            await _not_admitted(broker, broadcast, session, min(qos, publish_qos), qos)
            gate = None  # decided again after the await: the chain view may have changed
            continue
        held = holding(session, topic)
        if held is not None:
            # A message of this topic waits for credit: this one queues behind it (gated when
            # its turn comes), so the order per topic is kept (:mod:`._credit_hold`).
            held.push(broadcast, topic, data, min(qos, publish_qos), qos, size)
            continue
        if (
            inline
            and data is not None
            and type(handler) is MeteredHandler
            and type(writer) is StreamWriterAdapter
            and getattr(session, "blendsm_hold", None) is None
            and outbox.takes(writer)
            and not tasked(session)
        ):
            delivered_qos = min(qos, publish_qos)
            if writer.is_closed or writer._writer.transport.is_closing():
                # Aborted (a slow consumer, a lost connection) before amqtt marked the session
                # disconnected: what a persistent session keeps while away is queued for its
                # reconnect, as for a disconnected one, not dropped here.
                if delivered_qos and not session.clean_session and not session.is_anonymous:
                    await broker._retain_broadcast_message(broadcast, qos, session)
                    gate = None  # decided again after the await
                continue
            try:
                if delivered_qos == 0:
                    if frame is None:
                        frame = _Frame(topic, bytes(data))
                    if gate is None:
                        gate = service.gate(topic)
                        if is_resend(data):
                            gate = _uncharged_gate(gate, service.meter)
                    verdict = _deliver_qos0(service, gate, session, writer, frame, outbox)
                elif handler.window_full():
                    # Unacknowledged up to sessions.max_inflight_messages: held until an
                    # acknowledgement frees the window (:mod:`._credit_hold`), not dropped.
                    outbox.write_now(writer, service.meter)  # what is queued goes first
                    if not hold_for_credit(
                        service,
                        session,
                        broadcast,
                        topic,
                        data,
                        delivered_qos,
                        qos,
                        size,
                        flow,
                        window=True,
                    ):
                        note_window_full(service, session, topic)
                    continue
                else:
                    if acked is None:
                        acked = AckedFrames(topic, bytes(data))
                    if gate is None:
                        gate = service.gate(topic)
                        if is_resend(data):
                            gate = _uncharged_gate(gate, service.meter)
                    verdict = deliver_acked(
                        handler, session, writer, acked.at(delivered_qos), outbox, gate=gate
                    )
                if verdict is Verdict.NO_CREDIT:
                    outbox.write_now(writer, service.meter)  # what is queued goes first
                    hold_for_credit(
                        service, session, broadcast, topic, data, delivered_qos, qos, size, flow
                    )
            except Exception as exc:
                _FAILURE_LOG.note("delivery on %r to %r failed: %r", topic, session.client_id, exc)
            continue
        outbox.before_task(writer, service.meter)
        task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        if flow is not None:
            track(task, flow, size)  # held against the session's bound until it ends
        running_tasks.append(task)
        track_task(session, task)


async def _not_admitted(
    broker: DeliveryPath, broadcast: dict[str, Any], session: Session, qos: int, granted: int
) -> None:
    """A delivery to a session over its outgoing bound (:mod:`~blendsm.broker._backpressure`):
    QoS 1/2 to a persistent session goes to its offline queue (bounded there), anything else
    is dropped; counted either way, nothing reserved or charged."""
    stats = broker.service.stats
    if qos and not session.clean_session and not session.is_anonymous:
        stats.deliveries_queued_slow_consumer += 1
        await broker._retain_broadcast_message(broadcast, granted, session)
    else:
        stats.deliveries_dropped_slow_consumer += 1


def _uncharged_gate(
    gate: Callable[[Session], Charge | Verdict], meter: Meter
) -> Callable[[Session], Charge | Verdict]:
    """``gate`` for a re-send after a crash: paid deliveries go free (:func:`uncharged`)."""
    return lambda session: uncharged(gate(session), meter)


def _deliver_qos0(
    service: MarketplaceService,
    gate: Callable[[Session], Charge | Verdict],
    session: Session,
    writer: StreamWriterAdapter,
    frame: _Frame,
    outbox: Outbox,
) -> Charge | Verdict | None:
    """Gate one QoS 0 delivery synchronously (``gate``: ``service.gate`` of the broadcast's
    topic) and queue it (with its quote, or the payment request that replaces it) in
    ``outbox``; a charge is settled when the outbox is written. Returns the gate's verdict
    (None: not gated, nothing can be written): NO_CREDIT is for the caller to hold."""
    if writer.is_closed or writer._writer.transport.is_closing():
        return None  # nothing can be written: not admitted, nothing reserved
    verdict = gate(session)
    if verdict is Verdict.FREE:
        outbox.add(session, writer, frame.packet, frame.data)
    elif type(verdict) is Charge:
        try:
            quote = service.quote_for(session, verdict)
            if quote is not None:
                add_notice(outbox, session, writer, quote)
        except BaseException:
            service.meter.release(verdict)  # not delivered: nothing reserved stays behind
            raise
        outbox.add(session, writer, frame.packet, frame.data, verdict)
    elif verdict is Verdict.NO_CREDIT:
        # The request states what was charged: the deliveries queued ahead of it in this
        # batch are only reserved until written, so write them first (a batch may hold
        # several broadcasts) and ask for the full amount, not for what an earlier write
        # committed.
        outbox.write_now(writer, service.meter)
        request = service.payment_request_for(session)
        if request is not None:
            add_notice(outbox, session, writer, request)
    return verdict


def deliver_qos0_now(
    service: MarketplaceService,
    gate: Callable[[Session], Charge | Verdict],
    session: Session,
    writer: StreamWriterAdapter,
    topic: str,
    payload: bytes | bytearray,
    outbox: Outbox,
    *,
    resend: bool = False,
    broadcast: dict[str, Any] | None = None,
) -> Charge | Verdict | None:
    """One QoS 0 delivery of ``payload`` gated and queued in ``outbox`` as the fan-out does
    (a ``resend`` after a crash uncharged): for deliveries held for credit
    (:mod:`~blendsm.broker._credit_hold`), which are sent when a voucher lands. With the
    ``broadcast`` it came from, its PUBLISH is encoded once for every session it was held
    for (kept in the broadcast while any of them still holds it), not once per session."""
    if resend:
        gate = _uncharged_gate(gate, service.meter)
    kept = None if broadcast is None else broadcast.get(_HELD_FRAME)
    if type(kept) is _Frame and kept.topic == topic:
        frame: _Frame = kept
    else:
        frame = _Frame(topic, bytes(payload))
        if broadcast is not None:
            broadcast[_HELD_FRAME] = frame
    return _deliver_qos0(service, gate, session, writer, frame, outbox)


def write_to_session(writer: StreamWriterAdapter, data: bytes, messages: int = 1) -> bool:
    """Hand ``data`` (``messages`` packets) to a session's transport without waiting for it
    to drain: True when the transport took it. The one place the fan-out writes to a session:
    a write to a session already at its outgoing bound is refused and counted
    (:meth:`~blendsm.broker._backpressure.Flow.may_write`), so a transport holds at most
    ``sessions.max_outgoing_bytes`` plus one write."""
    transport = writer._writer.transport
    if writer.is_closed or transport.is_closing():
        return False
    flow = getattr(writer, "blendsm_flow", None)
    if flow is not None and not flow.may_write(len(data), messages):
        flow.refused(messages)
        return False
    transport.write(data)
    if flow is not None:
        flow.wrote(len(data), messages)
    return not transport.is_closing()  # a failed send closes the transport at once
