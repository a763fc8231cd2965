"""The largest MQTT packet a client may send, enforced while reading.

Why: amqtt reads a packet's fixed header, then the whole body with one
``readexactly(remaining_length)``, so a client announcing a 128 MB PUBLISH made the broker
buffer 128 MB (RSS 93 -> 463 MB) before anything looked at it; a few such clients and the
process is gone. :class:`PacketSizeLimit` wraps a connection's reader (any transport: TCP,
TLS, WebSocket, as it sits between amqtt and its reader adapter) and follows the MQTT framing
in the bytes that pass through: the moment a fixed header's remaining length is decoded and
the packet would exceed ``limits.max_packet_bytes``, that read fails as an end of stream,
before the body is asked for, and the caller's ``on_refused`` closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

__all__ = ["PacketSizeLimit"]

_MAX_LENGTH_BYTES: Final = 4
"""MQTT's remaining length takes 1 to 4 bytes; a fifth continuation byte is malformed."""


class PacketSizeLimit:
    """A reader that refuses any packet over ``max_bytes`` once its fixed header is read
    (amqtt's ``ReaderAdapter`` interface: ``read`` and ``feed_eof``).

    Framing state: ``_body`` bytes of the current packet's body remain; when it is 0 the next
    byte is a packet type (``_length_bytes`` 0) or a remaining-length byte (``_length_bytes``
    1 to 4, ``_length`` decoded so far)."""

    def __init__(self, reader: Any, max_bytes: int, on_refused: Callable[[int], None]) -> None:
        self._reader = reader
        self.max_bytes = max_bytes
        self._on_refused = on_refused
        self._body = 0
        self._length = 0
        self._length_bytes = 0
        self._in_header = False
        self.refused = False

    async def read(self, n: int = -1) -> bytes:
        if self.refused:
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None)
        data: bytes = await self._reader.read(n)
        if len(data) <= self._body:  # the common case: a piece of a body already admitted
            self._body -= len(data)
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
                self._body -= step
                pos += step
                continue
            byte = data[pos]
            pos += 1
            if not self._in_header:  # a packet type byte
                self._in_header, self._length, self._length_bytes = True, 0, 0
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
