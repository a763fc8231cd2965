"""Persistent sessions (clean session 0) through a real broker, with raw-socket and paho clients.

MQTT-4.4.0-1: on reconnect the broker re-sends unacknowledged QoS 1/2 PUBLISHes (DUP=1, same
packet id, original order) and PUBRELs awaiting PUBCOMP; amqtt 0.12.1 forgot them when the
connection dropped (mosquitto does not). A redelivery is never charged again. Also: a
disconnected persistent session expires, one identity holds a bounded number of them, a paid
message is not queued for a subscriber without a usable channel, and offline queues are
bounded in messages and bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import (
    RawPacket,
    ack_packet,
    connect_packet,
    eventually,
    read_packet,
    subscribe_packet,
)

from blendsm.broker import SessionsConfig

from .conftest import Market, broker_config, split_messages

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 3, 4, 5, 6, 7
_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        with contextlib.suppress(OSError):
            _OPEN.pop().close()


class RawSubscriber:
    """A participant's persistent session over a raw socket: it reads what the broker sends
    and acknowledges only what the test says (paho acknowledges everything)."""

    def __init__(self, market: Market, label: str, client_id: str) -> None:
        self.market, self.label, self.client_id = market, label, client_id
        self.sock: socket.socket | None = None

    def _connect(self) -> tuple[int, int]:
        sock = socket.create_connection((self.market.host, self.market.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = self.market.chain.accounts[self.label].address
        token = self.market.signer(self.label).token(self.client_id)
        sock.sendall(
            connect_packet(self.client_id, 60, username=address, password=token, clean=False)
        )
        _OPEN.append(sock)
        connack = read_packet(sock)
        assert connack is not None
        assert connack.kind == 2, connack
        self.sock = sock
        return connack.body[0], connack.body[1]

    async def connect(self) -> tuple[int, int]:
        """(session present, CONNACK return code)."""
        return await asyncio.to_thread(self._connect)

    async def send(self, data: bytes) -> None:
        assert self.sock is not None
        await asyncio.to_thread(self.sock.sendall, data)

    async def subscribe(self, topic: str, qos: int) -> None:
        await self.send(subscribe_packet(1, topic, qos))
        suback = await self.read()
        assert suback is not None
        assert (suback.kind, suback.body[2]) == (9, qos), suback

    async def read(self, within: float = 5.0) -> RawPacket | None:
        assert self.sock is not None
        return await asyncio.to_thread(read_packet, self.sock, within)

    async def read_many(self, n: int) -> list[RawPacket]:
        got = []
        for _ in range(n):
            packet = await self.read()
            assert packet is not None, f"got {len(got)} packets of {n}: {got}"
            got.append(packet)
        return got

    async def silence(self, within: float = 0.5) -> None:
        extra = await self.read(within)
        assert extra is None, f"unexpected packet {extra}"

    def drop(self) -> None:
        """Close the socket without DISCONNECT (the connection is lost)."""
        assert self.sock is not None
        self.sock.close()
        self.sock = None


async def _dropped(market: Market, raw: RawSubscriber) -> None:
    """Drop ``raw``'s connection and wait until the broker sees its session disconnected."""
    raw.drop()
    sessions = market.running.broker.sessions
    await eventually(
        lambda: sessions[raw.client_id][0].transitions.state == "disconnected",
        5,
        what="the broker noticing the lost connection",
    )


async def test_unacknowledged_qos1_messages_are_redelivered_with_dup_in_order(
    market: Market,
) -> None:
    raw = RawSubscriber(market, "buyer", "raw-qos1")
    assert await raw.connect() == (0, 0)
    await raw.subscribe("public/r", 1)
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for i in range(3):
        await publisher.publish("public/r", b"m%d" % i, qos=1)
    first = await raw.read_many(3)
    assert [(p.kind, p.dup, p.qos, p.payload) for p in first] == [
        (PUBLISH, False, 1, b"m%d" % i) for i in range(3)
    ]
    await _dropped(market, raw)  # nothing acknowledged
    await publisher.publish("public/r", b"queued", qos=1)  # while away: the offline queue

    assert await raw.connect() == (1, 0)  # session present
    again = await raw.read_many(4)
    # The three in flight first, DUP=1 with their packet ids, then the queued one (new id).
    assert [(p.dup, p.packet_id, p.payload) for p in again[:3]] == [
        (True, p.packet_id, p.payload) for p in first
    ]
    assert (again[3].dup, again[3].payload) == (False, b"queued")
    assert again[3].packet_id not in {p.packet_id for p in first}
    for packet in again:
        await raw.send(ack_packet(PUBACK, packet.packet_id or 0))
    await raw.silence()
    await _dropped(market, raw)
    assert await raw.connect() == (1, 0)
    await raw.silence()  # everything was acknowledged: nothing is sent again


async def test_qos2_redelivery_resends_publish_or_pubrel_by_state(market: Market) -> None:
    raw = RawSubscriber(market, "buyer", "raw-qos2")
    assert await raw.connect() == (0, 0)
    await raw.subscribe("public/r2", 2)
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for i in range(2):
        await publisher.publish("public/r2", b"x%d" % i, qos=2)
    first = await raw.read_many(2)
    assert [(p.kind, p.qos) for p in first] == [(PUBLISH, 2), (PUBLISH, 2)]
    await raw.send(ack_packet(PUBREC, first[0].packet_id or 0))  # the first one received
    pubrel = await raw.read()
    assert pubrel is not None
    assert (pubrel.kind, pubrel.packet_id) == (PUBREL, first[0].packet_id)
    await _dropped(market, raw)  # no PUBCOMP, no PUBREC for the second

    assert await raw.connect() == (1, 0)
    again = await raw.read_many(2)
    assert [(p.kind, p.packet_id) for p in again] == [
        (PUBREL, first[0].packet_id),
        (PUBLISH, first[1].packet_id),
    ]
    assert again[1].dup
    assert again[1].payload == b"x1"
    await raw.send(ack_packet(PUBCOMP, first[0].packet_id or 0))
    await raw.send(ack_packet(PUBREC, first[1].packet_id or 0))
    pubrel = await raw.read()
    assert pubrel is not None
    assert (pubrel.kind, pubrel.packet_id) == (PUBREL, first[1].packet_id)
    await raw.send(ack_packet(PUBCOMP, first[1].packet_id or 0))
    await raw.silence()
    await _dropped(market, raw)
    assert await raw.connect() == (1, 0)
    await raw.silence()


async def test_a_redelivered_paid_message_is_not_charged_again(market: Market) -> None:
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    raw = RawSubscriber(market, "buyer", "raw-paid")
    assert await raw.connect() == (0, 0)
    await raw.subscribe(market.topic, 1)
    device = await market.connected_device()
    for i in range(3):
        await device.publish(market.topic, b"p%d" % i, qos=1)
    first = [p for p in await raw.read_many(4) if p.topic == market.topic]
    assert len(first) == 3  # and one quote notice (not subscribed: not sent to us) or none
    account = market.service.meter.accounts[channel]
    assert account.charged == 3 * market.price
    await _dropped(market, raw)

    assert await raw.connect() == (1, 0)
    again = await raw.read_many(3)
    assert [(p.dup, p.packet_id) for p in again] == [(True, p.packet_id) for p in first]
    assert account.charged == 3 * market.price  # three distinct messages, charged once each
    for packet in again:
        await raw.send(ack_packet(PUBACK, packet.packet_id or 0))
    await device.publish(market.topic, b"p3", qos=1)
    fresh = await raw.read()
    while fresh is not None and fresh.kind == PUBLISH and fresh.topic != market.topic:
        fresh = await raw.read()  # a notice
    assert fresh is not None
    assert not fresh.dup
    assert account.charged == 4 * market.price


async def test_paho_persistent_subscriber_gets_unacknowledged_messages_again(
    market: Market,
) -> None:
    """paho with manual acknowledgements: what it did not acknowledge comes back, DUP set."""
    address = market.chain.accounts["buyer"].address
    signer = market.signer("buyer")
    got: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def paho_client() -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="paho-persistent", clean_session=False
        )
        client.username_pw_set(address, signer.token("paho-persistent"))
        client.manual_ack_set(True)
        client.on_message = lambda _c, _u, m: loop.call_soon_threadsafe(got.put_nowait, m)
        return client

    async def connect(client: mqtt.Client) -> None:
        connected = asyncio.Event()
        client.on_connect = lambda *_a: loop.call_soon_threadsafe(connected.set)
        await asyncio.to_thread(client.connect, market.host, market.port, 60)
        client.loop_start()
        await asyncio.wait_for(connected.wait(), 5)

    first = paho_client()
    await connect(first)
    first.subscribe("public/paho", 1)
    await asyncio.sleep(0.3)  # SUBACK
    publisher = market.client(None)
    assert await publisher.connect() == 0
    await publisher.publish("public/paho", b"one", qos=1)
    await publisher.publish("public/paho", b"two", qos=1)
    received = [await asyncio.wait_for(got.get(), 5) for _ in range(2)]
    assert [(m.payload, m.dup) for m in received] == [(b"one", False), (b"two", False)]
    first.ack(received[0].mid, 1)  # only the first one
    await asyncio.sleep(0.3)
    first.loop_stop()
    first.socket().close()  # the connection is lost, no DISCONNECT
    sessions = market.running.broker.sessions
    await eventually(lambda: sessions["paho-persistent"][0].transitions.state == "disconnected", 5)

    second = paho_client()
    await connect(second)
    try:
        again = await asyncio.wait_for(got.get(), 5)
        assert (again.payload, again.dup, again.mid) == (b"two", True, received[1].mid)
        second.ack(again.mid, 1)
    finally:
        second.disconnect()
        second.loop_stop()


async def test_a_disconnected_persistent_session_expires(start_market: Any) -> None:
    market = await start_market(sessions=SessionsConfig(expiry_seconds=0.5))
    raw = RawSubscriber(market, "buyer", "raw-expiring")
    assert await raw.connect() == (0, 0)
    await raw.subscribe("public/e", 1)
    await _dropped(market, raw)
    publisher = market.client(None)
    assert await publisher.connect() == 0
    await publisher.publish("public/e", b"kept for a while", qos=1)
    await eventually(lambda: market.service.stats.sessions_expired == 1, 10)
    assert "raw-expiring" not in market.running.broker.sessions
    assert await raw.connect() == (0, 0)  # a new session: no subscription, no queue
    await raw.silence()


async def test_persistent_sessions_per_identity_are_capped(start_market: Any) -> None:
    market = await start_market(sessions=SessionsConfig(max_per_identity=2))
    for client_id in ("cap-a", "cap-b"):
        raw = RawSubscriber(market, "buyer", client_id)
        assert await raw.connect() == (0, 0)
        await _dropped(market, raw)
    third = RawSubscriber(market, "buyer", "cap-c")
    assert await third.connect() == (0, 2)  # identifier rejected: a third one
    assert market.service.stats.persistent_sessions_refused == 1
    assert "cap-c" not in market.running.broker.sessions
    resumed = RawSubscriber(market, "buyer", "cap-a")
    assert await resumed.connect() == (1, 0)  # resuming one of its own is fine
    other = RawSubscriber(market, "buyer2", "cap-other")
    assert await other.connect() == (0, 0)  # the cap is per identity
    clean = market.client("buyer", client_id="cap-clean")
    assert await clean.connect() == 0  # a clean session is not capped


async def test_no_paid_message_is_queued_for_a_subscriber_without_a_channel(
    market: Market,
) -> None:
    """A wildcard subscription is granted without a channel (each message is gated); while
    the session is away, a paid message it has no channel for is not queued, so opening a
    channel later does not deliver (and charge) a message it was not entitled to."""
    buyer = market.client("buyer", client_id="no-channel", clean_session=False)
    assert await buyer.connect() == 0
    assert await buyer.subscribe("paid/#", qos=1) == [1]
    buyer.close()
    device = await market.connected_device()
    await device.publish(market.topic, b"not for you", qos=1)
    stats = market.service.stats
    await eventually(lambda: stats.offline_refused_no_channel == 1, 5)
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    again = market.client("buyer", client_id="no-channel", clean_session=False)
    assert await again.connect() == 0
    data, _ = split_messages(await again.got.drain(within=1.0), market.topic)
    assert data == []
    account = market.service.meter.accounts.get(channel)
    assert account is None or account.charged == 0


async def _queued_while_away(market: Market, payloads: list[bytes]) -> list[bytes]:
    """A persistent QoS 1 subscriber of ``public/q`` is away while ``payloads`` are
    published; what it gets when it comes back (once two were dropped)."""
    buyer = market.client("buyer", client_id="bounded", clean_session=False)
    assert await buyer.connect() == 0
    assert await buyer.subscribe("public/q", qos=1) == [1]
    buyer.close()
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for payload in payloads:
        await publisher.publish("public/q", payload, qos=1)
    await eventually(lambda: market.service.stats.offline_dropped_public == 2, 5)
    again = market.client("buyer", client_id="bounded", clean_session=False)
    assert await again.connect() == 0
    return [m.payload for m in await again.got.drain(within=1.0)]


async def test_public_offline_queue_is_bounded_in_messages(start_market: Any) -> None:
    market = await start_market(sessions=SessionsConfig(max_queued_messages=3))
    got = await _queued_while_away(market, [b"q%d" % i for i in range(5)])
    assert got == [b"q0", b"q1", b"q2"]  # the oldest stay, the two newest were dropped


async def test_public_offline_queue_is_bounded_in_bytes(start_market: Any) -> None:
    market = await start_market(sessions=SessionsConfig(max_queued_bytes=2048))
    got = await _queued_while_away(market, [letter * 800 for letter in (b"a", b"b", b"c", b"d")])
    assert got == [b"a" * 800, b"b" * 800]  # 1,600 bytes fit in 2,048, 2,400 do not


async def test_the_inflight_window_is_bounded_and_the_rest_waits_for_it(
    start_market: Any,
) -> None:
    """A client that never acknowledges holds at most max_inflight_messages in flight; the
    rest waits (it used to be dropped) and goes out, in order, as acknowledgements free the
    window."""
    market = await start_market(sessions=SessionsConfig(max_inflight_messages=2))
    raw = RawSubscriber(market, "buyer", "raw-window")
    assert await raw.connect() == (0, 0)
    await raw.subscribe("public/w", 1)
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for i in range(4):
        await publisher.publish("public/w", b"w%d" % i, qos=1)
    first = await raw.read_many(2)
    assert [p.payload for p in first] == [b"w0", b"w1"]
    stats = market.service.stats
    await eventually(lambda: stats.deliveries_held_for_window == 2, 5)
    await raw.silence()  # nothing more while the window is full
    session = market.running.broker.sessions["raw-window"][0]
    assert len(session.inflight_out) == 2
    await raw.send(ack_packet(PUBACK, first[0].packet_id or 0))
    (third,) = await raw.read_many(1)
    assert (third.payload, third.dup) == (b"w2", False)
    await raw.silence()
    await raw.send(ack_packet(PUBACK, first[1].packet_id or 0))
    (fourth,) = await raw.read_many(1)
    assert fourth.payload == b"w3"
    await publisher.publish("public/w", b"w4", qos=1)
    await raw.silence()  # w2 and w3 are not acknowledged: w4 waits behind them
    for packet in (third, fourth):
        await raw.send(ack_packet(PUBACK, packet.packet_id or 0))
    (more,) = await raw.read_many(1)
    assert (more.payload, more.dup) == (b"w4", False)
    assert stats.inflight_dropped == 0


async def test_what_waits_for_the_window_is_bounded_in_time(start_market: Any) -> None:
    """Held for the window at most ``payments.hold_seconds``: then dropped, counted as not
    sent for the window, never charged; the client still gets what comes after its acks."""
    market = await start_market(
        sessions=SessionsConfig(max_inflight_messages=1),
        payments=replace(broker_config(Path("unused")).payments, hold_seconds=0.3),
    )
    raw = RawSubscriber(market, "buyer", "raw-window-age")
    assert await raw.connect() == (0, 0)
    await raw.subscribe("public/w", 1)
    publisher = market.client(None)
    assert await publisher.connect() == 0
    for i in range(3):
        await publisher.publish("public/w", b"a%d" % i, qos=1)
    (first,) = await raw.read_many(1)
    stats = market.service.stats
    await eventually(lambda: stats.inflight_dropped == 2, 5, what="held past hold_seconds")
    assert stats.deliveries_held_for_window == 2
    assert stats.deliveries_held_dropped == 2
    await raw.send(ack_packet(PUBACK, first.packet_id or 0))
    await raw.silence()  # the two dropped do not come back
    await publisher.publish("public/w", b"a3", qos=1)
    (fresh,) = await raw.read_many(1)
    assert fresh.payload == b"a3"
