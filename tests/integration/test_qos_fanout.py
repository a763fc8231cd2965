"""QoS 1/2 fan-out without a task per delivery (issue 11): a real broker, paho and raw-socket
subscribers, a real chain. Messages arrive in order with distinct packet ids, a PUBACK clears
the in-flight state, and a paid QoS 1 message is charged exactly once when written: never for
a redelivery, never for a delivery refused at a full in-flight window."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from support import RawPacket, ack_packet, connect_packet, eventually, read_packet, tasks_started
from support import subscribe_packet as subscribe

from blendsm.broker import SessionsConfig

from .conftest import Market
from .test_sessions import _OPEN, RawSubscriber, _dropped

PUBLISH, PUBACK = 3, 4


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        with contextlib.suppress(OSError):
            _OPEN.pop().close()


async def test_qos1_and_qos2_fan_out_start_no_task_per_delivery(market: Market) -> None:
    """Tasks are counted by wrapping the loop's task factory (a measurement, nothing is
    replaced): amqtt's path started one ``mqtt_publish`` Task per delivery (here 3 x 10). What
    remains is amqtt's reader, one Task per packet read (each PUBACK, PUBREC, PUBCOMP too), and
    one ``_run_broadcast`` per batch."""
    subs = [market.client(None) for _ in range(3)]
    pub = market.client(None)
    for c in (*subs, pub):
        assert await c.connect() == 0
    for s, qos in zip(subs, (1, 1, 2), strict=True):
        assert await s.subscribe("public/acked", qos) == [qos]
    with tasks_started() as started:
        for n in range(10):
            await pub.publish("public/acked", b"m%d" % n, qos=2)
        for s, qos in zip(subs, (1, 1, 2), strict=True):
            got = await s.got.drain(within=1.0, until=10)
            assert [(m.payload, m.qos) for m in got] == [(b"m%d" % n, qos) for n in range(10)]
    assert started, "the broker's own tasks are counted"
    assert not [name for name in started if "mqtt_publish" in name]  # before: 30


def _anonymous(market: Market, client_id: str, topic: str) -> socket.socket:
    sock = socket.create_connection((market.host, market.port), timeout=5)
    _OPEN.append(sock)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, 60))
    connack = read_packet(sock)
    assert connack is not None
    assert (connack.kind, connack.body[1]) == (2, 0), connack
    sock.sendall(subscribe(1, topic, 1))
    suback = read_packet(sock)
    assert suback is not None
    assert (suback.kind, suback.body[2]) == (9, 1), suback
    return sock


def _read_all(sock: socket.socket, n: int) -> list[RawPacket]:
    got = []
    for _ in range(n):
        packet = read_packet(sock, 5.0)
        assert packet is not None, f"got {len(got)} of {n}"
        got.append(packet)
    return got


async def test_many_qos1_messages_reach_each_subscriber_in_order_until_acknowledged(
    market: Market,
) -> None:
    n = 200
    ids = ("many-1", "many-2", "many-3")
    socks = [await asyncio.to_thread(_anonymous, market, c, "public/many") for c in ids]
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for i in range(n):
        await publisher.publish("public/many", b"q%03d" % i, qos=1)
    sessions = [market.running.broker.sessions[c][0] for c in ids]
    for sock, session in zip(socks, sessions, strict=True):
        got = await asyncio.to_thread(_read_all, sock, n)
        assert [(p.kind, p.qos, p.dup, p.payload) for p in got] == [
            (PUBLISH, 1, False, b"q%03d" % i) for i in range(n)
        ]
        packet_ids = [p.packet_id for p in got]
        assert len(set(packet_ids)) == n, "distinct packet ids while in flight"
        assert list(session.inflight_out) == packet_ids, "in flight, in send order"
        await asyncio.to_thread(
            sock.sendall, b"".join(ack_packet(PUBACK, p or 0) for p in packet_ids)
        )
    for session in sessions:
        await eventually(lambda s=session: not s.inflight_out, 5, what="the PUBACKs handled")
    assert market.service.stats.inflight_dropped == 0


async def test_paid_qos1_is_charged_once_per_message_written(start_market: Any) -> None:
    """Window 2, a subscriber that does not acknowledge: two of four messages are written and
    charged; the two that meet the full window wait, neither sent nor charged; the connection
    lost, they go to the persistent session's queue; the reconnect's redelivery (DUP=1) is
    not charged again; after its acknowledgements the two queued ones are written and
    charged, then a new message."""
    market = await start_market(sessions=SessionsConfig(max_inflight_messages=2))
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    raw = RawSubscriber(market, "buyer", "raw-paid-window")
    assert await raw.connect() == (0, 0)
    await raw.subscribe(market.topic, 1)
    device = await market.connected_device()
    for i in range(4):
        await device.publish(market.topic, b"p%d" % i, qos=1)

    async def data(n: int) -> list[RawPacket]:
        got: list[RawPacket] = []
        for _ in range(n + 3):  # the data and at most a few notices (quote)
            packet = await raw.read()
            assert packet is not None, f"got {got}"
            if packet.topic == market.topic:
                got.append(packet)
                if len(got) == n:
                    return got
        raise AssertionError(f"only {got}")

    first = await data(2)
    # a market payload is the device's signed envelope, ending with the message
    assert [(p.payload[-2:], p.dup) for p in first] == [(b"p0", False), (b"p1", False)]
    stats = market.service.stats
    await eventually(lambda: stats.deliveries_held_for_window == 2, 5)
    await raw.silence()
    account = market.service.meter.accounts[channel]
    assert (account.charged, account.reserved, account.delivered) == (2 * market.price, 0, 2)

    await _dropped(market, raw)
    assert await raw.connect() == (1, 0)
    again = await raw.read_many(2)
    assert [(p.dup, p.packet_id, p.payload) for p in again] == [
        (True, p.packet_id, p.payload) for p in first
    ]
    assert (account.charged, account.reserved) == (2 * market.price, 0), "not charged again"
    for packet in again:
        await raw.send(ack_packet(PUBACK, packet.packet_id or 0))
    queued = await data(2)  # the two that waited for the window, from the session's queue
    assert [(p.payload[-2:], p.dup) for p in queued] == [(b"p2", False), (b"p3", False)]
    await eventually(lambda: account.charged == 4 * market.price, 5)
    for packet in queued:
        await raw.send(ack_packet(PUBACK, packet.packet_id or 0))
    session = market.running.broker.sessions["raw-paid-window"][0]
    await eventually(lambda: not session.inflight_out, 5, what="the PUBACKs handled")
    await device.publish(market.topic, b"p4", qos=1)
    (fresh,) = await data(1)
    assert (fresh.payload[-2:], fresh.dup) == (b"p4", False)
    await eventually(lambda: account.charged == 5 * market.price, 5)
    assert (account.reserved, account.delivered) == (0, 5)
    assert stats.inflight_dropped == 0
