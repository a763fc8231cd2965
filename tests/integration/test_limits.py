"""Limits on what a client controls, each hit by a real socket: a connection that never
sends its CONNECT is closed after ``limits.connect_timeout_seconds`` (idle sockets would
otherwise hold the broker's file descriptors until the chain client can no longer connect)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from support import (
    connect_packet,
    oversized_publish,
    publish_packet,
    read_packet,
    seconds_until_closed,
)

from blendsm.broker import LimitsConfig

from .conftest import StartMarket


def _idle_then_closed(port: int, send: bytes, within: float) -> float | None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(send)
        return seconds_until_closed(sock, within)
    finally:
        sock.close()


async def test_a_socket_that_never_sends_connect_is_closed(start_market: StartMarket) -> None:
    market = await start_market(limits=LimitsConfig(connect_timeout_seconds=1.0))
    silent, half = await asyncio.gather(
        asyncio.to_thread(_idle_then_closed, market.port, b"", 6.0),
        # a CONNECT's first bytes, then nothing: the timeout covers the whole packet
        asyncio.to_thread(_idle_then_closed, market.port, b"\x10\x20\x00\x04MQ", 6.0),
    )
    for closed_after in (silent, half):
        assert closed_after is not None, "an idle socket stayed open past 6 s (timeout 1 s)"
        assert 0.8 <= closed_after <= 3.0, closed_after
    assert market.service.stats.connect_timeouts == 2
    # the broker still serves honest clients
    client = market.client(None)
    assert await client.connect() == 0


def _slow_connect(port: int, delay: float) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        packet = connect_packet(f"slow-{time.monotonic_ns()}", 60)
        sock.sendall(packet[:5])
        time.sleep(delay)
        sock.sendall(packet[5:])
        return sock.recv(4)
    finally:
        sock.close()


async def test_a_slow_but_complete_connect_within_the_limit_is_accepted(
    start_market: StartMarket,
) -> None:
    market = await start_market(limits=LimitsConfig(connect_timeout_seconds=3.0))
    # half a CONNECT, 1.5 s of silence, the rest: inside the limit, so accepted
    assert await asyncio.to_thread(_slow_connect, market.port, 1.5) == b"\x20\x02\x00\x00"
    assert market.service.stats.connect_timeouts == 0


def _refused_at_once(port: int) -> float | None:
    """Seconds until the broker closes a connection that sent a whole CONNECT (None: it
    answered or stayed open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(connect_packet(f"capped-{time.monotonic_ns()}", 60))
        return seconds_until_closed(sock, 3.0)
    except AssertionError:  # it answered (a CONNACK): not refused
        return None
    finally:
        sock.close()


async def _connected(market: Any, count: int) -> list[Any]:
    clients = [market.client(None) for _ in range(count)]
    for client in clients:
        assert await client.connect() == 0
    return clients


async def test_connections_beyond_the_per_address_cap_are_closed_at_once(
    start_market: StartMarket,
) -> None:
    market = await start_market(limits=LimitsConfig(max_connections_per_ip=3))
    first = await _connected(market, 3)
    closed_after = await asyncio.to_thread(_refused_at_once, market.port)
    assert closed_after is not None, "a 4th connection from one address was served (cap 3)"
    assert closed_after < 1.0
    assert market.service.stats.connections_refused_at_limit == 1
    first[0].close()
    await asyncio.sleep(0.3)  # the broker sees the close
    assert len(await _connected(market, 1)) == 1  # a slot is free again


async def test_connections_beyond_the_global_cap_are_closed_at_once(
    start_market: StartMarket,
) -> None:
    market = await start_market(limits=LimitsConfig(max_connections=2))
    await _connected(market, 2)
    closed_after = await asyncio.to_thread(_refused_at_once, market.port)
    assert closed_after is not None, "a 3rd connection was served (global cap 2)"
    assert market.service.stats.connections_refused_at_limit == 1


async def test_a_packet_over_max_packet_bytes_is_refused_before_its_body(
    start_market: StartMarket,
) -> None:
    limit = 4096
    market = await start_market(limits=LimitsConfig(max_packet_bytes=limit))
    sub = market.client(None)
    assert await sub.connect() == 0
    assert await sub.subscribe("public/big", 0) == [0]
    closed_after, taken = await asyncio.to_thread(
        oversized_publish, market.port, "t", 128 * 1024 * 1024
    )
    assert closed_after is not None, "a PUBLISH announcing 128 MB was read on for 10 s"
    assert closed_after < 2.0
    assert taken < 16 * 1024 * 1024  # what the socket buffers held: the body was not read
    assert market.service.stats.packets_too_large == 1
    # a packet of exactly max_packet_bytes still goes through (2-byte topic length, 10-byte
    # topic, 4-byte fixed header for a remaining length of 4092)
    pub = market.client(None)
    assert await pub.connect() == 0
    await pub.publish("public/big", b"x" * (limit - 4 - 2 - len("public/big")))
    got = await sub.got.drain(until=1, within=5)
    assert len(got) == 1
    assert len(got[0].payload) == limit - 16
    assert market.service.stats.packets_too_large == 1


async def test_an_oversized_connect_is_refused_before_its_body(start_market: StartMarket) -> None:
    market = await start_market(limits=LimitsConfig(max_packet_bytes=1024))

    def oversized_connect() -> float | None:
        sock = socket.create_connection(("127.0.0.1", market.port), timeout=5)
        try:
            sock.sendall(b"\x10\xff\xff\xff\x7f" + bytes(1024))  # announces 256 MB
            return seconds_until_closed(sock, 3.0)
        finally:
            sock.close()

    closed_after = await asyncio.to_thread(oversized_connect)
    assert closed_after is not None
    assert closed_after < 1.0
    assert market.service.stats.packets_too_large == 1


async def test_connections_over_the_connect_rate_are_closed_at_once(
    start_market: StartMarket,
) -> None:
    market = await start_market(
        limits=LimitsConfig(connect_rate_per_ip=0.5, connect_burst_per_ip=3)
    )
    # the default rate leaves the other tests' quick reconnects from 127.0.0.1 alone; this
    # broker allows bursts of 3 and one more every 2 s
    clients = await _connected(market, 3)
    closed_after = await asyncio.to_thread(_refused_at_once, market.port)
    assert closed_after is not None, "a 4th connection in a burst of 3 was served"
    assert closed_after < 1.0
    assert market.service.stats.connects_rate_limited == 1
    assert market.service.stats.connections_refused_at_limit == 0
    for c in clients:
        c.close()
    await asyncio.sleep(2.1)  # one token back
    assert len(await _connected(market, 1)) == 1


def _unreleased_qos2(port: int, count: int) -> tuple[int, bool]:
    """Send ``count`` QoS 2 PUBLISHes (distinct packet ids) and never a PUBREL: (PUBRECs
    read, whether the broker closed the connection)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(connect_packet(f"q2-{time.monotonic_ns()}", 60))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        for packet_id in range(1, count + 1):
            try:
                sock.sendall(publish_packet("public/q2", b"x" * 1024, 2, packet_id))
            except OSError:
                break
        pubrecs = 0
        while True:
            try:
                packet = read_packet(sock, 3.0)
            except (ConnectionError, OSError):
                return pubrecs, True
            if packet is None:
                return pubrecs, False
            assert packet.kind == 5, packet  # PUBREC
            pubrecs += 1
    finally:
        sock.close()


async def test_qos2_publishes_never_released_are_bounded_per_session(
    start_market: StartMarket,
) -> None:
    """A client may leave at most ``limits.max_incoming_inflight`` QoS 2 messages awaiting
    their PUBREL; one more closes its connection. Without the bound each waits forever, its
    payload held (65,535 packet ids x ``max_packet_bytes`` per connection)."""
    market = await start_market(limits=LimitsConfig(max_incoming_inflight=20))
    sub = market.client(None)
    assert await sub.connect() == 0
    assert await sub.subscribe("public/q2", 0) == [0]
    pubrecs, closed = await asyncio.to_thread(_unreleased_qos2, market.port, 100)
    assert closed, f"100 unreleased QoS 2 messages held open ({pubrecs} PUBRECs; limit 20)"
    assert pubrecs <= 20
    assert market.service.stats.incoming_inflight_refused == 1
    assert not await sub.got.drain(until=1, within=0.5)  # none was released, none delivered
    # the same limit leaves a client that releases its messages alone
    pub = market.client(None)
    assert await pub.connect() == 0
    for i in range(50):
        await pub.publish("public/q2", b"%d" % i, qos=2)
    got = await sub.got.drain(until=50, within=10)
    assert len(got) == 50
    assert market.service.stats.incoming_inflight_refused == 1
