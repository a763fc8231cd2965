"""The chain view's serving decision against the real ``Brokers`` contract on the embedded
chain: after every change of a topic's list, a seller's default list and the operators'
Registry status, ``view.serves`` (and so ``can_publish``/``can_subscribe``) answers exactly what
``Brokers.isServing`` answers. Then the two cases with no check: a deployment made before
Brokers (serve as before, logged once) and a view with no operator."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import enrol, eventually

from blendsm.broker._chain_view import ChainView
from blendsm.broker._serving import SERVING_EVENTS
from blendsm.contracts import Marketplace, Policy, Role, TopicInfo

MakeMp = Callable[[str], Marketplace]
OPERATORS = ("operator", "stranger", "validator")


async def synced(chain: Any, w3: Any, deployment: Any = None) -> ChainView:
    """A view that replayed the chain so far (healthy for ``max_staleness``)."""
    view = ChainView(
        w3, deployment or chain.deployment, confirmations=0, poll_interval=0.02, max_staleness=600
    )
    await view.sync()
    return view


@pytest.fixture
async def view(chain: Any, w3: Any) -> AsyncIterator[ChainView]:
    """A view following the chain in a background task."""
    view = await synced(chain, w3)
    task = asyncio.create_task(view.run())
    yield view
    view.stop()
    await asyncio.wait_for(task, 5)


async def caught_up(view: ChainView, chain: Any) -> None:
    head = chain.w3.eth.block_number
    await eventually(lambda: view.follower.cursor >= head, within=60, what=f"view at {head}")


async def market(mp: MakeMp, chain: Any) -> list[bytes]:
    """A seller with a device and two topics; three operators enrolled; a buyer."""
    await enrol(mp, chain, "seller", Role.SELLER)
    await enrol(mp, chain, "buyer", Role.BUYER)
    for label in OPERATORS:
        await enrol(mp, chain, label, Role.OPERATOR)
    await mp("seller").registry.add_device(chain.addr("device"))
    ids = []
    for name in ("paid/serve-a", "paid/serve-b"):
        ids.append((await mp("seller").market.create_topic(name, 0, None, Policy.OPEN)).topic_id)
    return ids


async def assert_agrees(view: ChainView, chain: Any, mp: MakeMp, topic_ids: list[bytes]) -> None:
    """For every operator and topic, the view's answer is the contract's."""
    await caught_up(view, chain)
    brokers = mp("oracle").brokers
    for label in OPERATORS:
        view.operator_key = chain.addr(label).lower()
        for tid in topic_ids:
            topic = view.topic(tid)
            assert topic is not None
            expected = await brokers.is_serving(tid, chain.addr(label))
            assert view.serves(topic) == expected, (label, tid.hex())
            assert view.can_publish(chain.addr("device"), tid) == expected, (label, "publish")
            assert view.can_subscribe(chain.addr("buyer"), tid) == expected, (label, "subscribe")


async def test_serves_agrees_with_the_contract_through_every_change(
    view: ChainView, chain: Any, mp: MakeMp
) -> None:
    ids = await market(mp, chain)
    a = ids[0]
    seller = mp("seller").brokers
    op, other, third = (chain.addr(x) for x in OPERATORS)
    await assert_agrees(view, chain, mp, ids)  # no list: every active operator
    await seller.set_topic_operators(a, [other])
    await assert_agrees(view, chain, mp, ids)  # a: only `other`; b: anyone
    await seller.set_seller_operators([op, third])
    await assert_agrees(view, chain, mp, ids)  # a: its own list wins; b: the default
    await seller.set_topic_operators(a, [])
    await assert_agrees(view, chain, mp, ids)  # a cleared: the seller's default
    await mp("oracle").registry.revoke(third)
    await assert_agrees(view, chain, mp, ids)  # a revoked operator serves nothing
    await mp("operator").registry.leave()
    await assert_agrees(view, chain, mp, ids)  # nor one that left: the list yields nobody
    await seller.set_seller_operators([other])
    await seller.set_seller_operators([])
    await assert_agrees(view, chain, mp, ids)  # cleared: any active operator again


async def test_a_fresh_view_replays_the_lists(
    view: ChainView, chain: Any, w3: Any, mp: MakeMp
) -> None:
    """The lists are rebuilt by replaying events from the deployment block, like the rest."""
    ids = await market(mp, chain)
    await mp("seller").brokers.set_topic_operators(ids[0], [chain.addr("stranger")])
    await mp("seller").brokers.set_seller_operators([chain.addr("validator")])
    fresh = await synced(chain, w3)
    fresh.serve_as(chain.addr("stranger"))
    topic = fresh.topic(ids[0])
    assert topic is not None
    assert fresh.serves(topic)
    second = fresh.topic(ids[1])
    assert second is not None
    assert not fresh.serves(second)
    assert fresh.serving_lists(second) == (False, {chain.addr("validator").lower()})


async def test_a_deployment_without_brokers_serves_every_topic_and_says_so_once(
    chain: Any, w3: Any, mp: MakeMp, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await market(mp, chain)
    await mp("seller").brokers.set_topic_operators(ids[0], [chain.addr("stranger")])
    addresses = {k: v for k, v in chain.deployment.addresses.items() if k != "Brokers"}
    older = dataclasses.replace(chain.deployment, addresses=addresses)
    old = await synced(chain, w3, older)
    assert not old.brokers_deployed
    assert "Brokers" not in old.follower.decoder.addresses.values()
    assert SERVING_EVENTS  # followed only when Brokers is deployed
    with caplog.at_level(logging.WARNING, logger="blendsm.broker.chain_view"):
        old.serve_as(chain.addr("operator"))
    lines = [r for r in caplog.records if "no Brokers contract" in r.getMessage()]
    assert len(lines) == 1
    topic = old.topic(ids[0])
    assert topic is not None
    assert old.serves(topic)
    assert old.can_subscribe(chain.addr("buyer"), ids[0])


async def test_a_view_with_no_operator_does_not_check_serving(
    view: ChainView, chain: Any, mp: MakeMp
) -> None:
    ids = await market(mp, chain)
    await mp("seller").brokers.set_topic_operators(ids[0], [chain.addr("stranger")])
    await caught_up(view, chain)
    topic = view.topic(ids[0])
    assert isinstance(topic, TopicInfo)
    assert view.operator_key is None
    assert view.serves(topic)
    view.serve_as(chain.addr("operator"))
    assert not view.serves(topic)
    assert not view.can_publish(chain.addr("device"), ids[0])
