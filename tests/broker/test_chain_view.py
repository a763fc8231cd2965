"""ChainView against the real contracts on the embedded chain: after sync and after live
changes it answers like the contracts' own canSubscribe/canPublish and reads; misses and an
unhealthy view answer no."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import enrol, eventually

from blendsm.broker._chain_view import ChainView
from blendsm.contracts import ChainEvent, Market, Marketplace, Policy, Role
from blendsm.device_sdk import sign_voucher
from blendsm.errors import ContractRevertError

MakeMp = Callable[[str], Marketplace]
PRICE = 10**12
DEPOSIT = 10**18
ACCOUNTS = ("seller", "buyer", "buyer2", "stranger", "operator", "device", "device2")


# --- helpers ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_view(chain: Any, w3: Any, **kwargs: Any) -> ChainView:
    """A fast-polling view. Its staleness bound is far beyond any test's length unless the
    test sets one: comparing a view with the contracts takes hundreds of chain reads, which
    outlast a few seconds on a loaded machine and would turn a correct view unhealthy."""
    kwargs.setdefault("max_staleness", 600.0)
    return ChainView(w3, chain.deployment, confirmations=0, poll_interval=0.02, **kwargs)


@pytest.fixture
async def running(chain: Any, w3: Any) -> AsyncIterator[ChainView]:
    """A view synced and following the chain in a background task."""
    view = make_view(chain, w3)
    await view.sync()
    task = asyncio.create_task(view.run())
    yield view
    view.stop()
    await asyncio.wait_for(task, 5)


async def caught_up(view: ChainView, chain: Any) -> None:
    """Wait until the view applied every block mined so far (bounded, generously: dozens of
    blocks of events on a loaded machine)."""
    head = chain.w3.eth.block_number
    await eventually(lambda: view.follower.cursor >= head, within=60, what=f"view at block {head}")


async def assert_agrees(view: ChainView, chain: Any, mp: MakeMp, topic_ids: list[bytes]) -> None:
    """The view's decisions equal the contracts' for every (account, topic) pair."""
    reader = mp("oracle")
    assert view.healthy
    for label in ACCOUNTS:
        who = chain.addr(label)
        assert view.is_active(who) == await reader.registry.is_active(who), label
        assert view.seller_of_device(who) == await reader.registry.active_seller_of(who), label
        part = await reader.registry.participant(who)
        assert view.role_of(who) == (part.role if part.active else None), label
        for tid in topic_ids:
            sub = await reader.market.can_subscribe(who, tid)
            pub = await reader.market.can_publish(who, tid)
            assert view.can_subscribe(who, tid) == sub, (label, tid.hex(), "subscribe")
            assert view.can_publish(who, tid) == pub, (label, tid.hex(), "publish")
            # callers may pass addresses in any case
            assert view.can_subscribe(who.lower(), tid) == sub
    for tid in topic_ids:
        info = await reader.market.topic(tid)
        assert info is not None
        assert view.topic(tid) == info
        assert view.topic_for_name(info.name) == info


async def rated_channel(chain: Any, mp: MakeMp, buyer: str, seller: str, score: int) -> bytes:
    """A claimed channel buyer -> seller, the seller rating the buyer ``score``."""
    opened = await mp("buyer").channels.open(seller, None, None, DEPOSIT)
    domain = (await mp("buyer").channels.domain()).voucher_domain()
    no_operator = "0x" + "00" * 20  # a channel with no operator has one lane, address zero
    v = sign_voucher(
        bytes(chain.accounts["buyer"].key), domain, opened.channel_id, no_operator, PRICE
    )
    await mp("seller").channels.claim(opened.channel_id, v.lane, v.cumulative_amount, v.signature)
    await mp("seller").ratings.rate(opened.channel_id, score)
    return opened.channel_id


# --- tests --------------------------------------------------------------------------------


async def test_sync_mirrors_every_policy(chain: Any, w3: Any, mp: MakeMp) -> None:
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    await enrol(mp, chain, "buyer2", Role.BUYER)
    await mp("operator").registry.apply_for_role(Role.OPERATOR)  # pending: not active
    await mp("seller").registry.add_device(chain.addr("device"))
    m = mp("seller").market
    ids = [
        (await m.create_topic("s/open", PRICE)).topic_id,
        (await m.create_topic("s/allow", PRICE, None, Policy.ALLOWLIST)).topic_id,
        (await m.create_topic("s/deny", PRICE, None, Policy.DENYLIST)).topic_id,
        (
            await m.create_topic("s/rating", PRICE, chain.Token.address, Policy.MIN_RATING, 300)
        ).topic_id,
        (await m.create_topic("s/paused", PRICE)).topic_id,
    ]
    await m.set_access(ids[1], [buyer])
    await m.set_access(ids[2], [buyer])
    await m.pause(ids[4])
    await m.set_encrypted(ids[1])
    await m.set_encrypted(ids[2])
    await m.set_encrypted(ids[2], False)
    channel_id = await rated_channel(chain, mp, buyer, seller, 4)

    view = make_view(chain, w3)
    assert not view.healthy
    await view.sync()
    assert view.synced
    await assert_agrees(view, chain, mp, ids)
    assert view.average_x100(buyer) == await mp("oracle").ratings.average_x100(buyer) == 400
    assert view.can_subscribe(buyer, ids[3])
    assert not view.can_subscribe(chain.addr("buyer2"), ids[3])  # unrated
    assert view.can_subscribe(buyer, ids[1])
    assert not view.can_subscribe(buyer, ids[2])
    assert view.channel(channel_id) == await mp("oracle").channels.channel(channel_id)
    topic = view.topic_for_name("s/rating")
    assert topic is not None
    assert topic.token == chain.Token.address
    # The encrypted mark is mirrored (and read back by the binding's topic()).
    assert [view.topic(t).encrypted for t in ids] == [False, True, False, False, False]  # type: ignore[union-attr]
    allow = view.topic_for_name("s/allow")
    assert allow is not None
    assert allow.encrypted
    assert await m.is_encrypted(ids[1])


async def test_live_changes_are_followed(chain: Any, mp: MakeMp, running: ChainView) -> None:
    view = running
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    device = chain.addr("device")
    await mp("seller").registry.add_device(device)
    m = mp("seller").market
    tid = (await m.create_topic("live/t", PRICE, None, Policy.DENYLIST)).topic_id
    await caught_up(view, chain)
    await assert_agrees(view, chain, mp, [tid])
    assert view.can_subscribe(buyer, tid)
    assert view.can_publish(device, tid)

    await m.set_price(tid, 3 * PRICE)
    await caught_up(view, chain)
    assert view.topic(tid).price == 3 * PRICE  # type: ignore[union-attr]

    await m.set_access(tid, [buyer])  # denylisted
    await caught_up(view, chain)
    assert not view.can_subscribe(buyer, tid)
    await m.set_access(tid, [buyer], listed=False)
    await m.pause(tid)
    await caught_up(view, chain)
    assert not view.can_subscribe(buyer, tid)
    assert not view.can_publish(device, tid)
    await m.resume(tid)
    assert not view.topic_for_name("live/t").encrypted  # type: ignore[union-attr]
    await m.set_encrypted(tid, True)
    await caught_up(view, chain)
    assert view.topic_for_name("live/t").encrypted  # type: ignore[union-attr]
    assert view.can_subscribe(buyer, tid)  # the mark changes no access decision
    await m.set_encrypted(tid, False)
    await caught_up(view, chain)
    assert not view.topic_for_name("live/t").encrypted  # type: ignore[union-attr]
    await m.set_encrypted(tid, True)
    await mp("seller").registry.remove_device(device)
    await caught_up(view, chain)
    assert view.can_subscribe(buyer, tid)
    assert not view.can_publish(device, tid)
    assert view.seller_of_device(device) is None
    await assert_agrees(view, chain, mp, [tid])

    # channels: open, top up, claim, request close, settle
    ch = mp("buyer").channels
    opened = await ch.open(seller, chain.addr("operator"), None, DEPOSIT, 100)
    await ch.top_up(opened.channel_id, DEPOSIT)
    await caught_up(view, chain)
    assert view.channel(opened.channel_id) == await ch.channel(opened.channel_id)
    assert view.channel(opened.channel_id).deposit == 2 * DEPOSIT  # type: ignore[union-attr]
    domain = (await ch.domain()).voucher_domain()
    lane = chain.addr("operator")
    v = sign_voucher(bytes(chain.accounts["buyer"].key), domain, opened.channel_id, lane, 5 * PRICE)
    await mp("operator").channels.claim(opened.channel_id, lane, v.cumulative_amount, v.signature)
    await ch.request_close(opened.channel_id)
    await caught_up(view, chain)
    info = view.channel(opened.channel_id)
    assert info == await ch.channel(opened.channel_id)
    assert info is not None
    assert info.claimed == 5 * PRICE
    assert view.lane_claimed(opened.channel_id, lane) == 5 * PRICE
    assert view.lane_claimed(opened.channel_id, chain.addr("seller")) == 0
    assert info.closing
    await mp("seller").channels.cooperative_close(opened.channel_id)
    await caught_up(view, chain)
    assert view.channel(opened.channel_id) == await ch.channel(opened.channel_id)
    assert view.channel(opened.channel_id).settled  # type: ignore[union-attr]

    # revocation
    await mp("oracle").registry.revoke(buyer)
    await caught_up(view, chain)
    assert not view.is_active(buyer)
    assert view.role_of(buyer) is None
    assert not view.can_subscribe(buyer, tid)
    await assert_agrees(view, chain, mp, [tid])


async def test_listeners_get_live_events(chain: Any, mp: MakeMp, running: ChainView) -> None:
    seen: list[ChainEvent] = []
    got: list[str] = []

    async def async_listener(event: ChainEvent) -> None:
        got.append(event.event)

    def broken(event: ChainEvent) -> None:
        raise RuntimeError("listener bug")

    running.on_change(seen.append)
    running.on_change(broken)  # logged, does not stop the view or later listeners
    unsubscribe = running.on_change(async_listener)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    await caught_up(running, chain)
    unsubscribe()
    await mp("oracle").registry.revoke(buyer)
    await caught_up(running, chain)
    assert [e.event for e in seen] == ["Applied", "Approved", "Revoked"]
    assert seen[-1].args["account"] == buyer
    assert got == ["Applied", "Approved"]
    assert running.healthy


async def test_cache_miss_answers_no(chain: Any, mp: MakeMp, running: ChainView) -> None:
    await enrol(mp, chain, "buyer", Role.BUYER)
    await caught_up(running, chain)
    unknown = Market.topic_id("nobody/sells/this")
    stranger = chain.addr("stranger")
    assert running.healthy
    assert running.topic_for_name("nobody/sells/this") is None
    assert running.topic(unknown) is None
    assert not running.can_subscribe(chain.addr("buyer"), unknown)
    assert not running.can_publish(chain.addr("device"), unknown)
    assert not running.is_active(stranger)
    assert running.role_of(stranger) is None
    assert running.seller_of_device(stranger) is None
    assert running.channel(b"\x01" * 32) is None
    assert running.average_x100(stranger) == 0


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_unhealthy_answers_no(
    chain: Any, mp: MakeMp, node_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Never synced, stale (the node cut away past the staleness bound) and stopped: every
    decision is no. The node coming back heals the view, with what changed meanwhile."""
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    await enrol(mp, chain, "seller", Role.SELLER)
    device = chain.addr("device")
    await mp("seller").registry.add_device(device)
    tid = (await mp("seller").market.create_topic("h/t", PRICE)).topic_id

    def all_no(view: ChainView) -> bool:
        return not (
            view.healthy
            or view.can_subscribe(buyer, tid)
            or view.can_publish(device, tid)
            or view.is_active(buyer)
            or view.role_of(buyer) is not None
            or view.seller_of_device(device) is not None
            or view.topic_for_name("h/t") is not None
            or view.topic(tid) is not None
        )

    clock = FakeClock()
    view = make_view(chain, node_link.w3, clock=clock, max_staleness=5.0, backoff_max=0.2)
    assert all_no(view)  # never synced
    assert view.unhealthy_reason == "not synced"
    await view.sync()
    assert view.can_subscribe(buyer, tid)
    assert view.can_publish(device, tid)

    # stale: the node is away and the follower keeps failing past the staleness bound
    await node_link.proxy.stop()
    task = asyncio.create_task(view.run())
    await eventually(lambda: "chain poll failed" in caplog.text, within=30, what="a failed poll")
    assert view.healthy  # within the bound
    later = (await mp("seller").market.create_topic("h/later", PRICE)).topic_id  # unseen yet
    clock.now += 6.0
    assert all_no(view)
    assert "last caught up" in (view.unhealthy_reason or "")
    assert "unhealthy" in caplog.text
    await node_link.proxy.start()  # same port: the node is back
    await eventually(lambda: view.healthy, within=30, what="healthy again")
    assert view.can_subscribe(buyer, tid)
    await caught_up(view, chain)
    assert view.topic(later) is not None  # created while the view could not see the node

    # stopped
    view.stop()
    await asyncio.wait_for(task, 5)
    assert all_no(view)


async def test_differential_random_actions(
    chain: Any, w3: Any, mp: MakeMp, running: ChainView
) -> None:
    """Random registry/market actions (reverts skipped); after each few the live view and,
    at the end, a freshly synced view agree with the contracts for every (account, topic)."""
    rng = random.Random(20261124)
    people = ("seller", "buyer", "buyer2", "stranger", "operator")
    roles = (Role.SELLER, Role.BUYER, Role.OPERATOR)
    devices = ("device", "device2")
    names = ("d/a", "d/b", "d/c")
    topic_ids = [Market.topic_id(n) for n in names]
    oracle = mp("oracle").registry

    kinds_done: set[str] = set()

    async def act() -> None:
        kind = rng.choice(
            [
                "apply",
                "approve",
                "approve",
                "reject",
                "revoke",
                "leave",
                "rejoin",
                "rejoin",
                "device",
                "device",
                "undevice",
                "create",
                "create",
                "policy",
                "access",
                "pause",
                "resume",
                "encrypt",
            ]
        )
        who = rng.choice(people)
        tid = rng.choice(topic_ids)
        owner = mp(rng.choice(("seller", "seller", "buyer2")))
        seller_m = owner.market
        if kind == "apply":
            role = Role.SELLER if who == "seller" else rng.choice(roles)
            await mp(who).registry.apply_for_role(role)
        elif kind == "approve":
            await oracle.approve(chain.addr(who))
        elif kind == "reject":
            await oracle.reject(chain.addr(who))
        elif kind == "revoke":
            if who == "seller":
                return  # final: spare the main seller
            await oracle.revoke(chain.addr(who))
        elif kind == "rejoin":  # the main seller comes back after leaving
            with contextlib.suppress(ContractRevertError):
                await mp("seller").registry.apply_for_role(Role.SELLER)
            await oracle.approve(chain.addr("seller"))
        elif kind == "leave":
            await mp(who).registry.leave()
        elif kind == "device":
            await owner.registry.add_device(chain.addr(rng.choice(devices)))
        elif kind == "undevice":
            await owner.registry.remove_device(chain.addr(rng.choice(devices)))
        elif kind == "create":
            policy = rng.choice(list(Policy))
            minimum = 100 if policy is Policy.MIN_RATING else 0
            await seller_m.create_topic(rng.choice(names), PRICE, None, policy, minimum)
        elif kind == "policy":
            policy = rng.choice(list(Policy))
            await seller_m.set_policy(tid, policy, 100 if policy is Policy.MIN_RATING else 0)
        elif kind == "access":
            picks = rng.sample([chain.addr(p) for p in people], 2)
            await seller_m.set_access(tid, picks, rng.random() < 0.7)
        elif kind == "pause":
            await seller_m.pause(tid)
        elif kind == "resume":
            await seller_m.resume(tid)
        elif kind == "encrypt":
            await seller_m.set_encrypted(tid, rng.random() < 0.6)
        kinds_done.add(kind)

    # give the sellers a head start so topics get created
    await enrol(mp, chain, "seller", Role.SELLER)
    await enrol(mp, chain, "buyer", Role.BUYER)
    applied = 0
    for step in range(150):
        try:
            await act()
            applied += 1
        except ContractRevertError:
            pass
        if step % 30 == 29:
            await caught_up(running, chain)
            existing = [t for t in topic_ids if await mp("oracle").market.topic(t) is not None]
            await assert_agrees(running, chain, mp, existing)
    assert applied >= 30
    assert {
        "apply",
        "approve",
        "revoke",
        "create",
        "policy",
        "access",
        "pause",
        "encrypt",
    } <= kinds_done
    assert {"device", "undevice"} <= kinds_done
    existing = [t for t in topic_ids if await mp("oracle").market.topic(t) is not None]
    assert existing
    await caught_up(running, chain)
    await assert_agrees(running, chain, mp, existing)
    fresh = make_view(chain, w3)
    await fresh.sync()
    await assert_agrees(fresh, chain, mp, existing)


async def test_a_topic_squatted_under_the_reserved_tree_is_ignored(chain: Any, w3: Any) -> None:
    """An older Market let a seller create ``blendsm/anchors``: the view never treats it as a
    market topic, and that topic's later events neither apply nor break the view."""
    view = make_view(chain, w3)
    await view.sync()
    topic_id = b"\x11" * 32

    def event(name: str, args: dict[str, Any]) -> ChainEvent:
        return ChainEvent(
            "Market",
            name,
            {"topicId": topic_id, **args},
            1,
            0,
            b"\x00" * 32,
            chain.deployment.address("Market"),
            b"\x00" * 32,
        )

    view.apply(
        event(
            "TopicCreated",
            {
                "seller": chain.addr("seller"),
                "name": "blendsm/anchors",
                "token": "0x" + "00" * 20,
                "price": PRICE,
                "policy": Policy.OPEN,
                "minRatingX100": 0,
            },
        )
    )
    view.apply(event("PriceChanged", {"oldPrice": PRICE, "newPrice": 1}))
    view.apply(event("TopicPaused", {}))
    assert not view.is_market_topic("blendsm/anchors")
    assert view.topic_for_name("blendsm/anchors") is None
    assert view.topic(topic_id) is None
    assert view.all_topics() == []


async def test_a_stale_view_logs_its_unhealthiness_once_not_per_lookup(
    chain: Any, w3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The reason text carries the lag, which grows with every lookup while the view is
    stale: one WARNING when it turns unhealthy (and one INFO when healthy again), not a line
    per lookup on the delivery path (which was one per 0.1 s of lag, per lookup)."""
    clock = FakeClock()
    view = make_view(chain, w3, clock=clock, max_staleness=5.0)
    await view.sync()
    assert view.healthy
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=view.log.name):
        for _ in range(300):  # 30 s of lookups, the lag growing by 0.1 s each
            clock.now += 0.1
            view.topic_for_name("h/t")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings[:5]]
    assert "last caught up" in warnings[0].getMessage()
    assert not view.healthy
