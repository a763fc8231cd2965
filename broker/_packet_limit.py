"""The largest MQTT packet a client may send, enforced while reading.

Why: amqtt reads a packet's fixed header, then the whole body with one
``readexactly(remaining_length)``, so a client announcing a 128 MB PUBLISH made the broker
buffer 128 MB (RSS 93 -> 463 MB) before anything looked at it; a few such clients and the
process is gone. :class:`PacketSizeLimit` wraps a connection's reader (any transport: TCP,
TLS, WebSocket, as it sits between amqtt and its reader adapter) and follows the MQTT framing
in the bytes that pass through: the moment a fixed header's remaining length is decoded and
the packet would exceed ``limits.max_packet_bytes``, that read fails as an end of stream,
before the body is asked for, and the caller's ``on_refused`` closes the connection.

With ``on_violation`` it also applies MQTT's rules (:mod:`._packet_rules`), for the WebSocket
listeners whose packets amqtt's lenient reader decodes: a packet whose fixed header breaks them
ends the stream once the header is read, one whose strings do once its body is (of a PUBLISH
only the topic is kept, not the payload). amqtt reads a header, then exactly its body, so the read that
fails is the bad packet's own and amqtt never decodes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from amqtt.mqtt.packet import PUBLISH

from blendsm.broker._packet_rules import WITH_STRINGS, body_fault, header_fault

__all__ = ["PacketSizeLimit"]

_PUBLISH_KEPT: Final = 2 + 65_535
"""A PUBLISH's body bytes kept for :func:`~._packet_rules.body_fault`: its topic, which comes
first, not its payload. The other packets with strings are kept whole (a SUBSCRIBE's filters
run to its end; a CONNECT's user name follows its Will message), within the size limit."""
_MAX_LENGTH_BYTES: Final = 4
"""MQTT's remaining length takes 1 to 4 bytes; a fifth continuation byte is malformed."""


class PacketSizeLimit:
    """A reader that refuses any packet over ``max_bytes`` once its fixed header is read
    (amqtt's ``ReaderAdapter`` interface: ``read`` and ``feed_eof``).

    Framing state: ``_body`` bytes of the current packet's body remain; when it is 0 the next
    byte is a packet type (``_length_bytes`` 0) or a remaining-length byte (``_length_bytes``
    1 to 4, ``_length`` decoded so far)."""

    def __init__(
        self,
        reader: Any,
        max_bytes: int,
        on_refused: Callable[[int], None],
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        self._reader = reader
        self.max_bytes = max_bytes
        self._on_refused = on_refused
        self._on_violation = on_violation
        """With it, MQTT's rules are checked too (:mod:`._packet_rules`): a packet breaking
        them ends the stream like one too large, and this is told why."""
        self._body = 0
        self._length = 0
        self._length_bytes = 0
        self._in_header = False
        self._first_byte = 0
        self._packets = 0
        self._kept: bytearray | None = None  # the body of a packet with strings, as it comes
        self._keep = 0  # how much of it to keep
        self.refused = False

    async def read(self, n: int = -1) -> bytes:
        if self.refused:
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None)
        if self._on_violation is not None and 0 < self._body < n:
            # amqtt reads a field longer than what is left of the packet (a length past its
            # end): the reader would wait for the next packet's bytes, or for ever.
            self._violated("a field runs past the end of its packet (malformed)", b"", n)
        data: bytes = await self._reader.read(n)
        if len(data) <= self._body and self._kept is None:  # the common case: a piece of a
            self._body -= len(data)  # body already admitted, with nothing to check in it
            return data
        self._follow(data, n)
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: bytes, n: int) -> None:
        """Advance the framing state over ``data``; refuse as soon as a header is too big."""
        pos, size = 0, len(data)
        while pos < size:
            if self._body:
                step = min(self._body, size - pos)
                if self._kept is not None and len(self._kept) < self._keep:
                    self._kept += data[pos : pos + min(step, self._keep - len(self._kept))]
                self._body -= step
                pos += step
                if not self._body and self._kept is not None:
                    self._judge_body(data[:pos], n)
                continue
            byte = data[pos]
            pos += 1
            if not self._in_header:  # a packet type byte
                self._in_header, self._length, self._length_bytes = True, 0, 0
                self._first_byte = byte
                continue
            self._length += (byte & 0x7F) << (7 * self._length_bytes)
            self._length_bytes += 1
            if byte & 0x80 and self._length_bytes < _MAX_LENGTH_BYTES:
                continue
            total = 1 + self._length_bytes + self._length
            if byte & 0x80 or total > self.max_bytes:  # malformed, or too large
                self.refused = True
                self._on_refused(total)
                raise asyncio.IncompleteReadError(data[:pos], n if n >= 0 else None)
            self._in_header = False
            self._body = self._length
            if self._on_violation is not None:
                self._judge_header(data[:pos], n)

    def _judge_header(self, read: bytes, n: int) -> None:
        """A fixed header is complete: refuse a packet MQTT forbids whatever its body, and
        start keeping the body of one with strings."""
        self._packets += 1
        why = header_fault(self._first_byte, self._packets == 1)
        if why is not None:
            self._violated(why, read, n)
        kind = self._first_byte >> 4
        if kind in WITH_STRINGS:
            self._kept = bytearray()
            self._keep = _PUBLISH_KEPT if kind == PUBLISH else self._length
            if not self._body:  # an empty body: judged now
                self._judge_body(read, n)

    def _judge_body(self, read: bytes, n: int) -> None:
        kept, self._kept = self._kept, None
        why = body_fault(self._first_byte >> 4, bytes(kept or b""))
        if why is not None:
            self._violated(why, read, n)

    def _violated(self, why: str, read: bytes, n: int) -> None:
        self.refused = True
        assert self._on_violation is not None
        self._on_violation(why)
        raise asyncio.IncompleteReadError(read, n if n >= 0 else None)
