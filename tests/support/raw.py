"""Raw-socket MQTT for tests of what paho would never send: a silent client, a CONNECT cut
short, a subscriber that reads a PUBLISH and never acknowledges it. Blocking calls: run them
on a thread when the broker shares the test's event loop."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

__all__ = [
    "RawPacket",
    "ack_packet",
    "connect_packet",
    "oversized_publish",
    "publish_packet",
    "read_packet",
    "remaining_length",
    "seconds_until_closed",
    "subscribe_packet",
]

PUBACK, PUBREC, PUBREL, PUBCOMP = 4, 5, 6, 7
"""Packet types of the QoS 1/2 acknowledgements (first byte >> 4)."""


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    keepalive: int,
    will: tuple[str, bytes] | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session unless ``clean=False``; anonymous unless
    ``username``/``password``; optional QoS 0 Will)."""
    flags = 0x02 if clean else 0
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04
        payload += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """A PUBLISH (QoS 0 unless ``qos``; a QoS 1/2 one carries ``packet_id``)."""
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    """A SUBSCRIBE of one filter."""
    body = struct.pack("!H", packet_id) + _utf8(topic) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def ack_packet(kind: int, packet_id: int) -> bytes:
    """A PUBACK, PUBREC, PUBREL or PUBCOMP (``kind`` is the packet type)."""
    flags = 0x02 if kind == PUBREL else 0
    return bytes([kind << 4 | flags, 2]) + struct.pack("!H", packet_id)


@dataclass(frozen=True)
class RawPacket:
    """One packet read from the broker: type, fixed-header flags and body."""

    kind: int
    flags: int
    body: bytes

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def packet_id(self) -> int | None:
        """The packet id of a QoS 1/2 PUBLISH or of an acknowledgement."""
        if self.kind == 3:
            if not self.qos:
                return None
            (length,) = struct.unpack("!H", self.body[:2])
            return int(struct.unpack("!H", self.body[2 + length : 4 + length])[0])
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def topic(self) -> str:
        (length,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + length].decode()

    @property
    def payload(self) -> bytes:
        (length,) = struct.unpack("!H", self.body[:2])
        return self.body[2 + length + (2 if self.qos else 0) :]


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def read_packet(sock: socket.socket, within: float = 5.0) -> RawPacket | None:
    """The next packet from ``sock``; None if nothing arrives within ``within`` seconds."""
    sock.settimeout(within)
    try:
        first = _exactly(sock, 1)[0]
    except TimeoutError:
        return None
    length, shift = 0, 0
    while True:
        byte = _exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return RawPacket(first >> 4, first & 0x0F, _exactly(sock, length))


def seconds_until_closed(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closes ``sock`` (EOF or reset); None if still open after
    ``within``. Fails on any data: the caller expects silence."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except OSError:
        return time.monotonic() - started
    assert data == b"", f"unexpected data from the broker: {data!r}"
    return time.monotonic() - started


def oversized_publish(
    port: int, topic: str, announced: int, within: float = 10.0
) -> tuple[float | None, int]:
    """CONNECT (anonymous), then a PUBLISH header announcing ``announced`` payload bytes and
    zeros after it until the broker closes the connection: (seconds from the header until it
    closed, or None if it read on for ``within`` s; payload bytes the socket took)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(connect_packet(f"oversized-{time.monotonic_ns()}", 60))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        body = _utf8(topic)
        sock.sendall(b"\x30" + remaining_length(len(body) + announced) + body)
        started, sent, chunk = time.monotonic(), 0, bytes(64 * 1024)
        sock.settimeout(0.5)
        while sent < announced and time.monotonic() - started < within:
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                continue  # the buffers are full: the broker is not reading
            except OSError:  # reset or broken pipe: the broker closed the connection
                return time.monotonic() - started, sent
        return None, sent
    finally:
        sock.close()
