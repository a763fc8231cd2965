"""Malformed MQTT on the real broker's port: random fixed headers, bad remaining lengths,
truncated packets, topics that are not UTF-8, bad CONNECT flags and packets before CONNECT.
The broker stays up, keeps accepting honest clients, and a subscriber connected throughout
keeps receiving (looked at every ``CHECK_EVERY`` examples and after the run).

Hypothesis draws the packets (bounded examples, no deadline); each example is sent on its own
connection from a worker thread while the broker serves on the test's event loop."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    connect_packet,
    publish_packet,
    read_packet,
    remaining_length,
    subscribe_packet,
)

from .conftest import broker_config

EXAMPLES = 250
"""Malformed connections per run (each a few ms: the whole run stays within seconds)."""
CHECK_EVERY = 25
"""The honest subscriber must get a fresh message after this many examples."""
HONEST_TOPIC = "public/honest"


def _utf8_raw(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


_BAD_UTF8 = st.sampled_from(
    [b"\xff\xfe", b"a\xc3", b"\xed\xa0\x80", b"x\x00y", b"\xc0\xaf", b"caf\xe9", b"\x80"]
)


@st.composite
def _random_fixed_header(draw: st.DrawFn) -> bytes:
    first = draw(st.integers(0, 255))
    body = draw(st.binary(max_size=64))
    return bytes([first]) + remaining_length(len(body)) + body


@st.composite
def _bad_remaining_length(draw: st.DrawFn) -> bytes:
    first = draw(st.integers(0, 255))
    # five or more continuation bytes (the spec allows four), or a length far beyond what follows
    length = draw(
        st.one_of(
            st.binary(min_size=4, max_size=8).map(lambda b: bytes(x | 0x80 for x in b) + b"\x01"),
            st.integers(10_000, 268_435_455).map(remaining_length),
        )
    )
    return bytes([first]) + length + draw(st.binary(max_size=16))


@st.composite
def _truncated(draw: st.DrawFn) -> bytes:
    whole = draw(
        st.sampled_from(
            [
                connect_packet("fuzz-t", 30),
                connect_packet("fuzz-t", 30, ("will/x", b"w"), username="u", password="p"),
                subscribe_packet(1, "a/b", 1),
                publish_packet("a/b", b"payload"),
            ]
        )
    )
    return whole[: draw(st.integers(1, len(whole) - 1))]


@st.composite
def _bad_connect(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from([b"MQTT", b"MQIsdp", b"MQTX", b"", b"\xff\xff"]))
    level = draw(st.sampled_from([3, 4, 5, 0, 255]))
    flags = draw(st.integers(0, 255))  # reserved bit, Will QoS 3, password without username...
    keepalive = draw(st.integers(0, 65535))
    client_id = draw(st.one_of(st.binary(max_size=30), _BAD_UTF8))
    tail = draw(st.binary(max_size=40))
    body = _utf8_raw(name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    body += _utf8_raw(client_id) + tail
    return b"\x10" + remaining_length(len(body)) + body


@st.composite
def _bad_utf8_publish(draw: st.DrawFn) -> bytes:
    topic = draw(_BAD_UTF8)
    qos = draw(st.integers(0, 3))
    body = _utf8_raw(topic) + (b"\x00\x01" if qos else b"") + draw(st.binary(max_size=16))
    return (
        connect_packet("fuzz-u", 30) + bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body
    )


@st.composite
def _before_connect(draw: st.DrawFn) -> bytes:
    return draw(
        st.sampled_from(
            [
                publish_packet("a/b", b"early"),
                subscribe_packet(1, "#", 0),
                b"\xc0\x00",  # PINGREQ
                b"\xe0\x00",  # DISCONNECT
                b"\x40\x02\x00\x01",  # PUBACK
                b"\xa2\x05\x00\x01\x00\x01a",  # UNSUBSCRIBE
            ]
        )
    ) + draw(st.binary(max_size=16))


@st.composite
def _after_connect(draw: st.DrawFn) -> bytes:
    """A valid CONNECT, then garbage: what a session's reader meets mid-stream."""
    return connect_packet("fuzz-a", 30) + draw(
        st.one_of(_random_fixed_header(), _bad_remaining_length(), _truncated())
    )


MALFORMED = st.one_of(
    _random_fixed_header(),
    _bad_remaining_length(),
    _truncated(),
    _bad_connect(),
    _bad_utf8_publish(),
    _before_connect(),
    _after_connect(),
)


def _send(port: int, data: bytes) -> None:
    """One connection: the bytes, a short look at the answer, then close (or reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(data)
            sock.settimeout(0.02)
            sock.recv(4096)
        except OSError:
            pass  # closed, reset or silent: all fine, the broker decides


class Honest:
    """A subscriber and a publisher on raw sockets, connected for the whole run."""

    def __init__(self, port: int) -> None:
        self.sub = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.pub = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.count = 0
        for sock, name in ((self.sub, "honest-sub"), (self.pub, "honest-pub")):
            sock.sendall(connect_packet(name, 0))
            ack = read_packet(sock)
            assert ack is not None
            assert (ack.kind, ack.body) == (2, b"\x00\x00"), ack
        self.sub.sendall(subscribe_packet(1, HONEST_TOPIC, 0))
        suback = read_packet(self.sub)
        assert suback is not None
        assert suback.kind == 9, suback

    def check(self) -> None:
        """Publish one message and see it arrive at the subscriber."""
        self.count += 1
        payload = b"honest %d" % self.count
        self.pub.sendall(publish_packet(HONEST_TOPIC, payload))
        got = read_packet(self.sub, within=5)
        assert got is not None, f"the honest subscriber got nothing after check {self.count}"
        assert (got.topic, got.payload) == (HONEST_TOPIC, payload)

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


async def test_malformed_packets_leave_the_broker_up_and_honest_clients_served(
    start_market: Any, tmp_path: Any
) -> None:
    limits = replace(
        broker_config(tmp_path).limits, connect_rate_per_ip=100_000.0, connect_timeout_seconds=1.0
    )
    market = await start_market(limits=limits)
    port, stats = market.port, market.service.stats
    honest = await asyncio.to_thread(Honest, port)
    examples = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=MALFORMED)
    def fuzz(data: bytes) -> None:
        nonlocal examples
        _send(port, data)
        examples += 1
        if examples % CHECK_EVERY == 0:
            honest.check()

    try:
        await asyncio.to_thread(fuzz)
        await asyncio.to_thread(honest.check)
        # a new honest client still gets in
        fresh = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)
        with fresh:
            fresh.sendall(connect_packet("honest-late", 0))
            ack = await asyncio.to_thread(read_packet, fresh)
            assert ack is not None
            assert (ack.kind, ack.body) == (2, b"\x00\x00"), ack
        assert market.running.broker is not None
    finally:
        honest.close()
    print(
        f"\n{examples} malformed connections; honest checks {honest.count};"
        f" connects refused {stats.connects_refused}, aborted {stats.connections_aborted},"
        f" timeouts {stats.connect_timeouts}, too large {stats.packets_too_large}"
    )
