"""QoS 1/2 messages in flight to a subscriber: kept across reconnects and redelivered.

amqtt 0.12.1 waits for each PUBACK/PUBREC/PUBCOMP in the task that sent the PUBLISH, for at
most 5 s, and drops the message from ``session.inflight_out`` whatever happens (timeout, or
the connection lost and the waiter cancelled). So a persistent session that reconnected got
nothing back, although MQTT-4.4.0-1 says the server re-sends every unacknowledged PUBLISH
(DUP=1, same packet id) and every PUBREL awaiting its PUBCOMP, in the original order, as
mosquitto does.

Here the outgoing flow is a state machine kept in ``inflight_out`` (insertion order is send
order) and driven by the acknowledgements, with no task waiting per message: a PUBLISH is
written and recorded (here, or inline by the fan-out: :mod:`blendsm.broker._fanout_acked`),
a PUBACK or PUBCOMP removes it, a PUBREC turns it into a PUBREL. On reconnect,
:meth:`InflightHandler._retry_deliveries` (amqtt calls it from ``start()``, before the offline
queue is replayed) re-sends what is left. A redelivery is never charged again: it
does not pass the gate, and the meter skips DUP packets (:class:`MeteredHandler`).

The window is bounded by ``sessions.max_inflight_messages``: a client that never acknowledges
cannot make the broker hold more in flight. Beyond it, a delivery of the inline fan-out waits
in the session's hold (:mod:`~blendsm.broker._credit_hold`, bounded there) until
an acknowledgement frees the window; one on amqtt's path (a task) is not sent (nor charged)
and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage

from blendsm.broker._credit_hold import session_hold
from blendsm.broker._log_limit import LogLimiter

if TYPE_CHECKING:
    from amqtt.mqtt.puback import PubackPacket
    from amqtt.mqtt.pubcomp import PubcompPacket
    from amqtt.mqtt.pubrec import PubrecPacket

    from blendsm.broker._service import MarketplaceService

__all__ = ["InflightHandler", "note_window_full", "release_hold"]

_log = logging.getLogger("blendsm.broker")
_UNKNOWN_ACK_LOG: Final = LogLimiter(_log)
"""Acknowledgements of unknown packet ids are client-controlled: one line a minute."""
_WINDOW_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Deliveries refused at a full in-flight window: one line a minute, with a count."""
INCOMING_RETRY_SECONDS: Final = 10.0
"""How long a QoS 2 PUBLISH received before the reconnect waits for the client's PUBREL."""

_retrying: set[asyncio.Task[Any]] = set()
"""Incoming QoS 2 flows resumed on reconnect (a reference, so they are not collected)."""


def note_window_full(service: MarketplaceService, session: Any, topic: str) -> None:
    """A delivery not sent (nor charged) because the client's in-flight window is full: the
    one count and log line for it, whichever path (task or inline fan-out) refused it."""
    service.stats.inflight_dropped += 1
    _WINDOW_LOG.note(
        "client %r has %d messages unacknowledged (sessions.max_inflight_messages):"
        " a message on %r not sent, not charged",
        session.client_id,
        len(session.inflight_out),
        topic,
    )


def release_hold(session: Any) -> None:
    """Let deliveries held behind a reconnecting session's redelivery and replay go out."""
    hold: asyncio.Event | None = getattr(session, "blendsm_hold", None)
    if hold is not None:
        hold.set()
        session.blendsm_hold = None


class InflightHandler(BrokerProtocolHandler):
    """The outgoing QoS 1/2 flows of :class:`~blendsm.broker.MeteredHandler` (its base)."""

    _blendsm: MarketplaceService

    # --- sending ----------------------------------------------------------------------

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
        else:
            await self._send_tracked(app_message)

    async def _handle_qos2_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
        else:
            await self._send_tracked(app_message)

    async def _send_tracked(self, message: OutgoingApplicationMessage | Any) -> None:
        """Write a QoS 1/2 PUBLISH and record it in flight until it is acknowledged. The
        caller's reservation (if any) is committed by the write, or released if it is not
        sent here."""
        session = self.session
        if session is None or message.packet_id is None:
            return
        inflight = session.inflight_out
        if message.packet_id not in inflight:
            limit = self._blendsm.config.sessions.max_inflight_messages
            if len(inflight) >= limit:
                note_window_full(self._blendsm, session, message.topic)
                return
            inflight[message.packet_id] = message
        packet = message.build_publish_packet(dup=message.publish_packet is not None)
        message.publish_packet = packet
        # Recorded before the write: if the connection is lost during it, the reconnect
        # re-sends it (DUP=1, not charged again).
        await self._send_packet(packet)

    def window_full(self) -> bool:
        """No room for another QoS 1/2 message in flight to this client."""
        session = self.session
        limit = self._blendsm.config.sessions.max_inflight_messages
        return session is not None and len(session.inflight_out) >= limit

    # --- acknowledgements ---------------------------------------------------------------

    async def handle_puback(self, puback: PubackPacket) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header else None
        message = self._inflight(packet_id)
        if message is None or message.qos == QOS_2:
            self._unknown_ack("PUBACK", packet_id)
            return
        message.puback_packet = puback
        self._acknowledged(message)

    async def handle_pubrec(self, pubrec: PubrecPacket) -> None:
        packet_id = pubrec.packet_id
        message = self._inflight(packet_id)
        if message is None or message.qos != QOS_2:
            self._unknown_ack("PUBREC", packet_id)
            return
        # Received by the client: from now on PUBREL, never the PUBLISH again (a repeated
        # PUBREC gets the PUBREL again). It keeps its place in the in-flight order.
        message.pubrec_packet = pubrec
        message.pubrel_packet = PubrelPacket.build(packet_id)
        await self._send_packet(message.pubrel_packet)

    async def handle_pubcomp(self, pubcomp: PubcompPacket) -> None:
        packet_id = pubcomp.packet_id
        message = self._inflight(packet_id)
        if message is None or message.qos != QOS_2 or message.pubrel_packet is None:
            self._unknown_ack("PUBCOMP", packet_id)
            return
        message.pubcomp_packet = pubcomp
        self._acknowledged(message)

    def _inflight(self, packet_id: int | None) -> Any:
        session = self.session
        if session is None or packet_id is None:
            return None
        return session.inflight_out.get(packet_id)

    def _acknowledged(self, message: Any) -> None:
        session = self.session
        if session is None:
            return
        session.inflight_out.pop(message.packet_id, None)
        hold = session_hold(session)
        if hold is not None:
            hold.window_freed()  # deliveries held for the window go out now, in order
        if getattr(session, "blendsm_window_paused", False):
            session.blendsm_window_paused = False
            broker = self._blendsm.broker
            if broker is not None:
                broker.resume_offline_replay(session)

    def _unknown_ack(self, kind: str, packet_id: int | None) -> None:
        client = self.session.client_id if self.session is not None else None
        _UNKNOWN_ACK_LOG.note("%s for unknown packet id %s from client %r", kind, packet_id, client)

    # --- reconnect ----------------------------------------------------------------------

    async def _retry_deliveries(self) -> None:
        """MQTT-4.4.0-1, called by ``start()`` once the CONNACK is out: re-send what is in
        flight to the client, in the original order, before anything new; resume waiting for
        the PUBREL of QoS 2 messages the client sent before the reconnect."""
        session = self.session
        if session is None:
            return
        stats = self._blendsm.stats
        for message in list(session.inflight_out.values()):
            if message.pubrel_packet is not None:
                packet: Any = PubrelPacket.build(message.packet_id)
            else:
                packet = message.build_publish_packet(dup=message.publish_packet is not None)
                message.publish_packet = packet
            await self._send_packet(packet)
            stats.redelivered += 1
        for incoming in list(session.inflight_in.values()):
            flow = asyncio.wait_for(self._handle_message_flow(incoming), INCOMING_RETRY_SECONDS)
            task = asyncio.get_running_loop().create_task(flow)
            _retrying.add(task)
            task.add_done_callback(_retrying_done)


def _retrying_done(task: asyncio.Task[Any]) -> None:
    _retrying.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log.debug("incoming QoS 2 flow not completed after reconnect: %s", task.exception())
