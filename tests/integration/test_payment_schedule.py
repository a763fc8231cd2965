"""The SDK's default payment schedule against a real broker (issue 11: "no drops for credit in
steady state with the SDK's default payment schedule").

By default a ``Subscriber`` pays once half the credit the broker quoted is unpaid, not once per
message, and pays whatever is left ``pay_within`` (1 s) after it arrived; the broker holds (up
to ``payments.hold_messages``, now the session's outgoing bound) what the credit does not yet
cover. So a burst longer than the old 1,000-message hold is delivered whole and paid exactly,
with a few vouchers instead of one per message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from blendsm.broker import PaymentsConfig, SettlementConfig
from blendsm.device_sdk import ReceivedMessage, decode_envelope

from .conftest import Payer, split_messages


def _payments(credit: int) -> PaymentsConfig:
    """Defaults but the credit (and no settlement during the test)."""
    return PaymentsConfig(
        credit_messages=credit, settlement=SettlementConfig(interval_seconds=3600)
    )


async def _stream(
    market: Any, until: Callable[..., Any], count: int, **options: Any
) -> tuple[Any, bytes, list[bytes], list[ReceivedMessage]]:
    """An SDK buyer (``options`` for its schedule) subscribed; ``count`` messages published
    in one burst and all received; the subscriber, channel, what was sent and what arrived."""
    received: list[ReceivedMessage] = []
    options.setdefault("pay_every", None)  # the SDK's default (the fixture's is 1)
    sub = market.sdk_subscriber("buyer", **options)
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**17)
    await market.wait_channel(channel)
    sub.on_message = lambda _s, m: received.append(m)
    await asyncio.to_thread(sub.connect)
    assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
    device = await market.connected_device()
    sent = [b"r%05d" % i for i in range(count)]
    for payload in sent:
        await device.publish(market.topic, payload)
    assert await until(lambda: len(received) >= count, 60.0), len(received)
    return sub, channel, sent, received


async def test_the_default_schedule_pays_by_half_the_credit_and_the_tail_within_a_second(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    market = await start_market(payments=_payments(50))
    service = market.service
    sub, channel, sent, received = await _stream(market, until, 60)
    try:
        assert [decode_envelope(m.payload).payload for m in received] == sent
        account = service.meter.accounts[channel]
        # 60 messages, a voucher per 25 (half of 50): 2, then the last 10 by the timer. One
        # per message (the old default) would be 60; a payment request may add one more.
        assert await until(lambda: account.paid == account.charged == 60 * market.price, 5.0), (
            account.paid,
            account.charged,
        )
        assert sub.vouchered(channel) == 60 * market.price
        assert 3 <= sub.stats.vouchers_sent <= 5, sub.stats.vouchers_sent
        assert service.meter.denied_no_credit == 0
        assert service.stats.deliveries_held_dropped == 0
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_without_pay_within_the_tail_stays_unpaid_until_paid_outstanding(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """The timer is what pays the tail: off, the last 10 stay unpaid (the broker has no reason
    to ask: they are within its credit) until the buyer calls ``pay_outstanding``."""
    market = await start_market(payments=_payments(50))
    sub, channel, _, _ = await _stream(market, until, 60, pay_within=None)
    try:
        account = market.service.meter.accounts[channel]
        assert await until(lambda: account.paid == 50 * market.price, 5.0), account.paid
        await asyncio.sleep(1.5)
        assert account.paid == 50 * market.price < account.charged == 60 * market.price
        assert await asyncio.to_thread(sub.pay_outstanding) == 1
        assert await until(lambda: account.paid == 60 * market.price, 5.0)
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_a_burst_longer_than_the_old_hold_waits_whole_for_a_late_voucher(
    start_market: Callable[..., Any],
) -> None:
    """1,500 messages at once to a member whose credit (5) is used up and who pays only once
    all were published: 1,495 wait in the hold and all of them follow the voucher, in order.
    With the old bound of 1,000 held, the oldest 495 were dropped for credit."""
    market = await start_market(payments=_payments(5))
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    sent = [b"r%05d" % i for i in range(1500)]
    for payload in sent:
        await device.publish(market.topic, payload)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == sent[:5]  # the credit's worth
    assert service.stats.deliveries_held_for_credit == 1495
    assert service.stats.deliveries_held_dropped == 0
    await Payer(market, "buyer", buyer).pay(channel, 1500 * market.price)
    more, _ = split_messages(await buyer.got.drain(within=1.0, until=1495), market.topic)
    assert data + more == sent  # every one, in order
    account = service.meter.accounts[channel]
    assert (account.delivered, account.charged) == (1500, 1500 * market.price)
    assert service.stats.deliveries_held_dropped == 0
    assert service.meter.denied_no_credit == 0
