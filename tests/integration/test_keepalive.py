"""Keepalive (MQTT 3.1.1, 3.1.2.10 / MQTT-3.1.2-24): a client silent for 1.5 x its keepalive
is disconnected by the broker, and its Will goes out; a client that pings stays connected.

The silent client is a raw socket (paho would send PINGREQs by itself); its blocking calls
run on a thread, since the broker runs on the test's event loop."""

from __future__ import annotations

import asyncio
import socket
import time

from support import connect_packet, seconds_until_closed

from .conftest import Market


def _silent_client(port: int, keepalive: int, will: tuple[str, bytes] | None) -> socket.socket:
    """Connect (anonymous), check the CONNACK, then say nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(connect_packet(f"silent-{time.monotonic_ns()}", keepalive, will))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


async def test_a_silent_client_is_dropped_after_one_and_a_half_keepalives_and_its_will_sent(
    market: Market,
) -> None:
    watcher = market.client(None)
    assert await watcher.connect() == 0
    assert await watcher.subscribe("public/wills") == [0]
    will = ("public/wills", b"gone silent")
    sock = await asyncio.to_thread(_silent_client, market.port, 2, will)
    try:
        closed_after = await asyncio.to_thread(seconds_until_closed, sock, 8.0)
    finally:
        sock.close()
    assert closed_after is not None, "the broker kept a silent client past 8 s (keepalive 2 s)"
    assert 2.5 <= closed_after <= 4.5, closed_after  # 1.5 x 2 s = 3 s, give or take the loop
    wills = await watcher.got.drain(until=1, within=3)
    assert [m.payload for m in wills] == [b"gone silent"]
    assert market.service.stats.keepalive_timeouts == 1


async def test_a_client_that_pings_stays_connected(market: Market) -> None:
    sock = await asyncio.to_thread(_silent_client, market.port, 1, None)
    try:
        for _ in range(4):  # 4 s of PINGREQ every 0.8 s: never 1.5 s of silence
            await asyncio.sleep(0.8)
            sock.sendall(b"\xc0\x00")
            assert await asyncio.to_thread(sock.recv, 2) == b"\xd0\x00"
    finally:
        sock.close()
    assert market.service.stats.keepalive_timeouts == 0


async def test_keepalive_zero_means_no_timeout(market: Market) -> None:
    sock = await asyncio.to_thread(_silent_client, market.port, 0, None)
    try:
        assert await asyncio.to_thread(seconds_until_closed, sock, 3.0) is None
    finally:
        sock.close()
