"""Duplicate envelopes end to end: a device (or anyone replaying its bytes) publishes the same
signed message again, through a real broker, to a paying SDK subscriber. The broker must
deliver, charge and anchor each (device, topic, sequence) once, still acknowledge the copy,
and remember what it admitted across a restart (seeded from its durable leaf store)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from blendsm.broker import ChainConnection, PaymentsConfig, SettlementConfig, start_broker
from blendsm.device_sdk import ReceivedMessage, Subscriber, decode_envelope

Market = Any


async def _paying_subscriber(
    market: Market, received: list[ReceivedMessage], *, open_channel: bool = True
) -> Subscriber:
    sub = market.sdk_subscriber("buyer")
    if open_channel:
        channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
        await market.wait_channel(channel)
    sub.on_message = lambda _s, m: received.append(m)
    await asyncio.to_thread(sub.connect)
    assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
    return sub


def _sequences(received: list[ReceivedMessage]) -> list[int]:
    return [
        decode_envelope(m.payload).sequence if m.sequence is None else m.sequence for m in received
    ]


async def _settle(until: Callable[..., Any], predicate: Callable[[], bool]) -> None:
    assert await until(predicate, 10.0)
    await asyncio.sleep(0.5)  # a duplicate, if the broker let one through, arrives by now


async def test_a_republished_envelope_is_delivered_charged_and_anchored_once(
    market: Market, until: Callable[..., Any]
) -> None:
    received: list[ReceivedMessage] = []
    sub = await _paying_subscriber(market, received)
    device = await market.connected_device()
    signer = market.envelope_signer("device")
    now = int(time.time() * 1000)
    first = signer.sign(market.topic, b"reading 1", 1, now).encode()
    second = signer.sign(market.topic, b"reading 2", 2, now).encode()
    # The same bytes again (an outbox resend or a captured envelope replayed), at QoS 1
    # and QoS 0, and the same (device, topic, sequence) signed again with another payload.
    resigned = signer.sign(market.topic, b"reading 1 again", 1, now + 1).encode()
    try:
        await device.publish(market.topic, first, qos=1, sign=False)
        await device.publish(market.topic, second, qos=1, sign=False)
        await device.publish(market.topic, first, qos=1, sign=False)  # PUBACKed: returns
        await device.publish(market.topic, first, qos=0, sign=False)
        await device.publish(market.topic, resigned, qos=1, sign=False)
        await _settle(until, lambda: len(received) >= 2)
        assert _sequences(received) == [1, 2]
        service = market.service
        (account,) = service.meter.accounts.values()
        assert account.charged == 2 * market.price
        assert service.stats.duplicates_dropped == 3
        records = await service.anchorer.anchor_now()
        assert sum(r.leaf_count for r in records) == 2
        assert await service.anchorer.store.leaf_count() == 2
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_an_envelope_replayed_after_a_broker_restart_is_not_delivered_again(
    market: Market, until: Callable[..., Any]
) -> None:
    received: list[ReceivedMessage] = []
    sub = await _paying_subscriber(market, received)
    device = await market.connected_device()
    signer = market.envelope_signer("device")
    now = int(time.time() * 1000)
    sent = [signer.sign(market.topic, b"reading %d" % i, i, now).encode() for i in (1, 2, 3)]
    try:
        for data in sent:
            await device.publish(market.topic, data, qos=1, sign=False)
        await _settle(until, lambda: len(received) >= 3)
        assert _sequences(received) == [1, 2, 3]
        (account,) = market.service.meter.accounts.values()
        assert await until(lambda: account.paid == 3 * market.price, 10.0)  # vouchers durable
    finally:
        await asyncio.to_thread(sub.disconnect)
        device.close()

    # Restart the broker on the same data folder (its leaf store is all it remembers).
    old = market.running
    await old.stop()
    chain = market.chain
    market.running = await start_broker(
        old.service.config,
        chain=ChainConnection(
            old.service.w3, chain.deployment, chain.accounts["operator"], owned=False
        ),
    )
    received.clear()
    sub = await _paying_subscriber(market, received, open_channel=False)
    device = await market.connected_device()
    fourth = signer.sign(market.topic, b"reading 4", 4, now).encode()
    try:
        # The device replays its outbox (2 and 3 were delivered before), then goes on.
        for data in (sent[1], sent[2], fourth):
            await device.publish(market.topic, data, qos=1, sign=False)
        await _settle(until, lambda: len(received) >= 1)
        assert _sequences(received) == [4]
        service = market.service
        (account,) = service.meter.accounts.values()
        assert account.charged == 4 * market.price  # the 3 paid before, and the new one
        assert service.stats.duplicates_dropped == 2
        assert await service.anchorer.store.leaf_count() == 4
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_a_message_stored_but_never_handed_on_before_a_restart_is_delivered_when_resent(
    market: Market, until: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A broker killed after storing a device's message and before its fan-out wrote it
    never acknowledged it (the PUBACK waits for the fan-out), so the device sends it again
    after the restart: it is delivered, not dropped as a duplicate of its stored leaf, and
    not charged (its subscribers may have got and paid for it before the kill, when the
    PUBACK went out but the leaf's mark was not yet durable: a redelivery is never charged);
    what was handed on before is still dropped, and a second copy too. The
    restarted broker counts and logs the leaves it found never handed on."""
    caplog.set_level(logging.INFO)
    device = await market.connected_device()
    signer = market.envelope_signer("device")
    now = int(time.time() * 1000)
    sent = [signer.sign(market.topic, b"reading %d" % i, i, now).encode() for i in (1, 2, 3)]
    try:
        for data in sent[:2]:
            await device.publish(market.topic, data, qos=1, sign=False)
    finally:
        device.close()
    old = market.running
    await old.stop()
    # What a broker killed between storing message 2 and handing it on leaves behind.
    leaves = old.service.config.data_dir / "leaves.sqlite3"
    with contextlib.closing(sqlite3.connect(leaves)) as db, db:
        states = dict(db.execute("SELECT sequence, handed FROM leaves ORDER BY leaf_index"))
        assert list(states.values()) == [1, 1]  # both handed on (no subscriber), marked at stop
        db.execute("UPDATE leaves SET handed = 0 WHERE sequence = ?", ((2).to_bytes(8, "big"),))
    chain = market.chain
    market.running = await start_broker(
        old.service.config,
        chain=ChainConnection(
            old.service.w3, chain.deployment, chain.accounts["operator"], owned=False
        ),
    )
    service = market.service
    assert service.stats.leaves_unhanded_at_start == 1
    assert any("never recorded as handed to subscribers" in r.getMessage() for r in caplog.records)
    received: list[ReceivedMessage] = []
    sub = await _paying_subscriber(market, received)
    device = await market.connected_device()
    try:
        # The device's outbox after the kill: 1 (acknowledged before: not re-sent by an
        # honest device, replayed here) and 2 (never acknowledged), 2 once more, then 3.
        for data in (sent[0], sent[1], sent[1], sent[2]):
            await device.publish(market.topic, data, qos=1, sign=False)
        await _settle(until, lambda: len(received) >= 2)
        assert _sequences(received) == [2, 3]
        assert (service.stats.resends_delivered, service.stats.duplicates_dropped) == (1, 2)
        (account,) = service.meter.accounts.values()
        assert account.charged == market.price  # 3 only: the re-sent 2 went uncharged
        assert await service.anchorer.store.leaf_count() == 3
    finally:
        await asyncio.to_thread(sub.disconnect)


# --------------------------------------------------------------------------- QoS 2, raw


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    size, encoded = len(body), b""
    while True:
        size, digit = divmod(size, 128)
        encoded += bytes([digit | (128 if size else 0)])
        if not size:
            return bytes([first]) + encoded + body


class RawDevice:
    """A device on a raw socket with a persistent session (clean session off), for the QoS 2
    flow that paho does not let a test interrupt."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.client_id = "dedup-raw-device"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        account = self.market.chain.accounts["device"]
        token = self.market.signer("device").token(self.client_id)
        self.reader, self.writer = await asyncio.open_connection(self.market.host, self.market.port)
        header = _string("MQTT") + bytes([4, 0xC0]) + (60).to_bytes(2, "big")
        body = header + _string(self.client_id) + _string(account.address) + _string(token)
        self.writer.write(_packet(0x10, body))
        first, body = await self.read()
        assert (first, body[1]) == (0x20, 0)  # CONNACK accepted (session present or not)

    async def read(self) -> tuple[int, bytes]:
        assert self.reader is not None
        first = (await asyncio.wait_for(self.reader.readexactly(1), 5))[0]
        size, shift = 0, 0
        while True:
            digit = (await self.reader.readexactly(1))[0]
            size += (digit & 127) << shift
            shift += 7
            if not digit & 128:
                break
        return first, await self.reader.readexactly(size)

    async def publish_qos2(self, topic: str, data: bytes, packet_id: int, *, dup: bool) -> None:
        assert self.writer is not None
        first = 0x34 | (0x08 if dup else 0)
        self.writer.write(_packet(first, _string(topic) + packet_id.to_bytes(2, "big") + data))
        assert await self.read() == (0x50, packet_id.to_bytes(2, "big"))  # PUBREC

    async def release(self, packet_id: int) -> None:
        assert self.writer is not None
        self.writer.write(_packet(0x62, packet_id.to_bytes(2, "big")))
        pid = packet_id.to_bytes(2, "big")
        got = await self.read()
        while got == (0x50, pid):  # a resumed session's PUBREC again, then ours
            got = await self.read()
        assert got == (0x70, pid)  # PUBCOMP

    async def drop(self) -> None:
        assert self.writer is not None
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def test_a_qos2_publish_retransmitted_after_a_reconnect_is_delivered_once(
    market: Market, until: Callable[..., Any]
) -> None:
    """MQTT 3.1.1: a QoS 2 PUBLISH is delivered at PUBREL, so a copy re-sent (DUP) after the
    connection dropped between PUBREC and PUBREL replaces the first one; it must be delivered
    (once), not dropped as the first one's duplicate."""
    received: list[ReceivedMessage] = []
    sub = await _paying_subscriber(market, received)
    signer = market.envelope_signer("device")
    data = signer.sign(market.topic, b"reading 1", 1, int(time.time() * 1000)).encode()
    device = RawDevice(market)
    try:
        await device.connect()
        await device.publish_qos2(market.topic, data, 7, dup=False)
        await device.drop()  # before PUBREL: nothing delivered yet
        await device.connect()
        await device.publish_qos2(market.topic, data, 7, dup=True)
        await device.release(7)
        await _settle(until, lambda: len(received) >= 1)
        assert _sequences(received) == [1]
        (account,) = market.service.meter.accounts.values()
        assert account.charged == market.price
    finally:
        await device.drop()
        await asyncio.to_thread(sub.disconnect)


# --------------------------------------------------------------------------- at the cap


async def test_past_the_cap_an_evicted_pair_is_looked_up_and_its_duplicate_still_dropped(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """With room for one (device, topic) pair, a second topic evicts the first; a copy on the
    first topic is then checked against the leaf store, never delivered on trust."""
    market = await start_market(
        payments=PaymentsConfig(
            credit_messages=5,
            dedup_max_pairs=1,
            settlement=SettlementConfig(interval_seconds=3600),
        )
    )
    other = "paid/other"
    await market.mp("seller").market.create_topic(other, market.price)
    await market.wait_view(lambda: market.service.view.topic_for_name(other) is not None)
    received: list[ReceivedMessage] = []
    sub = await _paying_subscriber(market, received)
    assert await asyncio.to_thread(sub.subscribe, other) == 0
    device = await market.connected_device()
    signer = market.envelope_signer("device")
    now = int(time.time() * 1000)
    first = signer.sign(market.topic, b"reading 1", 1, now).encode()
    try:
        await device.publish(market.topic, first, qos=1, sign=False)
        await device.publish(other, signer.sign(other, b"x", 1, now).encode(), qos=1, sign=False)
        await device.publish(market.topic, first, qos=1, sign=False)  # its pair was evicted
        await device.publish(
            market.topic,
            signer.sign(market.topic, b"reading 2", 2, now).encode(),
            qos=1,
            sign=False,
        )
        await _settle(until, lambda: len(received) >= 3)
        assert sorted(
            (m.topic, s) for m, s in zip(received, _sequences(received), strict=True)
        ) == [
            (other, 1),
            (market.topic, 1),
            (market.topic, 2),
        ]
        service = market.service
        assert service.dedup.evicted >= 2
        assert service.stats.duplicates_dropped == 1
        (account,) = service.meter.accounts.values()
        assert account.charged == 3 * market.price
    finally:
        await asyncio.to_thread(sub.disconnect)
