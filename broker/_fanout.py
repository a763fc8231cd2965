"""BlendSM's fan-out: one broadcast to every matching session, without a task per delivery.

amqtt 0.12.1's ``Broker._run_broadcast`` scans every subscription filter for each publish,
awaits the topic plugins (one Task per plugin) for each subscriber, and starts one Task per
delivery, in which the PUBLISH is encoded again for every subscriber. Here (``BlendBroker``
calls :func:`run_broadcast` instead):

* the matching sessions come from the topic trie (:class:`SubscriptionTable`), once per
  session at its highest granted QoS;
* a QoS 0 delivery to a connected session on a TCP or TLS transport is decided, written and
  metered inline: the gate (``service.admit``), then the PUBLISH bytes, encoded once per
  broadcast, handed to the session's transport, then the charge committed (or released when
  the transport is closing): charged exactly when written, as on amqtt's path. A quote goes
  out right before the first charged delivery of a price, a payment request when the credit
  ran out, both written the same way;
* QoS 1/2 deliveries (which hold a packet id and wait for acknowledgements), WebSocket
  transports and anything else keep amqtt's path: one Task running the handler's
  ``mqtt_publish``, gated and metered by :class:`MeteredHandler`;
* messages for an offline session are queued by ``_retain_broadcast_message`` as before.

Third-party amqtt plugins keep working: with a third-party topic plugin every delivery awaits
``_topic_filtering(RECEIVE)`` (amqtt's slower path), and a plugin listening to
``on_mqtt_packet_sent`` gets the event for every PUBLISH and notice written here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Action
from amqtt.events import MQTTEvents
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from blendsm.broker._access import Verdict
from blendsm.broker._handler import MeteredHandler, PublishedPayload
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._meter import Charge
from blendsm.device_sdk import NOTICE, AnyNotice, control_topic, encode_notice

if TYPE_CHECKING:
    from blendsm.broker._blend_broker import BlendBroker
    from blendsm.broker._service import MarketplaceService

__all__ = ["MAX_BATCH", "run_broadcast", "write_to_session"]

MAX_BATCH: Final = 64
"""Broadcasts taken from amqtt's queue per ``_run_broadcast`` call: amqtt's loop starts one
Task per call, so a burst is handled in batches rather than one task per message."""

_log = logging.getLogger("blendsm.broker")
_FAILURE_LOG: Final = LogLimiter(_log, logging.ERROR)
"""A delivery that raised: logged once a minute at most (it may repeat per message)."""


class _Frame:
    """One broadcast's QoS 0 PUBLISH, encoded once and written to every session."""

    __slots__ = ("data", "packet")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.packet = PublishPacket.build(topic, payload, None, False, 0, False)
        self.data = self.packet.to_bytes()


async def run_broadcast(broker: BlendBroker, running_tasks: deque[asyncio.Task[Any]]) -> None:
    """One pass of amqtt's broadcast loop: the next broadcast, and the ones already queued
    behind it (up to :data:`MAX_BATCH`)."""
    queue = broker._broadcast_queue
    broadcast = await queue.get()
    for _ in range(MAX_BATCH):
        await deliver(broker, broadcast, running_tasks)
        if queue.empty():
            return
        broadcast = queue.get_nowait()
    await deliver(broker, broadcast, running_tasks)


async def deliver(
    broker: BlendBroker, broadcast: dict[str, Any], running_tasks: deque[asyncio.Task[Any]]
) -> None:
    """Send one broadcast to every session subscribed to its topic (see the module doc)."""
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
    listeners = MQTTEvents.PACKET_SENT in broker.plugins_manager._event_plugin_callbacks
    frame: _Frame | None = None
    for session, granted in targets:
        qos = granted if forced is None else forced
        connected = session.transitions.state == "connected"
        if screened or not connected:
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
        if (
            min(qos, publish_qos) == 0
            and data is not None
            and type(handler) is MeteredHandler
            and type(handler.writer) is StreamWriterAdapter
        ):
            if frame is None:
                frame = _Frame(topic, bytes(data))
            try:
                sent = _deliver_qos0(service, session, handler.writer, topic, frame)
            except Exception as exc:
                _FAILURE_LOG.note("delivery on %r to %r failed: %r", topic, session.client_id, exc)
                continue
            if listeners:
                for packet in sent:
                    await handler.plugins_manager.fire_event(
                        MQTTEvents.PACKET_SENT, packet=packet, session=session
                    )
            continue
        running_tasks.append(
            asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        )


def _deliver_qos0(
    service: MarketplaceService,
    session: Session,
    writer: StreamWriterAdapter,
    topic: str,
    frame: _Frame,
) -> tuple[PublishPacket, ...]:
    """Gate, write and meter one QoS 0 delivery, synchronously: the packets written (for
    amqtt's PACKET_SENT event), in order."""
    transport = writer._writer.transport
    if writer.is_closed or transport.is_closing():
        return ()  # nothing can be written: not admitted, nothing reserved
    verdict = service.admit(session, topic)
    if verdict is Verdict.FREE:
        return (frame.packet,) if write_to_session(writer, frame.data) else ()
    if type(verdict) is Charge:
        written = False
        try:
            quote = service.quote_for(session, verdict)
            notice = _write_notice(writer, session, quote) if quote is not None else None
            written = write_to_session(writer, frame.data)
        finally:
            if written:
                service.meter.commit(verdict)
            else:
                service.meter.release(verdict)
        if not written:
            return ()
        return (frame.packet,) if notice is None else (notice, frame.packet)
    if verdict is Verdict.NO_CREDIT:
        request = service.payment_request_for(session)
        if request is not None:
            notice = _write_notice(writer, session, request)
            if notice is not None:
                return (notice,)
    return ()


def write_to_session(writer: StreamWriterAdapter, data: bytes) -> bool:
    """Hand ``data`` to a session's transport without waiting for it to drain: True when the
    transport took it. The one place the fan-out writes to a session, so a bound on what a
    session may have buffered belongs here."""
    transport = writer._writer.transport
    if writer.is_closed or transport.is_closing():
        return False
    transport.write(data)
    return not transport.is_closing()  # a failed send closes the transport at once


def _write_notice(
    writer: StreamWriterAdapter, session: Session, notice: AnyNotice
) -> PublishPacket | None:
    """A quote or payment request to this session, QoS 0, written right before what it is
    about (as ``MarketplaceService.send_notice`` does on amqtt's path): the packet, if
    written."""
    ident = getattr(session, "blendsm", None)
    if ident is None or not ident.key:
        return None
    packet = PublishPacket.build(
        control_topic(ident.key, NOTICE), encode_notice(notice), None, False, 0, False
    )
    return packet if write_to_session(writer, packet.to_bytes()) else None
