"""What a seller can make the operator pay for anchors, end to end (docs/integrity.md): a real
broker, a real chain, a device flooding a topic nobody buys, and a paying SDK subscriber that
checks every message it received against the root it reads from the chain itself.

The anchor transactions are counted on the chain (one ``Anchored`` event each)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from blendsm.broker import AnchoringConfig
from blendsm.contracts import Policy
from blendsm.device_sdk import IntegrityEvent, IntegrityKind, ReceivedMessage

Market = Any
NOBODY = "data/nobody-buys"


def anchor_txs(market: Market) -> int:
    """Anchor transactions this broker's operator had mined (one ``Anchored`` event each)."""
    chain = market.chain
    logs = chain.DataAnchors.events.Anchored().get_logs(
        from_block=chain.deployment.block, argument_filters={"broker": chain.addr("operator")}
    )
    return len(logs)


async def _unbought_topic(market: Market) -> None:
    created = await market.mp("seller").market.create_topic(NOBODY, market.price, None, Policy.OPEN)
    await market.wait_view(lambda: market.service.view.topic(created.topic_id) is not None)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_flood_nobody_buys_costs_at_most_the_bound_and_bought_messages_all_verify(
    start_market: Any, until: Any, tmp_path: Path
) -> None:
    roots_per_hour = 6
    market = await start_market(
        anchoring=AnchoringConfig(
            batch_seconds=1.0, batch_max_leaves=10, max_roots_per_hour=roots_per_hour
        )
    )
    await _unbought_topic(market)
    sub = market.proving_subscriber(tmp_path / "received.jsonl")  # proves every message
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    received: list[ReceivedMessage] = []
    events: list[IntegrityEvent] = []
    sub.on_message = lambda _s, m: received.append(m)
    sub.on_integrity = lambda _s, e: events.append(e)
    await asyncio.to_thread(sub.connect)
    try:
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        device = await market.connected_device()
        for i in range(150):  # 15 roots' worth by count on a topic nobody subscribed to
            await device.publish(NOBODY, b"flood %d" % i, qos=1)
        for i in range(12):
            await device.publish(market.topic, b"bought %d" % i, qos=1)
        assert await until(lambda: len(received) == 12, 20)
        proven = [IntegrityKind.PROOF_VERIFIED] * 12
        assert await until(lambda: [e.kind for e in events] == proven, 30), events
        assert sorted(m.sequence for m in received) == sorted(
            e.sequence for e in events if e.sequence is not None
        )
        assert all(m.verified for m in received)
        txs = anchor_txs(market)
        assert 1 <= txs <= roots_per_hour
        anchorer = market.service.anchorer
        assert await anchorer.store.leaf_count() == 162  # the flood kept, none lost
        print(f"\n162 leaves (150 unsold), 12 delivered and proven: {txs} anchor transactions")
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_a_seller_over_its_leaf_budget_is_refused_not_acknowledged_and_disconnected(
    start_market: Any, until: Any
) -> None:
    market = await start_market(anchoring=AnchoringConfig(max_pending_leaves_per_seller=5))
    device = await market.connected_device()
    for i in range(5):
        await device.publish(market.topic, b"kept %d" % i, qos=1)
    anchorer = market.service.anchorer
    await device.publish(market.topic, b"QoS 0 over the budget", qos=0)
    assert await until(lambda: anchorer.leaves_refused == 1, 5)
    over = device.envelope_signer.sign(market.topic, b"QoS 1 over", 7, int(time.time() * 1000))
    info = device.mqtt.publish(market.topic, over.encode(), qos=1)
    assert await device.wait_disconnected(5)  # closed, not acknowledged: the device keeps it
    assert not info.is_published()
    assert anchorer.leaves_refused >= 2
    await anchorer.store.drain()
    assert await anchorer.store.leaf_count() == 5
