"""Raw-socket MQTT for tests of what paho would never send: a silent client, a CONNECT cut
short. Blocking calls: run them on a thread when the broker shares the test's event loop."""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["connect_packet", "oversized_publish", "publish_packet", "seconds_until_closed"]


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
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
) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session; anonymous unless ``username``/``password``;
    optional QoS 0 Will)."""
    flags = 0x02
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
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH."""
    body = _utf8(topic) + payload
    return b"\x30" + _remaining_length(len(body)) + body


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
        sock.sendall(b"\x30" + _remaining_length(len(body) + announced) + body)
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
