"""The reserved tree ``blendsm/`` through a real broker: no market topic, Will or retained message
of a client lives there, and retained state on a name dies when the name becomes a market topic.

A Market deployed before names under ``blendsm/`` were refused may hold a squatted topic there;
:func:`squat` feeds the broker's chain view the TopicCreated event such a deployment emitted
(the view's one event handler, as for every event it follows), since today's contract refuses it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak
from support import enrol

from blendsm.broker import ChainConnection, ChainView, start_broker
from blendsm.contracts import ChainEvent, Policy, Role, connect, disconnect
from blendsm.device_sdk import ANCHORS_TOPIC, ConnectTokenSigner, key_topic

from .conftest import broker_config, enrol_market, open_channel

Market = Any

ZERO = "0x" + "00" * 20


def squat(market: Market, name: str, seller: str = "stranger") -> None:
    """The TopicCreated event of an old deployment: ``seller`` listed ``name`` as a paid topic."""
    market.service.view.apply(
        ChainEvent(
            contract="Market",
            event="TopicCreated",
            args={
                "topicId": keccak(name.encode()),
                "seller": market.chain.addr(seller),
                "name": name,
                "token": ZERO,
                "price": market.price,
                "policy": Policy.OPEN,
                "minRatingX100": 0,
            },
            block_number=0,
            log_index=0,
            tx_hash=b"\x00" * 32,
            address=market.chain.deployment.address("Market"),
            block_hash=b"\x00" * 32,
        )
    )


async def squatter_with_a_buyer_channel(market: Market) -> bytes:
    """Enrol "stranger" as a seller and open a channel "buyer" -> "stranger" through the
    operator (the buyer is a paying customer of the squatter); the channel id."""
    chain = market.chain
    await enrol(market.mp, chain, "stranger", Role.SELLER)
    opened = await market.mp("buyer").channels.open(
        chain.addr("stranger"), chain.addr("operator"), None, 10**15, 0
    )
    await market.wait_channel(opened.channel_id)
    return bytes(opened.channel_id)


def charged(market: Market, channel: bytes) -> int:
    account = market.service.meter.accounts.get(channel)
    return 0 if account is None else int(account.charged + account.reserved)


async def test_a_squatted_anchors_topic_does_not_capture_anchor_notices(market: Market) -> None:
    channel = await squatter_with_a_buyer_channel(market)
    squat(market, ANCHORS_TOPIC)
    anon, buyer = market.client(None), market.client("buyer")
    for c in (anon, buyer):
        assert await c.connect() == 0
        assert await c.subscribe(ANCHORS_TOPIC) == [0]
    await market.running.broker.internal_message_broadcast(ANCHORS_TOPIC, b"anchor notice", 0)
    for c in (anon, buyer):
        got = [m.payload for m in await c.got.drain(until=1, within=3) if m.topic == ANCHORS_TOPIC]
        assert got == [b"anchor notice"]
    assert charged(market, channel) == 0
    assert not market.service.view.is_market_topic(ANCHORS_TOPIC)


async def test_a_squatted_key_topic_neither_charges_nor_replaces_the_buyers_key(
    market: Market,
) -> None:
    channel = await squatter_with_a_buyer_channel(market)
    await market.mp("stranger").registry.add_device(market.chain.addr("device2"))
    await market.wait_view(
        lambda: market.service.view.seller_of_device(market.chain.addr("device2")) is not None
    )
    mine = key_topic(market.topic_id, market.chain.addr("buyer"))
    squat(market, mine)
    buyer, seller, squatter = (
        market.client("buyer"),
        market.client("seller"),
        market.client("device2"),
    )
    for c in (buyer, seller, squatter):
        assert await c.connect() == 0
    assert await buyer.subscribe(mine) == [0]
    await seller.publish(mine, b"real key", qos=1, retain=True, sign=False)
    await squatter.publish(mine, b"squatter's key", qos=1, retain=True, sign=True)
    got = [m.payload for m in await buyer.got.drain(within=1.5) if m.topic == mine]
    assert got == [b"real key"]
    assert charged(market, channel) == 0
    late = market.client("buyer")
    assert await late.connect() == 0
    assert await late.subscribe(mine) == [0]
    assert [m.payload for m in await late.got.drain(until=1, within=3)] == [b"real key"]
    assert charged(market, channel) == 0
    assert not market.service.view.is_market_topic(mine)


@pytest.mark.parametrize(
    ("label", "topic"),
    [
        (None, ANCHORS_TOPIC),
        (None, "key"),
        (None, "blendsm/other"),
        ("seller", "key"),
        ("buyer", ANCHORS_TOPIC),
    ],
)
async def test_a_will_in_the_reserved_tree_is_refused_at_connect(
    market: Market, label: str | None, topic: str
) -> None:
    if topic == "key":
        topic = key_topic(market.topic_id, market.chain.addr("buyer"))
    client = market.client(label)
    client.mqtt.will_set(topic, b"fake", qos=1, retain=True)
    assert await client.connect() == 5
    assert topic not in market.running.broker._retained_messages


async def test_an_anonymous_will_never_fakes_an_anchor_notice(market: Market) -> None:
    watcher = market.client(None)
    assert await watcher.connect() == 0
    assert await watcher.subscribe(ANCHORS_TOPIC) == [0]
    forger = market.client(None)
    forger.mqtt.will_set(ANCHORS_TOPIC, b"fake anchor notice", qos=0, retain=True)
    if await forger.connect() == 0:  # it should not be: then its Will would go out
        forger.mqtt.loop_stop()
        sock = forger.mqtt.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT: the Will is due
        sock.close()
    assert await watcher.got.drain(within=1.5) == []
    assert ANCHORS_TOPIC not in market.running.broker._retained_messages


async def test_a_will_or_retained_publish_next_to_the_reserved_tree_still_works(
    market: Market,
) -> None:
    watcher = market.client(None)
    assert await watcher.connect() == 0
    assert await watcher.subscribe("blendsmX/#") == [0]
    will = market.client(None)
    will.mqtt.will_set("blendsmX/will", b"gone", qos=0, retain=False)
    assert await will.connect() == 0
    publisher = market.client(None)
    assert await publisher.connect() == 0
    await publisher.publish("blendsmX/state", b"kept", qos=1, retain=True)
    assert [m.payload for m in await watcher.got.drain(until=1, within=3)] == [b"kept"]
    assert "blendsmX/state" in market.running.broker._retained_messages


async def test_clients_leave_no_retained_message_in_the_reserved_tree(market: Market) -> None:
    anon, member = market.client(None), market.client("buyer")
    for c in (anon, member):
        assert await c.connect() == 0
    for c in (anon, member):
        await c.publish("blendsm/other", b"squatted", qos=1, retain=True)
        await c.publish(ANCHORS_TOPIC, b"fake anchor", qos=1, retain=True)
    late = market.client(None)
    assert await late.connect() == 0
    assert await late.subscribe("blendsm/#") == [0]
    assert [(m.topic, m.payload) for m in await late.got.drain(within=1.0)] == []
    retained = market.running.broker._retained_messages
    assert [t for t in retained if t.startswith("blendsm/")] == []
    assert await late.subscribe("blendsm/other") == [0x80]  # nothing of a client lives there


async def test_retained_state_on_a_name_dies_when_it_becomes_a_market_topic(
    market: Market, until: Callable[..., Any]
) -> None:
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    anon = market.client(None)
    assert await anon.connect() == 0
    await anon.publish("paid/later", b"stale", qos=1, retain=True)
    retained = market.running.broker._retained_messages
    assert await until(lambda: "paid/later" in retained)
    await market.mp("seller").market.create_topic("paid/later", market.price, None, Policy.OPEN)
    await market.wait_view(lambda: market.service.view.topic_for_name("paid/later") is not None)
    assert await until(lambda: "paid/later" not in retained)
    buyer = market.client("buyer")
    assert await buyer.connect() == 0
    assert await buyer.subscribe("paid/later") == [0]
    assert [m for m in await buyer.got.drain(within=1.0) if m.topic == "paid/later"] == []
    assert charged(market, channel) == 0


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_retained_state_kept_before_the_first_sync_dies_with_the_name_a_market_topic(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    tcp_proxy: Any,
    mqtt_client: Any,
    until: Callable[..., Any],
) -> None:
    """The broker starts while the chain node is away: every name is public until the view's
    first sync, which replays the topic's creation without reporting it as a live event."""
    await enrol_market(mp, chain, "paid/r", buyers=("buyer",))
    channel = await open_channel(mp, chain, "buyer")
    assert chain.anvil is not None
    proxy = tcp_proxy(chain.anvil.port)
    await proxy.start()
    await proxy.stop()  # the node is away, on a port it will come back on
    w3 = connect(f"http://127.0.0.1:{proxy.port}", request_timeout=1.0)
    view = ChainView(
        w3,
        chain.deployment,
        confirmations=0,
        poll_interval=0.05,
        max_staleness=1.0,
        backoff_max=0.2,
    )
    running = await start_broker(
        broker_config(tmp_path / "data"),
        chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
        view=view,
        sync_timeout=0.2,
    )
    clients: list[Any] = []
    try:
        assert not view.synced
        anon = mqtt_client(running.host, running.port)
        clients.append(anon)
        assert await anon.connect() == 0
        await anon.publish("paid/r", b"stale", qos=1, retain=True)
        assert await until(lambda: "paid/r" in running.broker._retained_messages)
        await proxy.start()
        assert await until(lambda: view.healthy and view.channel(channel) is not None, 15)
        account = chain.accounts["buyer"]
        buyer = mqtt_client(
            running.host,
            running.port,
            account=account,
            signer=ConnectTokenSigner(
                bytes(account.key), chain.deployment.chain_id, chain.addr("operator")
            ),
        )
        clients.append(buyer)
        assert await buyer.connect() == 0
        assert await buyer.subscribe("paid/r") == [0]
        assert [m.payload for m in await buyer.got.drain(within=1.0)] == []
        assert "paid/r" not in running.broker._retained_messages
        paid = running.service.meter.accounts.get(channel)
        assert paid is None or paid.charged + paid.reserved == 0
    finally:
        for c in clients:
            c.close()
        await running.stop()
        await disconnect(w3)
