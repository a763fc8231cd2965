"""Metering through a real broker: the credit gate, payment requests, retained and offline
messages charged when (and only when) sent, voucher intake and its refusals, revocation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from support import enrol

from blendsm.contracts import Role
from blendsm.device_sdk import (
    PaymentRequest,
    Quote,
    Receipt,
    Refusal,
    VoucherDomain,
)

from .conftest import Payer, split_messages

Market = Any


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
async def test_credit_exhaustion_pauses_delivery_and_a_voucher_resumes_it(market: Market) -> None:
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(10):
        await device.publish(market.topic, b"m%d" % i)
    data, notices = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(5)]  # credit_messages = 5, then paused
    assert isinstance(notices[0], Quote)
    assert notices[0].price == market.price
    assert notices[0].channel_id == channel
    requests = [n for n in notices if isinstance(n, PaymentRequest)]
    assert len(requests) == 1
    assert requests[0].charged == 5 * market.price
    account = market.service.meter.accounts[channel]
    assert (account.charged, account.paid, account.reserved) == (5 * market.price, 0, 0)

    # The five refused for credit were held, not dropped: the voucher sends them, in order.
    payer = Payer(market, "buyer", buyer)
    await payer.pay(channel, 5 * market.price)
    data, notices = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(5, 10)]
    assert Receipt(channel, 5 * market.price, market.chain.addr("operator")) in notices
    assert (account.charged, account.paid) == (10 * market.price, 5 * market.price)
    assert market.service.meter.denied_no_credit == 0
    await payer.pay(channel, 10 * market.price)
    for i in range(10, 13):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m10", b"m11", b"m12"]
    assert (account.charged, account.paid) == (13 * market.price, 10 * market.price)


async def test_retained_paid_message_is_charged_on_subscribe_and_not_leaked_on_connect(
    market: Market,
) -> None:
    device = await market.connected_device()
    await device.publish(market.topic, b"retained reading", qos=1, retain=True)
    # A member with a channel but no subscription gets nothing on CONNECT (amqtt would).
    bystander, bystander_channel = await market.channel_client("buyer2")
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"retained reading"]
    assert market.service.meter.accounts[channel].charged == market.price
    leaked, _ = split_messages(await bystander.got.drain(within=0.5), market.topic)
    assert leaked == []
    assert market.service.meter.accounts.get(bystander_channel) is None or (
        market.service.meter.accounts[bystander_channel].charged == 0
    )


async def test_offline_queue_is_charged_on_replay_and_pauses_on_credit(market: Market) -> None:
    channel = await market.queued_offline("buyer", "buyer-persistent", 8)
    await market.wait_view(lambda: True)
    account = market.service.meter.select(
        market.chain.addr("buyer").lower(),
        market.service.view.topic_for_name(market.topic),
        market.service.view,
    )
    assert account.charged == 0  # queued, not sent: not charged

    again = market.client("buyer", client_id="buyer-persistent", clean_session=False)
    assert await again.connect() == 0
    data, notices = split_messages(await again.got.drain(within=1.0), market.topic)
    assert data == [b"q%d" % i for i in range(5)]  # credit 5, the rest stays queued
    assert account.charged == 5 * market.price
    assert any(isinstance(n, PaymentRequest) for n in notices)
    await Payer(market, "buyer", again).pay(channel, 5 * market.price)
    data, _ = split_messages(await again.got.drain(within=1.0), market.topic)
    assert data == [b"q5", b"q6", b"q7"]
    assert account.charged == 8 * market.price


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
async def test_bad_vouchers_are_refused_and_honest_clients_are_undisturbed(
    market: Market, until: Callable[..., Any]
) -> None:
    honest, honest_channel = await market.channel_client("buyer2")
    assert await honest.subscribe(market.topic) == [0]
    attacker, channel = await market.channel_client("buyer")
    payer = Payer(market, "buyer", attacker)
    chain = market.chain
    other_domain = VoucherDomain(
        chain.deployment.chain_id + 1, chain.deployment.address("PaymentChannels")
    )
    deposit = 10**15

    await payer.pay(channel, 1000, key=bytes(chain.accounts["buyer2"].key))  # forged
    await payer.pay(channel, 1000, domain=other_domain)  # wrong domain
    await payer.pay(channel, deposit + 1)  # over the deposit
    await payer.pay(honest_channel, 1000)  # someone else's channel
    await payer.pay(os.urandom(32), 1000)  # unknown channel
    await payer.pay(channel, 2000)  # honest: accepted
    await payer.pay(channel, 2000)  # replayed: the latest again, answered with a receipt
    await payer.pay(channel, 1500)  # lower
    await payer.raw(os.urandom(300))  # random bytes
    await payer.raw(b"{" + b" " * 10_000 + b"}")  # huge
    await payer.raw(orjson.dumps({"v": 1, "channel": 5, "amount": [1], "signature": None}))
    await payer.raw(
        orjson.dumps({"v": 1, "channel": "0x" + channel.hex(), "amount": "-5", "signature": "0x00"})
    )
    await payer.raw(b"[1, 2, 3]")

    _, notices = split_messages(await attacker.got.drain(within=1.0, until=13), market.topic)
    codes = [n.code if isinstance(n, Refusal) else "receipt" for n in notices]
    assert sorted(codes) == sorted(
        [
            "bad_signature",
            "bad_signature",
            "over_deposit",
            "not_payer",
            "unknown_channel",
            "receipt",
            "receipt",
            "not_newer",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
        ]
    )
    assert market.service.meter.paid_of(channel) == 2000
    latest = await market.service.store.latest(channel)
    assert latest is not None
    assert latest.cumulative_amount == 2000

    device = await market.connected_device()
    await device.publish(market.topic, b"for the honest one")
    data, _ = split_messages(await honest.got.drain(within=1.0), market.topic)
    assert data == [b"for the honest one"]
    await Payer(market, "buyer2", honest).pay(honest_channel, market.price)
    assert await until(lambda: market.service.meter.paid_of(honest_channel) == market.price)
    assert not honest.got.disconnected.is_set()
    assert not attacker.got.disconnected.is_set()


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
async def test_revocation_disconnects_live_sessions(
    market: Market, until: Callable[..., Any]
) -> None:
    buyer = market.client("buyer")
    device = market.client("device")
    assert await buyer.connect() == 0
    assert await device.connect() == 0
    started = time.monotonic()
    await market.mp("oracle").registry.revoke(market.chain.addr("buyer"))
    assert await buyer.wait_disconnected(10)
    delay = buyer.got.disconnected_at - started
    print(f"\nrevocation -> disconnect delay: {delay * 1000:.0f} ms (poll interval 50 ms)")
    assert await until(lambda: market.service.stats.disconnects_revoked == 1)
    # a revoked participant cannot come back
    assert await market.client("buyer").connect() == 5
    # revoking a seller disconnects its devices
    await market.mp("oracle").registry.revoke(market.chain.addr("seller"))
    assert await device.wait_disconnected(10)
    assert await market.client("device").connect() == 5
    # an approved newcomer still connects
    await enrol(market.mp, market.chain, "validator", Role.VALIDATOR)
    await market.wait_view(lambda: market.service.view.is_active(market.chain.addr("validator")))
    assert await market.client("validator").connect() == 0


async def test_wildcard_subscription_delivers_only_what_is_paid_for(market: Market) -> None:
    created = await market.mp("seller").market.create_topic("paid/other", market.price)
    await market.wait_view(lambda: market.service.view.topic(created.topic_id) is not None)
    channel_holder, channel = await market.channel_client("buyer")
    no_channel = market.client("buyer2")  # a member with no channel
    anon = market.client(None)
    for c in (no_channel, anon):
        assert await c.connect() == 0
    for c in (channel_holder, no_channel, anon):
        assert await c.subscribe("paid/#") == [0]
    device = await market.connected_device()
    await device.publish(market.topic, b"paid one", qos=1)
    await device.publish("paid/other", b"paid two", qos=1)
    await anon.publish("paid/free-for-all", b"public", qos=1)

    def payloads(messages: list[Any]) -> list[bytes]:
        return sorted(m.payload for m in messages if m.topic.startswith("paid/"))

    assert payloads(await channel_holder.got.drain(within=1.0)) == [
        b"paid one",
        b"paid two",
        b"public",
    ]
    assert payloads(await no_channel.got.drain(within=0.3)) == [b"public"]
    assert payloads(await anon.got.drain(within=0.3)) == [b"public"]
    assert market.service.meter.accounts[channel].charged == 2 * market.price


async def test_a_closing_channel_stops_paid_delivery(market: Market) -> None:
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    await device.publish(market.topic, b"open", qos=1)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"open"]
    await market.mp("buyer").channels.request_close(channel)
    await market.wait_view(lambda: market.service.view.channel(channel).closes_at is not None)
    await device.publish(market.topic, b"after close request", qos=1)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == []
    assert market.service.meter.accounts[channel].charged == market.price
    assert await buyer.subscribe(market.topic) == [0x80]  # no usable channel any more


async def test_the_amqtt_guard_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    import amqtt

    from blendsm.broker import check_amqtt_compatibility
    from blendsm.errors import ConfigError

    check_amqtt_compatibility()
    monkeypatch.setattr(amqtt, "__version__", "0.13.0")
    with pytest.raises(ConfigError, match=r"needs exactly 0\.12\.1"):
        check_amqtt_compatibility()
