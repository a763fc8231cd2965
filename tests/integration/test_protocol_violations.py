"""Protocol violations close the connection (MQTT 3.1.1 section 4.8: "if either the Server or
Client encounters a protocol violation, it MUST close the Network Connection")."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from support import connect_packet, read_packet

from .conftest import StartMarket


def _after_connect(port: int, send: bytes) -> tuple[list[int], float | None]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(connect_packet(f"v-{time.monotonic_ns()}", 60))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(send)
        answers: list[int] = []
        while True:
            try:
                packet = read_packet(sock, 2.0)
            except (ConnectionError, OSError):
                return answers, 0.0
            if packet is None:
                return answers, None
            answers.append(packet.kind)
    finally:
        sock.close()


def _utf8(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


def _raw(data: bytes) -> bytes:
    """A length-prefixed MQTT string of these bytes, UTF-8 or not."""
    return struct.pack("!H", len(data)) + data


def _publish(topic: bytes, qos: int) -> bytes:
    body = _raw(topic) + (b"\x00\x01" if qos else b"") + b"x"
    return bytes([0x30 | qos << 1, len(body)]) + body


VIOLATIONS = {
    # a SUBSCRIBE whose requested QoS is 3 (MQTT-3-8.3-4)
    "subscribe_qos3": b"\x82" + bytes([2 + 2 + 3 + 1]) + b"\x00\x01" + _utf8("a/b") + b"\x03",
    # a SUBSCRIBE with reserved flags 0000 instead of 0010 (MQTT-3.8.1-1)
    "subscribe_flags": b"\x80" + bytes([2 + 2 + 3 + 1]) + b"\x00\x01" + _utf8("a/b") + b"\x00",
    # a SUBSCRIBE with no topic filter at all (MQTT-3.8.3-3)
    "subscribe_empty": b"\x82\x02\x00\x01",
    # a second CONNECT on the same connection (MQTT-3.1.0-2)
    "second_connect": connect_packet("again", 60),
    # a SUBSCRIBE whose topic filter announces 9 bytes and holds 1 (malformed)
    "subscribe_truncated": b"\x82\x06\x00\x01\x00\x09a\x00",
    # a PUBREL with flags 0000 instead of 0010 (MQTT-2.2.2-2)
    "pubrel_flags": b"\x60\x02\x00\x01",
    # a CONNACK: only a server sends one
    "connack_from_client": b"\x20\x02\x00\x00",
    # an UNSUBSCRIBE with no topic filter (MQTT-3.10.3-2)
    "unsubscribe_empty": b"\xa2\x02\x00\x01",
    # a PUBLISH with QoS 3 (MQTT-3.3.1-4)
    "publish_qos3": b"\x36" + bytes([2 + 3 + 2 + 1]) + _utf8("a/b") + b"\x00\x01x",
    # strings (MQTT-1.5.3-1, -2): amqtt turned these into the text of their bytes' repr
    "publish_topic_ill_formed_utf8": _publish(b"a\xc3", 1),
    "publish_topic_overlong_utf8": _publish(b"\xc0\xaf", 0),
    "publish_topic_surrogate": _publish(b"\xed\xa0\x80", 2),
    "publish_topic_nul": _publish(b"a\x00b", 1),
    "subscribe_filter_ill_formed_utf8": b"\x82\x07\x00\x01" + _raw(b"a\xff") + b"\x00",
    "unsubscribe_filter_nul": b"\xa2\x06\x00\x01" + _raw(b"a\x00"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
async def test_a_protocol_violation_closes_the_connection(
    start_market: StartMarket, name: str
) -> None:
    market = await start_market()
    answers, closed = await asyncio.to_thread(_after_connect, market.port, VIOLATIONS[name])
    assert closed is not None, f"{name}: connection left open, answers {answers}"
    assert answers == [], f"{name}: the broker answered {answers} before closing"
    assert market.service.stats.protocol_violations == 1
    # the broker still serves honest clients
    client = market.client(None)
    assert await client.connect() == 0
    assert await client.subscribe("public/ok", 1) == [1]


@pytest.mark.parametrize(
    ("what", "client_id", "username"),
    [
        ("client id", b"\xff\xfe", None),
        ("client id", b"a\x00", None),
        ("user name", b"ok", b"caf\xe9"),
    ],
)
async def test_a_connect_with_a_bad_string_gets_no_connack_and_is_closed(
    start_market: StartMarket, what: str, client_id: bytes, username: bytes | None
) -> None:
    """MQTT-1.5.3-1/2 on CONNECT: closed without a CONNACK (amqtt accepted the client id as
    the text of its bytes' repr)."""
    market = await start_market()
    flags = 0x02 | (0x80 if username is not None else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + b"\x00\x3c" + _raw(client_id)
    body += b"" if username is None else _raw(username)
    packet = b"\x10" + bytes([len(body)]) + body

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", market.port), timeout=5) as sock:
            sock.sendall(packet)
            sock.settimeout(2.0)
            return sock.recv(16)  # b"": closed; a timeout fails the test

    assert await asyncio.to_thread(exchange) == b"", what
