"""A broker serves a market topic only while ``Brokers`` says its operator does, end to end:
a real broker on 127.0.0.1, real paho clients, the embedded chain. The seller moves its topic to
another operator (PUBLISH refused, SUBSCRIBE refused ``not_serving``, live subscribers stop
receiving and are charged nothing for it), moves it back, uses its default list; the operator
is revoked; the chain view goes stale (fail closed, as every market decision)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from support import Client, enrol

from blendsm.broker import parse_config, start_broker
from blendsm.contracts import Role
from blendsm.device_sdk import Refusal

from .conftest import Market, split_messages


async def serving(market: Market, expected: bool) -> None:
    """Wait until the broker's chain view says the topic is (not) served here."""
    view = market.service.view

    def settled() -> bool:
        topic = view.topic_for_name(market.topic)
        return topic is not None and view.serves(topic) is expected

    await market.wait_view(settled)


async def buyer_with_channel(market: Market, label: str = "buyer") -> Client:
    client, _channel = await market.channel_client(label)
    return client


async def published_reaches(market: Market, device: Client, buyer: Client, body: bytes) -> bool:
    await device.publish(market.topic, body, qos=1)
    data, _ = split_messages(await buyer.got.drain(within=0.8), market.topic)
    return bool(data)


def refusals(messages: list[Any]) -> list[Refusal]:
    return [n for n in split_messages(messages, "")[1] if isinstance(n, Refusal)]


async def test_a_topic_moved_to_another_operator_is_refused_here_then_served_again(
    market: Market,
) -> None:
    await enrol(market.mp, market.chain, "stranger", Role.OPERATOR)
    live = await buyer_with_channel(market)
    assert await live.subscribe(market.topic) == [0]
    device = await market.connected_device()
    assert await published_reaches(market, device, live, b"served")
    stats, meter = market.service.stats, market.service.meter
    charged = meter.delivered

    seller = market.mp("seller").brokers
    await seller.set_topic_operators(market.topic_id, [market.chain.addr("stranger")])
    await serving(market, False)

    # The live subscriber gets nothing more, and is charged nothing for it.
    assert not await published_reaches(market, device, live, b"not served")
    assert meter.delivered == charged
    assert stats.publishes_refused_not_serving >= 1
    # A new SUBSCRIBE: SUBACK 0x80 and a refusal notice saying why.
    late = await buyer_with_channel(market, "buyer2")
    assert await late.subscribe(market.topic) == [0x80]
    notices = refusals(await late.got.drain(within=1.0))
    assert [n.code for n in notices] == ["not_serving"]
    assert market.chain.addr("operator") in notices[0].detail
    assert stats.subscribes_refused_not_serving == 1
    assert not late.got.disconnected.is_set()

    # The seller adds this operator back: served again, to the old and the new subscriber.
    await seller.set_topic_operators(
        market.topic_id, [market.chain.addr("stranger"), market.chain.addr("operator")]
    )
    await serving(market, True)
    assert await late.subscribe(market.topic) == [0]
    assert await published_reaches(market, device, live, b"served again")
    data, _ = split_messages(await late.got.drain(within=0.8), market.topic)
    assert len(data) == 1
    assert meter.delivered == charged + 2


async def test_the_topic_list_wins_over_the_sellers_default_list(market: Market) -> None:
    await enrol(market.mp, market.chain, "stranger", Role.OPERATOR)
    buyer = await buyer_with_channel(market)
    seller = market.mp("seller").brokers
    here, there = market.chain.addr("operator"), market.chain.addr("stranger")

    await seller.set_seller_operators([there])  # the default for all the seller's topics
    await serving(market, False)
    assert await buyer.subscribe(market.topic) == [0x80]
    await seller.set_topic_operators(market.topic_id, [here])  # this topic's own list wins
    await serving(market, True)
    assert await buyer.subscribe(market.topic) == [0]
    await seller.set_topic_operators(market.topic_id, [])  # cleared: the default again
    await serving(market, False)
    assert await buyer.subscribe(market.topic) == [0x80]
    await seller.set_seller_operators([])  # no list at all: any active operator
    await serving(market, True)
    assert await buyer.subscribe(market.topic) == [0]


async def test_a_revoked_operator_serves_nothing(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="blendsm.broker")
    buyer = await buyer_with_channel(market)
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    assert await published_reaches(market, device, buyer, b"before")
    await market.mp("oracle").registry.revoke(market.chain.addr("operator"))
    await serving(market, False)
    assert not await published_reaches(market, device, buyer, b"after")
    other = await buyer_with_channel(market, "buyer2")
    assert await other.subscribe(market.topic) == [0x80]
    assert [n.code for n in refusals(await other.got.drain(within=1.0))] == ["not_serving"]
    # The log says why, once a minute at most (the rest are counted).
    why = [r.getMessage() for r in caplog.records if "does not serve it" in r.getMessage()]
    assert len(why) == 1
    assert "any operator; operator active: False" in why[0]


async def test_a_stale_chain_view_refuses_like_every_market_decision(market: Market) -> None:
    """Stale: the view cannot say who serves, so the topic is refused (the existing rule for
    an unhealthy view: SUBACK 0x80, QoS 1 PUBLISH unacknowledged, nothing delivered)."""
    live = await buyer_with_channel(market)
    assert await live.subscribe(market.topic) == [0]
    late = await buyer_with_channel(market, "buyer2")
    device = await market.connected_device()
    view = market.service.view
    view.max_staleness = 0.2  # nothing else changes: the view just stops being trusted
    view.poll_interval = 60.0
    await market.wait_view(lambda: not view.healthy, within=5.0)
    assert await late.subscribe(market.topic) == [0x80]
    await device.publish(market.topic, b"stale", qos=0)
    data, _ = split_messages(await live.got.drain(within=0.8), market.topic)
    assert data == []
    assert market.service.stats.subscribes_refused_not_serving == 0  # undecided, not "no"


async def test_an_embedded_broker_serves_from_its_start_with_default_confirmations(
    tmp_path: Any,
) -> None:
    """``blendsm broker`` on the embedded chain enrols its operator at start. That chain mines
    only on transactions, so with the default ``chain.confirmations`` (2) the view did not see
    the enrolment: the operator was not active, and every market topic was refused until two
    more transactions happened (CI caught the start-up warning)."""
    config = parse_config({"listen": {"host": "127.0.0.1", "port": 0}, "data_dir": str(tmp_path)})
    assert config.chain.confirmations == 2
    running = await start_broker(config)
    try:
        assert running.service.view.operator_active()
    finally:
        await running.stop()
