"""Identity and access control through a real broker: CONNECT tokens against the Registry,
SUBSCRIBE/PUBLISH against the Market's policies, control topics only for their owner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from blendsm.contracts import Policy
from blendsm.device_sdk import VoucherDomain, sign_voucher

Market = Any


async def test_member_connects_with_a_fresh_token_and_a_replay_is_refused(market: Market) -> None:
    signer = market.signer("buyer")
    token = signer.token("replayed-client")
    first = market.client("buyer", client_id="replayed-client", password=token)
    assert await first.connect() == 0
    first.close()
    again = market.client("buyer", client_id="replayed-client", password=token)
    assert await again.connect() == 5  # NOT_AUTHORIZED: the nonce was used


async def test_non_member_and_token_for_another_client_id_are_refused(market: Market) -> None:
    assert await market.client("stranger").connect() == 5
    stolen = market.signer("buyer").token("someone-else")
    assert await market.client("buyer", client_id="mine", password=stolen).connect() == 5
    forged = market.client(None, username=market.chain.addr("buyer"), password="bsm1.0.00.00")
    assert await forged.connect() == 5


async def test_device_of_an_active_seller_connects(market: Market) -> None:
    assert await market.client("device").connect() == 0
    # device2 is not registered to any seller
    assert await market.client("device2").connect() == 5


async def test_failed_connect_does_not_take_over_a_victims_session(market: Market) -> None:
    victim = market.client("buyer", client_id="victim-1", clean_session=False)
    assert await victim.connect() == 0
    assert await victim.subscribe("public/news") == [0]
    attacker = market.client("stranger", client_id="victim-1")
    assert await attacker.connect() == 5
    other_member = market.client("buyer2", client_id="victim-1", clean_session=False)
    assert await other_member.connect() == 2  # IDENTIFIER_REJECTED: bound to buyer
    assert not victim.got.disconnected.is_set()
    publisher = market.client(None)
    assert await publisher.connect() == 0
    await publisher.publish("public/news", b"still subscribed")
    assert [m.payload for m in await victim.got.drain(until=1, within=3)] == [b"still subscribed"]


async def test_anonymous_clients_only_use_public_topics(market: Market) -> None:
    anon = market.client(None)
    assert await anon.connect() == 0
    assert await anon.subscribe("public/weather") == [0]
    assert await anon.subscribe(market.topic) == [0x80]
    assert anon.got.disconnected.is_set() is False
    await anon.publish("public/weather", b"sunny")
    assert [m.payload for m in await anon.got.drain(until=1, within=3)] == [b"sunny"]


async def test_anonymous_refused_when_public_topics_are_off(market: Market) -> None:
    market.service.public_topics = False
    assert await market.client(None).connect() == 5


async def test_paid_subscribe_needs_a_channel_and_the_client_stays_connected(
    market: Market,
) -> None:
    buyer = market.client("buyer")
    assert await buyer.connect() == 0
    assert await buyer.subscribe(market.topic) == [0x80]
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    assert await buyer.subscribe(market.topic) == [0]
    assert not buyer.got.disconnected.is_set()


async def test_only_registered_devices_publish_on_market_topics(market: Market) -> None:
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    buyer = market.client("buyer")
    assert await buyer.connect() == 0
    assert await buyer.subscribe(market.topic) == [0]
    seller_itself = market.client("seller")
    buyer2 = market.client("buyer2")
    anon = market.client(None)
    device = market.client("device")
    for c in (seller_itself, buyer2, anon, device):
        assert await c.connect() == 0
    await seller_itself.publish(market.topic, b"from seller", qos=1)
    await buyer2.publish(market.topic, b"from buyer2", qos=1)
    await anon.publish(market.topic, b"from anonymous", qos=1)
    await device.publish(market.topic, b"from device", qos=1)
    payloads = [m.payload for m in await buyer.got.drain(within=1.0) if m.topic == market.topic]
    assert payloads == [b"from device"]


@pytest.mark.parametrize(
    ("policy", "listed", "min_rating", "buyer_ok", "buyer2_ok"),
    [
        (Policy.OPEN, None, 0, True, True),
        (Policy.ALLOWLIST, "buyer", 0, True, False),
        (Policy.DENYLIST, "buyer", 0, False, True),
    ],
)
async def test_each_access_policy_allows_and_denies(
    market: Market,
    policy: Policy,
    listed: str | None,
    min_rating: int,
    buyer_ok: bool,
    buyer2_ok: bool,
) -> None:
    seller = market.mp("seller")
    created = await seller.market.create_topic(
        "paid/policy", market.price, None, policy, min_rating
    )
    if listed is not None:
        await seller.market.set_access(created.topic_id, [market.chain.addr(listed)], True)
    for label in ("buyer", "buyer2"):
        channel = await market.open_channel(label)
        await market.wait_channel(channel)
    await market.wait_view(
        lambda: (
            market.service.view.topic_for_name("paid/policy") is not None
            and (listed is None or bool(market.service.view._listed.get(created.topic_id)))
        )
    )
    for label, expected in (("buyer", buyer_ok), ("buyer2", buyer2_ok)):
        client = market.client(label)
        assert await client.connect() == 0
        assert await client.subscribe("paid/policy") == ([0] if expected else [0x80]), label


async def test_control_topics_belong_to_their_owner(
    market: Market, until: Callable[..., Any]
) -> None:
    buyer = market.client("buyer")
    assert await buyer.connect() == 0
    own = f"blendsm/ctl/{market.chain.addr('buyer').lower()}/notice"
    other = f"blendsm/ctl/{market.chain.addr('buyer2').lower()}/notice"
    assert await buyer.subscribe(own) == [0]
    assert await buyer.subscribe(other) == [0x80]
    assert await buyer.subscribe("blendsm/ctl/#") == [0x80]
    spy = market.client("buyer2")
    assert await spy.connect() == 0
    assert await spy.subscribe("#") == [0]
    # buyer2 publishing into buyer's voucher topic is refused, never broadcast
    await spy.publish(f"blendsm/ctl/{market.chain.addr('buyer').lower()}/voucher", b"{}", qos=1)
    assert await until(lambda: market.service.stats.vouchers_refused >= 1)
    leaked = [m for m in await buyer.got.drain(within=0.5) if m.topic.endswith("/voucher")]
    assert leaked == []


async def test_min_rating_policy_admits_only_well_rated_buyers(market: Market) -> None:
    chain = market.chain
    domain = VoucherDomain(chain.deployment.chain_id, chain.deployment.address("PaymentChannels"))
    # buyer earns a 5-star rating from the seller on a channel with a claim
    channel = await market.open_channel("buyer")
    lane = chain.addr("operator")  # the broker's lane: the operator's own (no broker_key)
    voucher = sign_voucher(bytes(chain.accounts["buyer"].key), domain, channel, lane, 1)
    await market.mp("seller").channels.claim(channel, lane, 1, voucher.signature)
    await market.mp("seller").ratings.rate(channel, 5)
    channel2 = await market.open_channel("buyer2")
    created = await market.mp("seller").market.create_topic(
        "paid/rated", market.price, None, Policy.MIN_RATING, 300
    )
    view = market.service.view
    await market.wait_view(
        lambda: view.topic(created.topic_id) is not None and view.channel(channel2) is not None
    )
    assert view.average_x100(chain.addr("buyer")) == 500
    for label, expected in (("buyer", [0]), ("buyer2", [0x80])):
        client = market.client(label)
        assert await client.connect() == 0
        assert await client.subscribe("paid/rated") == expected, label


async def test_wrapped_topic_keys_go_only_to_their_addressee_from_the_seller(
    market: Market,
) -> None:
    from blendsm.device_sdk import key_topic

    mine = key_topic(market.topic_id, market.chain.addr("buyer"))
    buyer, spy, seller = market.client("buyer"), market.client("buyer2"), market.client("seller")
    for c in (buyer, spy, seller):
        assert await c.connect() == 0
    assert await spy.subscribe(mine) == [0x80]
    assert await spy.subscribe("#") == [0]
    await seller.publish(mine, b"wrapped key, epoch 1", qos=1, retain=True, sign=False)
    await buyer.publish(mine, b"not the seller", qos=1, retain=True, sign=False)
    assert await buyer.subscribe(mine) == [0]
    got = [m.payload for m in await buyer.got.drain(within=1.0) if m.topic == mine]
    assert got == [b"wrapped key, epoch 1"]
    assert [m for m in await spy.got.drain(within=0.3) if m.topic.startswith("blendsm/keys")] == []


async def test_chain_max_staleness_from_the_config_reaches_the_chain_view(
    start_market: Any,
) -> None:
    from blendsm.broker import ChainConfig

    chain = ChainConfig(confirmations=0, poll_interval=0.05, max_staleness=7.5)
    market = await start_market(chain=chain)
    assert market.service.view.max_staleness == 7.5
    assert market.service.view.healthy


async def test_the_broadcast_gate_decides_as_admit_does(market: Market) -> None:
    """``service.gate(topic)`` (the fan-out's gate, made once per broadcast) must answer
    exactly what ``service.admit`` answers per session: an allowlisted buyer is charged, one
    not listed, an unknown member, a session without identity and an anonymous one are not;
    public, reserved and control topics as admit says."""
    from amqtt.session import Session

    from blendsm.broker import Identity, Verdict

    seller = market.mp("seller")
    created = await seller.market.create_topic(
        "paid/gated", market.price, None, Policy.ALLOWLIST, 0
    )
    await seller.market.set_access(created.topic_id, [market.chain.addr("buyer")], True)
    for label in ("buyer", "buyer2"):
        await market.wait_channel(await market.open_channel(label))
    service = market.service
    await market.wait_view(
        lambda: (
            service.view.topic_for_name("paid/gated") is not None
            and bool(service.view._listed.get(created.topic_id))
        )
    )

    def session(ident: Identity | None) -> Session:
        made = Session()
        if ident is not None:
            made.blendsm = ident
        return made

    def member(label: str) -> Identity:
        address = market.chain.addr(label)
        return Identity("participant", address, address.lower())

    sessions = [
        session(member("buyer")),
        session(member("buyer2")),
        session(member("seller")),
        session(Identity("anonymous")),
        session(None),
    ]
    buyer_key = market.chain.addr("buyer").lower()
    topics = ["paid/gated", "public/t", f"blendsm/ctl/{buyer_key}/notice", "blendsm/anchors"]
    seen: list[str] = []
    for topic in topics:
        gate = service.gate(topic)
        for s in sessions:
            expected, got = service.admit(s, topic), gate(s)
            for verdict in (expected, got):
                if not isinstance(verdict, Verdict):
                    service.meter.release(verdict)  # a Charge: nothing is delivered here
            if isinstance(expected, Verdict):
                assert got is expected, (topic, s.blendsm if hasattr(s, "blendsm") else None)
            else:
                assert not isinstance(got, Verdict)
                assert (got.account, got.price, got.topic) == (
                    expected.account,
                    expected.price,
                    expected.topic,
                )
            seen.append(type(got).__name__ if not isinstance(got, Verdict) else got.name)
    assert {"Charge", "DENY", "FREE"} <= set(seen)  # every branch was taken
