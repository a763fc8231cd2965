"""Reading a TCP or TLS client's packets: whole packets from a buffer, dispatched inline.

amqtt 0.12.1 reads a connection with a reader Task that awaits, per packet,
``asyncio.wait_for(MQTTFixedHeader.from_stream(reader), keepalive)`` (a second Task each time,
on Python 3.11), reads the fixed header one byte per ``readexactly`` call and then starts one
more Task per packet to handle it. An idle connection thus held two Tasks, their coroutine
frames, two Events and a deque of running tasks; connecting and subscribing took about 17
``readexactly`` calls and four Tasks per client.

Here (:class:`PacketStream`, :func:`read_packets`) the stream is read in chunks into a buffer,
each packet is cut out whole once its fixed header (type, flags, remaining length) shows it is
complete, decoded from memory and handed to the handler's ``handle_*`` method in the same
coroutine: no Task per packet, and for at most ``SLICE_SECONDS`` before the other
connections get their turn. The exceptions are QoS 1 and QoS 2 PUBLISHes, whose flows wait
on others (the fan-out's hand-off before the PUBACK, the client's PUBREL): each runs in a Task
as in amqtt, so the reader goes on reading. Packets of one connection are handled in the order
they arrived. The keepalive is one timer per connection checked against the time of the last
bytes read (``MeteredHandler``), not a timeout per read. ``limits.max_packet_bytes`` is
enforced from the fixed header, before the body is read (as :mod:`._packet_limit` does for the
WebSocket listeners, which keep amqtt's reader).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from amqtt.adapters import BufferReader
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)

from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._packet_rules import body_fault, header_fault

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

__all__ = ["PacketStream", "read_connect_packet", "read_packets"]

_log = logging.getLogger("blendsm.broker")
_HANDLER_ERROR_LOG: Final = LogLimiter(_log, logging.WARNING)
"""A packet whose handling failed is client-caused: one log line a minute, with a count."""

SLICE_SECONDS: Final = 0.01
"""How long one connection's reader handles packets in a row before it lets the loop run the
others. A publisher flooding its socket otherwise kept the loop for the whole buffered stream
(0.24-0.40 s in a paid burst of 5,000 messages to 10 subscribers), and no other connection was
read meanwhile: the subscribers' vouchers waited, every delivery past the credit was held, and
every other client's latency grew by as much."""
CHUNK_BYTES: Final = 65536
"""Most bytes taken from the socket's buffer per read."""
_MAX_LENGTH_BYTES: Final = 4
"""MQTT's remaining length takes 1 to 4 bytes; a fifth continuation byte is malformed."""

_HANDLERS: Final = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
    CONNECT: "handle_connect",
}
"""amqtt's reader dispatch: packet type -> the handler method it calls (the same methods)."""


class PacketStream:
    """A connection's incoming MQTT packets, cut from an ``asyncio.StreamReader``.

    Also what amqtt holds as the connection's ``reader``: :meth:`read` and :meth:`feed_eof`
    (its ``ReaderAdapter`` interface) serve whatever amqtt code would read it directly."""

    __slots__ = ("_buffer", "_on_refused", "_stream", "last_read", "max_bytes", "refused")

    def __init__(
        self, stream: asyncio.StreamReader, max_bytes: int, on_refused: Callable[[int], None]
    ) -> None:
        self._stream = stream
        self._buffer = b""
        self.max_bytes = max_bytes
        self._on_refused = on_refused
        self.refused = False
        self.last_read = asyncio.get_running_loop().time()
        """Loop time of the last bytes received (the keepalive counts from it)."""

    async def next_packet(self) -> tuple[MQTTFixedHeader, bytes] | None:
        """The next whole packet (fixed header, body); None at the end of the stream, or once
        a packet over ``max_bytes`` (or a malformed length) was announced: ``on_refused``
        has then been called, and the body is never read."""
        buffer = self._buffer
        while not self.refused:
            header = self._header(buffer)
            if header is not None:
                kind, flags, length, start = header
                end = start + length
                if len(buffer) < end:  # the rest of this packet, in one read
                    try:
                        buffer += await self._stream.readexactly(end - len(buffer))
                    except (asyncio.IncompleteReadError, ConnectionError):
                        break
                    self.last_read = asyncio.get_running_loop().time()
                self._buffer = buffer[end:]
                return MQTTFixedHeader(kind, flags, length), buffer[start:end]
            try:
                chunk = await self._stream.read(CHUNK_BYTES)
            except ConnectionError:
                break
            if not chunk:
                break
            self.last_read = asyncio.get_running_loop().time()
            buffer = buffer + chunk if buffer else chunk
        self._buffer = b""
        return None

    def _header(self, buffer: bytes) -> tuple[int, int, int, int] | None:
        """(type, flags, remaining length, body offset) of the packet at the start of
        ``buffer``, or None if its fixed header is not all there yet."""
        size = len(buffer)
        if size < 2:
            return None
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= size:
                return None
            byte = buffer[pos]
            pos += 1
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if pos > _MAX_LENGTH_BYTES:  # a fifth length byte: malformed
                self._refuse(pos + length)
                return None
        if pos + length > self.max_bytes:
            self._refuse(pos + length)
            return None
        return buffer[0] >> 4, buffer[0] & 0x0F, length, pos

    def _refuse(self, total: int) -> None:
        self.refused = True
        self._on_refused(total)

    async def read(self, n: int = -1) -> bytes:
        """amqtt's ``ReaderAdapter.read``: ``n`` bytes (all until EOF for -1), buffered first.
        No framing check here: the broker reads packets with :meth:`next_packet`."""
        buffer, self._buffer = self._buffer, b""
        if n < 0:
            return buffer + await self._stream.read(-1)
        if len(buffer) >= n:
            self._buffer = buffer[n:]
            return buffer[:n]
        return buffer + await self._stream.readexactly(n - len(buffer))

    def feed_eof(self) -> None:
        self._stream.feed_eof()


async def decode(header: MQTTFixedHeader, body: bytes) -> Any:
    """The amqtt packet object for a packet cut by :meth:`PacketStream.next_packet` (amqtt's
    own decoder, reading from memory: it never waits)."""
    return await packet_class(header).from_stream(BufferReader(body), fixed_header=header)


async def read_connect_packet(packets: PacketStream) -> ConnectPacket:
    """The connection's first packet, which must be a CONNECT (MQTT-3.1.0-1)."""
    item = await packets.next_packet()
    if item is None:
        raise NoDataError("no CONNECT: the connection ended or its packet was refused")
    header, body = item
    if header.packet_type != CONNECT:
        raise MQTTError(f"[MQTT-3.1.0-1] first packet is of type {header.packet_type}, not CONNECT")
    connect: ConnectPacket = await ConnectPacket.from_stream(
        BufferReader(body), fixed_header=header
    )
    if (wrong := body_fault(CONNECT, body)) is not None:
        raise MQTTError(wrong)  # section 1.5.3: closed, no CONNACK
    return connect


async def read_packets(handler: BrokerProtocolHandler, packets: PacketStream) -> None:
    """amqtt's ``ProtocolHandler._reader_loop`` for a :class:`PacketStream`: every packet
    handled in this coroutine except QoS 1/2 PUBLISHes (a Task each, see the module doc); at
    the end of the stream, the same ending as amqtt's (connection closed, handler stopped)."""
    flows: set[asyncio.Task[None]] | None = None
    session = handler.session
    plugins = handler.plugins_manager
    clock = asyncio.get_running_loop().time
    slice_end = clock() + SLICE_SECONDS
    try:
        while True:
            if clock() >= slice_end:  # fairness: the other connections' turn
                await asyncio.sleep(0)
                slice_end = clock() + SLICE_SECONDS
            item = await packets.next_packet()
            if item is None:
                break
            header, body = item
            kind = header.packet_type
            name = _HANDLERS.get(kind)
            if name is None:  # reserved types 0 and 15 are forbidden: close
                _HANDLER_ERROR_LOG.note(
                    "client %r sent a packet of reserved type %d: closing",
                    getattr(session, "client_id", None),
                    kind,
                )
                break
            try:
                packet = await decode(header, body)
                wrong = header_fault(kind << 4 | header.flags, False) or body_fault(
                    kind, body, packet
                )
            except (MQTTError, NoDataError, ValueError, IndexError) as exc:
                wrong = f"malformed packet of type {kind}: {exc!r}"
            if wrong is not None:  # MQTT 3.1.1 section 4.8: close the connection
                stats = getattr(getattr(handler, "_blendsm", None), "stats", None)
                if stats is not None:
                    stats.protocol_violations += 1
                _HANDLER_ERROR_LOG.note(
                    "client %r: %s: closing", getattr(session, "client_id", None), wrong
                )
                break
            await plugins.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
            if kind == PUBLISH and header.flags & 0x06:  # QoS 1 or 2: its flow waits, a Task
                if flows is None:
                    flows = set()
                task = asyncio.create_task(handler.handle_publish(packet))
                flows.add(task)
                task.add_done_callback(flows.discard)
                continue
            try:
                await getattr(handler, name)(packet)
            except (ConnectionError, OSError) as exc:
                _log.debug("connection failed while handling a packet: %r", exc)
                break
            except Exception as exc:  # amqtt's Task per packet ended; the reader went on
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    break  # amqtt turns a cancelled write into ProtocolHandlerError
                _HANDLER_ERROR_LOG.note(
                    "client %r: packet type %d not handled: %r",
                    getattr(session, "client_id", None),
                    kind,
                    exc,
                )
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # amqtt's reader ends on anything unexpected, too
        _HANDLER_ERROR_LOG.note(
            "reader of client %r ended: %r", getattr(session, "client_id", None), exc
        )
    finally:
        for task in list(flows or ()):
            task.cancel()
    await handler.handle_connection_closed()
    stopped: asyncio.Event | None = getattr(handler, "_reader_stopped", None)
    if stopped is not None:
        stopped.set()
    await handler.stop()
