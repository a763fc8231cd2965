"""BlendSM's delivery path: subscriptions in a topic trie kept equal to amqtt's table, filter
caps, one copy per session, QoS 0 fan-out without a task per delivery, and third-party amqtt
plugins (a topic plugin's RECEIVE decisions, an ``on_mqtt_packet_sent`` listener) still
honoured. Real broker, real paho clients, real chain."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from support import connect_packet, publish_packet, read_packet, tasks_started

from blendsm.broker import BlendBroker, LimitsConfig

from .conftest import PRICE, Market, StartMarket, plain_amqtt_market


def _amqtt_table(broker: Any) -> set[tuple[str, str, int]]:
    return {(f, s.client_id, q) for f, entries in broker._subscriptions.items() for s, q in entries}


def _trie(broker: Any) -> set[tuple[str, str, int]]:
    return {(f, c, q) for f, c, _, q in broker.subscription_table().index.items()}


async def test_the_trie_follows_amqtt_subscriptions_through_every_change(
    market: Market, until: Any
) -> None:
    broker = market.running.broker
    first = market.client(None)
    kept = market.client(None, client_id="kept-session", clean_session=False)
    for c in (first, kept):
        assert await c.connect() == 0
    assert await first.subscribe("public/+/x", 1) == [1]
    assert await first.subscribe("public/#") == [0]
    assert await kept.subscribe("public/a/x", 1) == [1]
    assert await kept.subscribe("public/a/x", 0) == [0]  # amqtt keeps the first grant
    assert _trie(broker) == _amqtt_table(broker)
    assert len(_trie(broker)) == 3
    first.mqtt.unsubscribe("public/#")
    await until(lambda: len(_amqtt_table(broker)) == 2, 5)
    assert _trie(broker) == _amqtt_table(broker)
    first.close()  # a clean session: its subscriptions go with it
    await until(lambda: len(_amqtt_table(broker)) == 1, 5)
    assert _trie(broker) == _amqtt_table(broker) == {("public/a/x", "kept-session", 1)}
    kept.close()  # persistent: kept while offline
    again = market.client(None, client_id="kept-session", clean_session=True)
    assert await again.connect() == 0  # clean session: the old one is deleted
    await until(lambda: not _amqtt_table(broker), 5)
    assert not _trie(broker)
    assert len(broker.subscription_table().index) == 0


async def test_filters_past_the_session_and_member_caps_are_refused(
    start_market: StartMarket,
) -> None:
    market = await start_market(
        limits=LimitsConfig(max_filters_per_session=3, max_filters_per_identity=4)
    )
    anon = market.client(None)
    assert await anon.connect() == 0
    codes = [await anon.subscribe(f"public/{n}") for n in range(4)]
    assert codes == [[0], [0], [0], [0x80]]
    assert await anon.subscribe("public/1") == [0], "a filter already held is not a new one"
    # one member, two sessions: 4 filters between them
    one, two = market.client("buyer"), market.client("buyer")
    for c in (one, two):
        assert await c.connect() == 0
    assert [await one.subscribe(f"public/m/{n}") for n in range(3)] == [[0]] * 3
    assert await two.subscribe("public/m/3") == [0]
    assert await two.subscribe("public/m/4") == [0x80]
    assert market.service.stats.subscriptions_refused_at_limit == 2
    # refused filters deliver nothing
    publisher = market.client(None)
    assert await publisher.connect() == 0
    await publisher.publish("public/3", b"no", qos=1)
    await publisher.publish("public/m/4", b"no", qos=1)
    await publisher.publish("public/2", b"yes", qos=1)
    assert [m.payload for m in await anon.got.drain(within=0.5)] == [b"yes"]
    assert await two.got.drain(within=0.2) == []


async def test_overlapping_filters_deliver_one_copy_at_the_highest_qos(
    market: Market, until: Any
) -> None:
    sub, pub = market.client(None), market.client(None)
    for c in (sub, pub):
        assert await c.connect() == 0
    assert await sub.subscribe("public/o/+", 0) == [0]
    assert await sub.subscribe("public/#", 1) == [1]
    assert await sub.subscribe("public/o/x", 0) == [0]
    await pub.publish("public/o/x", b"once", qos=1)
    got = await sub.got.drain(within=0.5)
    assert [(m.payload, m.qos) for m in got] == [(b"once", 1)]


async def test_qos0_fan_out_starts_no_task_per_delivery(market: Market) -> None:
    subs = [market.client(None) for _ in range(3)]
    pub = market.client(None)
    for c in (*subs, pub):
        assert await c.connect() == 0
    for s in subs:
        assert await s.subscribe("public/fan") == [0]
    with tasks_started() as started:
        for n in range(5):
            await pub.publish("public/fan", b"m%d" % n, qos=1)
        for s in subs:
            got = await s.got.drain(within=1.0, until=5)
            assert [m.payload for m in got] == [b"m%d" % n for n in range(5)]
    assert started, "the broker's own tasks are counted"
    assert not [name for name in started if "mqtt_publish" in name]  # amqtt: 15


async def test_a_message_at_a_time_starts_no_task_per_broadcast_pass(market: Market) -> None:
    """At a steady rate each message is a broadcast pass of its own: amqtt's loop started a
    Task per pass (and waited on it with asyncio.wait); the broker's runs them in place."""
    sub, pub = market.client(None), market.client(None)
    for c in (sub, pub):
        assert await c.connect() == 0
    assert await sub.subscribe("public/steady") == [0]
    with tasks_started() as started:
        for n in range(5):  # one at a time: the next is published once this one arrived
            await pub.publish("public/steady", b"m%d" % n, qos=1)
            got = await sub.got.drain(within=0.2, until=1)
            assert [m.payload for m in got] == [b"m%d" % n]
    assert started, "the broker's own tasks are counted"
    assert not [name for name in started if "_run_broadcast" in name]  # amqtt's loop: 5


async def test_a_failing_broadcast_pass_is_logged_and_the_next_one_runs(
    market: Market, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, until: Any
) -> None:
    broker = market.running.broker
    sub, pub = market.client(None), market.client(None)
    for c in (sub, pub):
        assert await c.connect() == 0
    assert await sub.subscribe("public/fails") == [0]
    real = type(broker)._run_broadcast
    failures = [RuntimeError("a pass failed")]

    async def failing_once(self: Any, running_tasks: Any) -> None:
        if failures:
            await self._broadcast_queue.get()  # this broadcast is lost with its pass
            raise failures.pop()
        await real(self, running_tasks)

    monkeypatch.setattr(type(broker), "_run_broadcast", failing_once)
    await pub.publish("public/fails", b"first", qos=1)  # the pass already waiting takes it
    assert [m.payload for m in await sub.got.drain(within=0.2, until=5)] == [b"first"]
    await pub.publish("public/fails", b"lost", qos=1)  # the failing pass takes this one
    assert await until(lambda: "broadcast pass failed" in caplog.text, 5)
    await pub.publish("public/fails", b"kept", qos=1)
    assert [m.payload for m in await sub.got.drain(within=0.2, until=5)] == [b"kept"]


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_third_party_topic_and_event_plugins_keep_working(
    chain: Any, mp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, until: Any
) -> None:
    from support.third_party import PublishSentRecorder

    third_party = {
        "support.third_party.DenyReceivePlugin": {},
        "support.third_party.PublishSentRecorder": {},
    }
    market = await plain_amqtt_market(
        chain, mp, tmp_path, monkeypatch, "paid/third", third_party, public_topics=True
    )
    broker, channel = market.broker, market.channel
    assert isinstance(broker, BlendBroker)
    PublishSentRecorder.sent.clear()
    async with market.running(until) as (buyer, device, anon):
        for c in (buyer, device, anon):
            assert await c.connect() == 0
        assert await anon.subscribe("blocked/#") == [0]
        assert await anon.subscribe("public/#") == [0]
        assert await buyer.subscribe("paid/third") == [0]
        await anon.publish("blocked/a", b"denied by the plugin", qos=1)
        await anon.publish("public/a", b"free", qos=1)
        await device.publish("paid/third", b"paid", qos=1)
        got = [(m.topic, m.payload) for m in await anon.got.drain(within=0.5)]
        assert got == [("public/a", b"free")]
        paid = [m.payload for m in await buyer.got.drain(within=0.5) if m.topic == "paid/third"]
        assert paid == [b"paid"]
        assert broker.service.meter.accounts[channel].charged == PRICE
        await until(lambda: (buyer.client_id, "paid/third") in PublishSentRecorder.sent, 5)
        assert (anon.client_id, "public/a") in PublishSentRecorder.sent
        assert (anon.client_id, "blocked/a") not in PublishSentRecorder.sent


async def test_a_burst_longer_than_a_batch_is_delivered_whole(market: Market) -> None:
    """More broadcasts queued than one fan-out batch takes (64): the batch that ends at its
    bound must not take one more off the queue and leave it undelivered (the 65th message of
    such a burst was lost without a trace)."""
    sub = market.client(None)
    assert await sub.connect() == 0
    assert await sub.subscribe("public/burst") == [0]
    count = 3 * 64 + 5
    burst = b"".join(publish_packet("public/burst", b"m%d" % n) for n in range(count))

    def send() -> None:
        with socket.create_connection((market.host, market.port), 5) as sock:
            sock.sendall(connect_packet(f"burst-{time.monotonic_ns()}", 60))
            connack = read_packet(sock)
            assert connack is not None
            assert connack.body[-1] == 0
            sock.sendall(burst)  # one write: the connection reader takes it in one go
            time.sleep(0.5)

    await asyncio.to_thread(send)
    got = await sub.got.drain(within=1.0, until=count)
    assert [m.payload for m in got] == [b"m%d" % n for n in range(count)]
