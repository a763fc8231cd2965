"""Delivered QoS is min(publish QoS, granted QoS) (MQTT 3.1.1, 3.8.4): amqtt 0.12.1 upgraded
a QoS 0 publish to the subscriber's granted QoS, so a fire-and-forget message was stored and
redelivered as if it had been sent at QoS 1 or 2."""

from __future__ import annotations

import pytest

from .conftest import Market


@pytest.mark.parametrize(
    ("granted", "published", "delivered"),
    [(1, 0, 0), (2, 0, 0), (2, 1, 1), (0, 1, 0), (1, 2, 1), (2, 2, 2)],
)
async def test_delivered_qos_is_the_lower_of_publish_and_subscription(
    market: Market, granted: int, published: int, delivered: int
) -> None:
    subscriber, publisher = market.client(None), market.client(None)
    assert await subscriber.connect() == 0
    assert await publisher.connect() == 0
    assert await subscriber.subscribe("public/qos", qos=granted) == [granted]
    await publisher.publish("public/qos", b"reading", qos=published)
    got = await subscriber.got.drain(until=1, within=3)
    assert [(m.payload, m.qos) for m in got] == [(b"reading", delivered)]
