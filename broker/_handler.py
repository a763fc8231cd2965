"""``MeteredHandler``: one client connection's protocol handler, with BlendSM's delivery path.

Every PUBLISH amqtt sends to a client goes through :meth:`MeteredHandler.mqtt_publish`: the
delivery gate decides synchronously (free, charged, or refused), and a charged delivery is
committed in :meth:`MeteredHandler._send_packet` only once its bytes were written, so a
subscriber is charged for exactly what was sent. The handler also enforces the client's
keepalive, de-duplicates and anchors the envelopes a device publishes, and delivers at
min(publish QoS, granted QoS) (:class:`PublishedPayload`). The broker side (sessions,
retained messages, offline queues) is :mod:`blendsm.broker._blend_broker`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Final

from amqtt.adapters import StreamWriterAdapter
from amqtt.errors import AMQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import (
    INCOMING,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

from blendsm.broker._access import Verdict
from blendsm.broker._conn_reader import PacketStream, read_packets
from blendsm.broker._handoff import Ticket, is_resend, uncharged
from blendsm.broker._inflight import InflightHandler
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._meter import Charge
from blendsm.broker._service import MarketplaceService
from blendsm.broker._shutdown import stop_reader
from blendsm.broker._topics import TopicClass, classify_topic
from blendsm.errors import LeafBudgetError

__all__ = [
    "HANDOFF_TIMEOUT",
    "KEEPALIVE_GRACE",
    "MeteredHandler",
    "PublishedPayload",
    "abort_connection",
]

_log = logging.getLogger("blendsm.broker")
_AMQTT_LOG: Final = logging.getLogger("amqtt.mqtt.protocol.handler")
"""The logger amqtt's handlers write to, shared by every connection."""
_KEEPALIVE_LOG: Final = LogLimiter(_log)
"""Silent clients are client-controlled: one log line a minute for them, with a count."""
_UNHEALTHY_LOG: Final = LogLimiter(_log)
"""Market PUBLISHes refused while the chain view is unhealthy: one log line a minute."""
_HANDOFF_LOG: Final = LogLimiter(_log)
_INFLIGHT_LOG: Final = LogLimiter(_log)
"""QoS 1 market PUBLISHes acknowledged after HANDOFF_TIMEOUT: one log line a minute."""

HANDOFF_TIMEOUT: Final = 10.0
"""Seconds a QoS 1 market PUBLISH waits for the fan-out before it is acknowledged anyway
(counted): a message the broker did not broadcast must not hold the device's slot forever."""

KEEPALIVE_GRACE: Final = 1.5
"""A client silent for this many keepalive periods is disconnected (MQTT-3.1.2-24)."""

#: The reservation of the delivery being written by the current task (one per mqtt_publish).
_CHARGE: contextvars.ContextVar[Charge | None] = contextvars.ContextVar(
    "blendsm_charge", default=None
)


class MeteredHandler(InflightHandler):
    """A connection's protocol handler whose PUBLISHes to the client are gated and metered.

    Installed by swapping ``__class__`` (amqtt constructs the handler itself); the service
    is set as ``_blendsm`` right after. Its QoS 1/2 flows (kept in flight across reconnects)
    are :class:`~blendsm.broker._inflight.InflightHandler`'s."""

    _blendsm: MarketplaceService
    _blendsm_idle: asyncio.TimerHandle | None = None
    """The keepalive check of a :class:`PacketStream` connection (None: no keepalive)."""
    _blendsm_over_inflight: bool = False
    """Closed for ``limits.max_incoming_inflight``: the packets still buffered are ignored."""

    def _init_session(self, session: Session) -> None:
        """amqtt's, without its ``LoggerAdapter`` per connection (about 0.8 KB each, and the
        client id it carries reached no log line with the default format)."""
        if not session:
            raise AMQTTError("Session cannot be None")
        self.session = session
        self.logger = _AMQTT_LOG
        self.keepalive_timeout = session.keep_alive if session.keep_alive > 0 else None

    async def start(self) -> None:
        """Start reading. A TCP/TLS connection is read by :func:`read_packets` (one Task for
        the connection, none per packet; :mod:`blendsm.broker._conn_reader`) with one
        keepalive timer; a WebSocket connection by amqtt's reader. amqtt's write-timeout
        timer, rescheduled on every packet sent, is not started: a broker's does nothing."""
        packets = self.reader
        if type(packets) is not PacketStream:
            await super().start()
            return
        loop = self._loop
        waiter: asyncio.Future[Any] | None = getattr(self, "_disconnect_waiter", None)
        if waiter is None or waiter.done():
            self._disconnect_waiter = loop.create_future()
        self._reader_task = loop.create_task(read_packets(self, packets))
        if self.keepalive_timeout is not None:
            self._blendsm_idle = loop.call_later(self.keepalive_timeout, self._check_idle)
        await self._retry_deliveries()

    def _check_idle(self) -> None:
        """The keepalive timer: silent for the whole timeout since the last bytes read, the
        client is dropped (:meth:`handle_read_timeout`); else checked again when it would be."""
        packets = self.reader
        timeout = self.keepalive_timeout
        self._blendsm_idle = None
        if type(packets) is not PacketStream or timeout is None:
            return
        idle = self._loop.time() - packets.last_read
        if idle < timeout:
            self._blendsm_idle = self._loop.call_later(timeout - idle, self._check_idle)
            return
        self.handle_read_timeout()

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        if type(data) is PublishedPayload and qos is not None and data.publish_qos < qos:
            qos = data.publish_qos  # delivered QoS = min(publish QoS, granted QoS)
        hold = getattr(self.session, "blendsm_hold", None)
        if hold is not None:  # a reconnect's redelivery and queue replay go first
            await hold.wait()
        sent = await self.publish_gated(topic, data, qos, retain, ack_timeout)
        return sent  # None when not sent; amqtt ignores it

    async def publish_gated(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage | Verdict | None:
        """Send through the gate: the message, or the Verdict that stopped it."""
        service = self._blendsm
        session = self.session
        if session is None:
            return Verdict.DENY
        verdict = service.admit(session, topic)
        if is_resend(data):
            verdict = uncharged(verdict, service.meter)
        if verdict is Verdict.FREE:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        if not isinstance(verdict, Charge):
            if verdict is Verdict.NO_CREDIT:
                request = service.payment_request_for(session)
                if request is not None:
                    await service.send_notice(self, session.blendsm, request)
            return verdict
        charge = verdict
        token = None
        try:
            quote = service.quote_for(session, charge)
            if quote is not None:
                await service.send_notice(self, session.blendsm, quote)
            token = _CHARGE.set(charge)
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        finally:
            if token is not None:
                _CHARGE.reset(token)
            if not charge.done:
                service.meter.release(charge)

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """A client's PUBLISH: on a market topic the signed envelope is checked, de-duplicated
        by (device, topic, sequence), and its leaf stored before amqtt acknowledges it (durably
        for QoS 1/2, queued for QoS 0); a QoS 1 one is acknowledged only once the fan-out wrote
        it (:meth:`_handle_qos1_message_flow`); an invalid or duplicate one is marked so the broker
        drops it instead of broadcasting it (a duplicate is still acknowledged). Over the
        seller's leaf budget a QoS 0 message is dropped and a QoS 1/2 one is not acknowledged:
        the connection is closed, so the device keeps it in its outbox for a later try; so is
        a QoS 1/2 message that cannot be decided because the chain view is unhealthy."""
        topic = publish_packet.topic_name
        session = self.session
        service = self._blendsm
        if (
            publish_packet.qos == 0
            and topic
            and session is not None
            and publish_packet.data is not None
            and not publish_packet.dup_flag  # amqtt ignores those (MQTT-3.3.1-2)
            and classify_topic(topic) is TopicClass.CONTROL
        ):
            # A voucher (QoS 0, as the SDK sends them) goes to the service here, as
            # BlendBroker._handle_message_delivery would hand it on: without amqtt's queue to
            # the client loop and its wait there (~20 us per voucher). Never broadcast.
            service.on_control_publish(session, self, topic, publish_packet.data)
            return
        earlier = None
        if session is not None and publish_packet.qos == 2 and publish_packet.packet_id:
            earlier = session.inflight_in.get(publish_packet.packet_id)
            limit = service.config.limits.max_incoming_inflight
            if earlier is None and len(session.inflight_in) >= limit:
                # Each unreleased QoS 2 message waits for its PUBREL with its payload held:
                # without a bound, 65,535 packet ids x max_packet_bytes per connection.
                if self._blendsm_over_inflight:
                    return
                self._blendsm_over_inflight = True
                service.stats.incoming_inflight_refused += 1
                _INFLIGHT_LOG.note(
                    "client %r left %d QoS 2 messages awaiting PUBREL"
                    " (limits.max_incoming_inflight %d): connection closed",
                    session.client_id,
                    len(session.inflight_in),
                    limit,
                )
                abort_connection(self.writer)
                return
        if earlier is not None and (earlier.topic, earlier.data) == (topic, publish_packet.data):
            # A QoS 2 re-send awaiting PUBREL: amqtt delivers it instead of the first copy,
            # so it keeps that copy's verdict (not dropped as that copy's duplicate).
            publish_packet.blendsm_rejected = getattr(
                earlier.publish_packet, "blendsm_rejected", False
            )
            if type(earlier.data) is PublishedPayload:
                publish_packet.data = earlier.data  # and its ticket: one hand-off per leaf
        elif topic and session is not None and service.view.is_market_topic(topic):
            if publish_packet.qos and not service.view.healthy:
                # Undecidable (the chain view cannot be trusted): acknowledging would drop a
                # message the device then forgets. Not acknowledged, the connection closed:
                # the device keeps it and sends it again once the market is back.
                service.stats.publishes_unacknowledged_unhealthy += 1
                _UNHEALTHY_LOG.note(
                    "QoS %d PUBLISH on %r from client %r not acknowledged: the chain view is"
                    " unhealthy; connection closed so the device sends it again later",
                    publish_packet.qos,
                    topic,
                    session.client_id,
                )
                abort_connection(self.writer)
                return
            data = publish_packet.data or b""
            checked = service.inspect_publish(session, topic, data)
            try:
                ticket = None
                if checked is not None and checked is not False:
                    ticket = await service.admit_envelope(topic, *checked, publish_packet.qos or 0)
                if checked is False or (checked is not None and ticket is None):
                    publish_packet.blendsm_rejected = True
                elif ticket is not None:  # the fan-out claims it; the PUBACK waits for that
                    envelope = checked[0]  # type: ignore[index]
                    service.replay.append(
                        topic,
                        envelope.device,
                        envelope.sequence,
                        data if type(data) is bytes else bytes(data),
                        publish_packet.qos or 0,
                    )
                    publish_packet.data = PublishedPayload.of(data, publish_packet.qos, ticket)
            except LeafBudgetError:  # the seller's backlog of unanchored leaves is full
                if publish_packet.qos:  # unacknowledged: the device keeps it and resends later
                    abort_connection(self.writer)
                    return
                publish_packet.blendsm_rejected = True  # QoS 0 promised nothing: dropped
        await super().handle_publish(publish_packet)

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        """A device's QoS 1 market message is acknowledged once the fan-out wrote it to the
        subscribers (:mod:`blendsm.broker._handoff`), not when it was queued: a PUBACK means
        stored and handed on, so a broker killed before that gets the message again from the
        device. amqtt queued it and acknowledged at once."""
        ticket = getattr(app_message.data, "ticket", None)
        session = self.session
        if (
            type(ticket) is not Ticket
            or app_message.direction != INCOMING
            or session is None
            or app_message.packet_id is None
            or app_message.puback_packet
        ):
            await super()._handle_qos1_message_flow(app_message)
            return
        puback = PubackPacket.build(app_message.packet_id)
        writer = self.writer
        if type(writer) is StreamWriterAdapter:  # WebSocket: written by this task instead
            ticket.ack = lambda: _write_ack(writer, puback)
        await session.delivered_message_queue.put(app_message)
        try:
            await asyncio.wait_for(asyncio.shield(ticket.done), HANDOFF_TIMEOUT)
        except TimeoutError:
            ticket.ack = None  # and written here
            self._blendsm.stats.handoff_timeouts += 1
            _HANDOFF_LOG.note(
                "QoS 1 PUBLISH on %r from client %r not handed to subscribers within %.0fs:"
                " acknowledged anyway (stored and anchored)",
                app_message.topic,
                session.client_id,
                HANDOFF_TIMEOUT,
            )
        if ticket.ack is None:
            await self._send_packet(puback)
        else:
            await self.plugins_manager.fire_event(
                MQTTEvents.PACKET_SENT, packet=puback, session=session
            )
        app_message.puback_packet = puback

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5 x the client's keepalive (the reader's timeout, set at
        CONNECT): drop the connection. amqtt's own handler ignores the timeout, so a silent
        client held its socket forever and its Will never went out. Aborting the transport
        ends the reader (EOF), and the broker then treats it as an unclean disconnect: the
        Will is published. Abort, not close: a client that stopped reading would block the
        graceful close's drain."""
        session = self.session
        self._blendsm.stats.keepalive_timeouts += 1
        _KEEPALIVE_LOG.note(
            "client %r silent for %.1fs (1.5 x keepalive): disconnected",
            getattr(session, "client_id", None),
            getattr(session, "keep_alive", 0),
        )
        abort_connection(self.writer)

    async def stop(self) -> None:
        """Stop reading, then close. amqtt cancels the reader once and waits for it without
        a bound, but on Python 3.11 a packet arriving with the cancel makes ``wait_for``
        swallow it and the wait never ends (:mod:`blendsm.broker._shutdown`): cancel until
        the reader has stopped, abort the socket if it will not."""
        if self._blendsm_idle is not None:
            self._blendsm_idle.cancel()
            self._blendsm_idle = None
        task = self._reader_task
        running = task is not None and task is not asyncio.current_task() and not task.done()
        stopped: asyncio.Event | None = getattr(self, "_reader_stopped", None)
        if running and task is not None and stopped is None:
            # A PacketStream reader: made on demand, and set when the reader's task ends too,
            # since the reader may already be past the point where it sets it (in its own
            # final stop()), and would otherwise be waited for in vain.
            made = self._reader_stopped = stopped = asyncio.Event()
            task.add_done_callback(lambda _: made.set())
        if running and stopped is not None and not await stop_reader(task, stopped, self.writer):
            self._blendsm.stats.connections_aborted += 1
            stopped.set()  # aborted; amqtt's stop must not wait for it
        try:
            await super().stop()
        finally:
            close_transport(self.writer)

    async def _send_packet(self, packet: Any) -> None:
        charge = _CHARGE.get()
        if charge is None or charge.done or type(packet) is not PublishPacket or packet.dup_flag:
            await super()._send_packet(packet)
            return
        # The PUBLISH of a reserved delivery: it counts only if its bytes reach the transport.
        meter = self._blendsm.meter
        writer = self.writer
        if writer is None or getattr(writer, "is_closed", False):
            meter.release(charge)
            await super()._send_packet(packet)
            return
        try:
            async with self._write_lock:
                await packet.to_stream(writer)
        except (ConnectionResetError, BrokenPipeError):
            meter.release(charge)
            await self.handle_connection_closed()
            return
        except BaseException:
            meter.release(charge)
            raise
        if getattr(writer, "is_closed", False):
            meter.release(charge)  # the adapter dropped the bytes silently
        else:
            meter.commit(charge)
        keepalive: Any = getattr(self, "_keepalive_task", None)
        if keepalive:
            keepalive.cancel()
            if self.keepalive_timeout is not None:
                self._keepalive_task = self._loop.call_later(
                    self.keepalive_timeout, self.handle_write_timeout
                )
        await self.plugins_manager.fire_event(
            MQTTEvents.PACKET_SENT, packet=packet, session=self.session
        )


class PublishedPayload(bytes):
    """A client's PUBLISH payload carrying the QoS it was published with.

    amqtt's broadcast hands each subscriber's handler only (topic, data, granted QoS), and
    stock amqtt 0.12.1 delivered at the granted QoS, upgrading a QoS 0 publish to QoS 1 or 2.
    The payload object is what travels to the handler (live broadcast and the offline queue),
    so it carries the publish QoS, and the handler delivers at min(publish, granted)
    (MQTT 3.1.1, 3.8.4). One object per PUBLISH, not per delivery."""

    publish_qos: int
    ticket: Ticket | None = None
    """A market message's hand-off to the fan-out (:mod:`blendsm.broker._handoff`)."""

    @classmethod
    def of(
        cls, data: bytes | bytearray, qos: int | None, ticket: Ticket | None = None
    ) -> PublishedPayload:
        """``data`` with its publish QoS (the same object if it already is one, so its
        ticket stays with it)."""
        payload = data if type(data) is cls else cls(data)
        payload.publish_qos = qos or 0
        if ticket is not None:
            payload.ticket = ticket
        return payload


def _write_ack(writer: StreamWriterAdapter, puback: PubackPacket) -> None:
    """Hand a PUBACK to the transport now (a whole packet in one write, so it cannot split
    another's bytes); nothing when the connection is closing (the device re-sends)."""
    transport = writer._writer.transport
    if not writer.is_closed and not transport.is_closing():
        transport.write(puback.to_bytes())


def close_transport(writer: Any) -> None:
    """Close a TCP/TLS connection's transport if its graceful close left it open. amqtt's
    close marks the writer closed before it drains, so a close cancelled mid-drain (a reader
    ending its own session is cancelled by the session's stop, as when a client with a QoS 1
    or 2 flow open goes away) or failed there never closed the socket, and no later close
    would: it stayed open until the garbage collector found the writer, or for as long as a
    persistent session kept its handler. ``transport.close`` still sends what is buffered."""
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is not None and not transport.is_closing():
        transport.close()


def abort_connection(writer: Any) -> None:
    """Close a client's connection at once, pending output dropped, on every listener: the
    transport under amqtt's TCP/TLS adapter or under its WebSocket adapter is aborted. (A
    graceful WebSocket close waits for the peer's close frame, which a dead or hostile peer
    never sends: the connection stayed open past its keepalive.) Anything else gets a bounded
    graceful close."""
    stream = getattr(writer, "_writer", None)  # amqtt StreamWriterAdapter: asyncio StreamWriter
    transport = getattr(stream, "transport", None)
    if transport is None:  # amqtt WebSocketsWriter: a websockets Connection
        transport = getattr(getattr(writer, "_protocol", None), "transport", None)
    if transport is not None:
        writer.is_closed = True  # charged deliveries after this point are released, not sent
        transport.abort()
        return
    if writer is not None:
        task = asyncio.get_running_loop().create_task(asyncio.wait_for(writer.close(), 1.0))
        _closing.add(task)
        task.add_done_callback(_close_done)


def _close_done(task: asyncio.Task[Any]) -> None:
    _closing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log.debug("graceful close failed: %r", task.exception())


_closing: set[asyncio.Task[Any]] = set()
"""Graceful closes in flight (a reference, so they are not garbage-collected mid-way)."""
