"""QoS 1/2 deliveries of the fan-out, inline: no task per delivery.

A QoS 1/2 delivery on amqtt's path was one Task running ``MeteredHandler.mqtt_publish``. Since
:class:`~blendsm.broker._inflight.InflightHandler` keeps the outgoing flow as a state machine in
``session.inflight_out`` driven by the acknowledgements, nothing waits in that Task any more:
it only gated the delivery, took a packet id, recorded the message in flight and wrote it. The
fan-out (:func:`blendsm.broker._fanout.deliver`) does the same here, synchronously, for the
sessions it serves inline (connected, TCP/TLS, no reconnect in progress):

* the in-flight window first (``sessions.max_inflight_messages``): full, the delivery is not
  sent, not reserved, not charged, and counted, as on amqtt's path;
* the gate (the broadcast's ``service.gate``, as for QoS 0, else ``service.admit``): a paid delivery reserves its charge, and is preceded by its
  quote, or replaced by a payment request, queued the same way as for QoS 0;
* a packet id from the session, the :class:`OutgoingApplicationMessage` recorded in
  ``inflight_out`` before the write (if the connection is lost before the bytes are out, the
  reconnect re-sends it with DUP=1, never charged again), and the PUBLISH queued in the
  batch's :class:`~blendsm.broker._fanout.Outbox`, so it goes out in the session's one write of
  the batch, through ``write_to_session``, and its charge is committed when written.

The encoding is shared: for one broadcast and one QoS, the fixed header, remaining length and
topic are encoded once (:class:`AckedFrame`); each session adds only its 2-byte packet id in
front of the shared payload.

``tasked``/:func:`track_task`: a session with a delivery still pending on amqtt's path (a
Task, e.g. one that waited for a reconnect's redelivery) is not served inline until that Task
ended, so a later message never overtakes an earlier one (MQTT 3.1.1, 4.6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from amqtt.mqtt.publish import PublishPacket
from amqtt.session import OutgoingApplicationMessage, Session

from blendsm.broker._access import Verdict
from blendsm.broker._handoff import uncharged
from blendsm.broker._inflight import note_window_full
from blendsm.broker._meter import Charge
from blendsm.device_sdk import NOTICE, AnyNotice, control_topic, encode_notice

if TYPE_CHECKING:
    from amqtt.adapters import StreamWriterAdapter

    from blendsm.broker._handler import MeteredHandler

__all__ = ["AckedFrame", "AckedFrames", "add_notice", "deliver_acked", "tasked", "track_task"]


_PUBLISH: Final = 0x30
"""MQTT fixed header, packet type PUBLISH (3 << 4); QoS in bits 1-2, DUP bit 3, RETAIN bit 0."""


class _Outbox(Protocol):
    """What this module needs of :class:`blendsm.broker._fanout.Outbox` (which imports this
    module, and whose module mypy knows under its folder name: a Protocol, not an import)."""

    listeners: bool

    def add(
        self,
        session: Session,
        writer: StreamWriterAdapter,
        packet: PublishPacket,
        data: bytes,
        charge: Charge | None = None,
    ) -> None: ...


def _remaining_length(n: int) -> bytes:
    """MQTT variable-length integer (3.1.1, 2.2.3)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class AckedFrame:
    """One broadcast's PUBLISH at QoS 1 or 2: everything but the packet id encoded once."""

    __slots__ = ("_sent", "head", "payload", "qos", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int) -> None:
        self._sent: PublishPacket | None = None
        name = topic.encode("utf-8")
        remaining = 2 + len(name) + 2 + len(payload)  # topic, packet id, payload
        self.head = (
            bytes((_PUBLISH | qos << 1,))
            + _remaining_length(remaining)
            + len(name).to_bytes(2, "big")
            + name
        )
        self.payload = payload
        self.qos = qos
        self.topic = topic

    def encode(self, packet_id: int) -> bytes:
        """The PUBLISH to one session, DUP=0 (a redelivery is built by the in-flight flow)."""
        return b"".join((self.head, packet_id.to_bytes(2, "big"), self.payload))

    @property
    def sent(self) -> PublishPacket:
        """What marks a message of this frame as sent once (``publish_packet`` not None:
        its redelivery carries DUP=1, built again from the message by the in-flight flow,
        which reads nothing else of it). One per broadcast: building a packet per delivery
        cost about 4 us of a QoS 1 delivery's 80, for a mark."""
        if self._sent is None:
            self._sent = PublishPacket.build(self.topic, self.payload, 1, False, self.qos, False)
        return self._sent


class AckedFrames:
    """The QoS 1 and QoS 2 frames of one broadcast, each made on first use."""

    __slots__ = ("_frames", "payload", "topic")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload
        self._frames: dict[int, AckedFrame] = {}

    def at(self, qos: int) -> AckedFrame:
        frame = self._frames.get(qos)
        if frame is None:
            frame = self._frames[qos] = AckedFrame(self.topic, self.payload, qos)
        return frame


def deliver_acked(
    handler: MeteredHandler,
    session: Session,
    writer: StreamWriterAdapter,
    frame: AckedFrame,
    outbox: _Outbox,
    *,
    resend: bool = False,
    gate: Callable[[Session], Charge | Verdict] | None = None,
) -> Charge | Verdict | None:
    """Gate one QoS 1/2 delivery synchronously, record it in flight and queue it (with its
    quote, or the payment request that replaces it) in ``outbox``; a charge is settled when
    the outbox is written (see the module doc). A ``resend`` after a crash goes uncharged
    (:func:`~blendsm.broker._handoff.uncharged`). ``gate``: the broadcast's
    (``service.gate``, resends already uncharged by it), else ``service.admit`` decides.
    Returns the gate's verdict (None: not gated); NO_CREDIT is for the caller to hold
    (:mod:`~blendsm.broker._credit_hold`)."""
    if writer.is_closed or writer._writer.transport.is_closing():
        return None  # nothing can be written: not admitted, nothing reserved (amqtt: not sent)
    service = handler._blendsm
    inflight = session.inflight_out
    if len(inflight) >= service.config.sessions.max_inflight_messages:
        note_window_full(service, session, frame.topic)
        return None
    verdict = service.admit(session, frame.topic) if gate is None else gate(session)
    if resend:
        verdict = uncharged(verdict, service.meter)
    if verdict is Verdict.NO_CREDIT:
        request = service.payment_request_for(session)
        if request is not None:
            add_notice(outbox, session, writer, request)
        return verdict
    charge = verdict if type(verdict) is Charge else None
    if charge is None and verdict is not Verdict.FREE:
        return verdict  # denied
    try:
        if charge is not None:
            quote = service.quote_for(session, charge)
            if quote is not None:
                add_notice(outbox, session, writer, quote)
        packet_id = session.next_packet_id
        message = OutgoingApplicationMessage(
            packet_id, frame.topic, frame.qos, frame.payload, False
        )
        if outbox.listeners:  # a PACKET_SENT plugin gets the packet as written
            packet = PublishPacket.build(
                frame.topic, frame.payload, packet_id, False, frame.qos, False
            )
        else:
            packet = frame.sent
        message.publish_packet = packet  # sent once: a redelivery carries DUP=1
        data = frame.encode(packet_id)
        inflight[packet_id] = message  # before the write, as InflightHandler._send_tracked
    except BaseException:
        if charge is not None:
            service.meter.release(charge)  # not delivered: nothing reserved stays behind
        raise
    outbox.add(session, writer, packet, data, charge)
    return verdict


def add_notice(
    outbox: _Outbox, session: Session, writer: StreamWriterAdapter, notice: AnyNotice
) -> None:
    """A quote or payment request, QoS 0, queued right before what it is about (as the QoS 0
    path and ``MarketplaceService.send_notice`` do)."""
    ident = getattr(session, "blendsm", None)
    if ident is None or not ident.key:
        return
    packet = PublishPacket.build(
        control_topic(ident.key, NOTICE), encode_notice(notice), None, False, 0, False
    )
    outbox.add(session, writer, packet, packet.to_bytes())


# --- order between amqtt's path and the inline one -----------------------------------------


def tasked(session: Session) -> bool:
    """Whether a delivery to ``session`` is still pending on amqtt's path (a Task)."""
    return bool(getattr(session, "blendsm_tasks", 0))


def track_task(session: Session, task: asyncio.Future[Any]) -> None:
    """Count ``task`` (a delivery on amqtt's path) as pending for ``session`` until it ends."""
    session.blendsm_tasks = getattr(session, "blendsm_tasks", 0) + 1
    task.add_done_callback(lambda _t: _task_done(session))


def _task_done(session: Session) -> None:
    session.blendsm_tasks -= 1
