"""Raw-socket MQTT for tests of what paho would never send: a silent client, a CONNECT cut
short. Blocking calls: run them on a thread when the broker shares the test's event loop."""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["connect_packet", "seconds_until_closed"]


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive: int, will: tuple[str, bytes] | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, anonymous; optional QoS 0 Will)."""
    flags = 0x02
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04
        payload += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    assert len(body) < 128, "one-byte remaining length only"
    return bytes([0x10, len(body)]) + body


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
