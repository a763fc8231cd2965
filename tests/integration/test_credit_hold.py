"""Deliveries refused for credit are held for a voucher, not dropped (broker/_credit_hold.py):
a slow payer gets every message in order and pays exactly for them; one that never pays gets
its credit's worth and nothing more is kept or charged; a disconnect ends the hold."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest

from blendsm.broker import PaymentsConfig, SessionsConfig, SettlementConfig
from blendsm.device_sdk import PaymentRequest, ReceivedMessage, decode_envelope

from .conftest import Payer, split_messages

Market = Any


def _payments(**options: Any) -> PaymentsConfig:
    """The test market's payments section (credit 5) with ``options``."""
    intake = options.pop("intake", {})
    base = PaymentsConfig(credit_messages=5, settlement=SettlementConfig(interval_seconds=3600))
    return dataclasses.replace(base, intake=dataclasses.replace(base.intake, **intake), **options)


async def _paid_at_the_credit_edge(
    market: Market, until: Callable[..., Any]
) -> tuple[Any, bytes, Any]:
    """A subscribed buyer sent the credit's worth (m0-m4), and its voucher for them, which
    nobody waits on yet; returns the buyer, its channel and the connected device."""
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(5):
        await device.publish(market.topic, b"m%d" % i)
    assert await until(lambda: market.service.meter.accounts[channel].charged == 5 * market.price)
    await Payer(market, "buyer", buyer).pay(channel, 5 * market.price)
    return buyer, channel, device


async def _still_lingering(service: Any, until: Callable[..., Any]) -> None:
    """The voucher reached the intake and is still queued 0.3 s later: nobody waits on it."""
    assert await until(lambda: service.intake.queued == 1, 2.0)
    await asyncio.sleep(0.3)
    assert service.intake.queued == 1


async def test_a_slow_sdk_payer_gets_every_message_in_order_and_pays_exactly(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    # Every voucher takes >= 0.2 s to count (the intake lingers): with a credit of 5 messages,
    # a burst of 40 used to lose most of them to the credit gate.
    market = await start_market(payments=_payments(intake={"linger_seconds": 0.2}))
    service = market.service
    received: list[ReceivedMessage] = []
    sub = market.sdk_subscriber("buyer")
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    sub.on_message = lambda _s, m: received.append(m)
    await asyncio.to_thread(sub.connect)
    try:
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        device = await market.connected_device()
        sent = [b"r%02d" % i for i in range(40)]
        for payload in sent:
            await device.publish(market.topic, payload)
        assert await until(lambda: len(received) >= len(sent), 20.0), len(received)
        await asyncio.sleep(0.3)  # nothing more (a duplicate) arrives
        assert [decode_envelope(m.payload).payload for m in received] == sent
        account = service.meter.accounts[channel]
        assert service.meter.denied_no_credit == 0
        assert account.denied_no_credit == 0
        assert service.stats.deliveries_held_for_credit > 0
        assert service.stats.deliveries_held_dropped == 0
        assert account.delivered == len(sent)
        assert account.charged == len(sent) * market.price
        assert account.reserved == 0
        assert await until(lambda: account.paid == account.charged == sub.vouchered(channel))
    finally:
        await asyncio.to_thread(sub.disconnect)


@pytest.mark.parametrize("qos", [0, 1])
async def test_a_late_voucher_sends_the_held_messages_in_order(
    start_market: Callable[..., Any], qos: int
) -> None:
    market = await start_market(payments=_payments())
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic, qos=qos) == [qos]
    device = await market.connected_device()
    for i in range(12):
        await device.publish(market.topic, b"m%d" % i, qos=qos)
    data, notices = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(5)]  # the credit's worth, then held
    assert sum(isinstance(n, PaymentRequest) for n in notices) == 1
    account = market.service.meter.accounts[channel]
    assert (account.charged, account.reserved) == (5 * market.price, 0)  # held: not reserved

    payer = Payer(market, "buyer", buyer)
    await payer.pay(channel, 5 * market.price)
    data, notices = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(5, 10)]  # in order, within the credit
    assert any(isinstance(n, PaymentRequest) for n in notices)  # asked again for the rest
    await payer.pay(channel, 10 * market.price)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m10", b"m11"]
    assert account.charged == 12 * market.price
    assert account.delivered == 12
    assert market.service.meter.denied_no_credit == 0
    assert market.service.stats.deliveries_held_dropped == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
async def test_a_voucher_that_held_deliveries_wait_on_commits_off_sched_batch(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """The voucher store's thread leaves SCHED_BATCH for a commit that deliveries held for
    credit wait on (under it such a commit waited for slices of the busy loop's core: 22-113
    ms through a paid burst), and yields to the loop again for one nobody waits on."""
    market = await start_market(payments=_payments())
    store = market.service.store
    account_of = market.service.meter.accounts

    def policy() -> int:
        return os.sched_getscheduler(store._thread_id)

    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    payer = Payer(market, "buyer", buyer)
    device = await market.connected_device()
    await device.publish(market.topic, b"m0")
    assert await until(
        lambda: channel in account_of and account_of[channel].charged == market.price
    )
    await payer.pay(channel, market.price)  # nothing held: nobody waits on this commit
    assert await until(lambda: account_of[channel].paid == market.price)
    assert policy() == os.SCHED_BATCH

    for i in range(1, 9):  # the credit's worth (5) goes out, 3 are held
        await device.publish(market.topic, b"m%d" % i)
    assert await until(lambda: account_of[channel].charged == 6 * market.price)
    assert account_of[channel].waiters
    await payer.pay(channel, 6 * market.price)
    assert await until(lambda: account_of[channel].charged == 9 * market.price)
    assert policy() == os.SCHED_OTHER

    await payer.pay(channel, 9 * market.price)  # nothing held any more
    assert await until(lambda: account_of[channel].paid == 9 * market.price)
    assert policy() == os.SCHED_BATCH


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
async def test_deliveries_held_behind_a_voucher_already_on_its_way_expedite_its_commit(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """The voucher arrived while nobody waited (its commit would yield to the loop), then
    deliveries began to wait on it: the store's thread leaves SCHED_BATCH at once, not only
    from the next commit on (the intake still lingers when the policy is read, so the
    commit's own rule cannot be what moved it)."""
    market = await start_market(payments=_payments(intake={"linger_seconds": 0.5}))
    service = market.service
    store = service.store

    def policy() -> int:
        return os.sched_getscheduler(store._thread_id)

    buyer, channel, device = await _paid_at_the_credit_edge(market, until)
    assert await until(lambda: service.intake.queued == 1, 2.0)  # lingering: nobody waits
    assert policy() == os.SCHED_BATCH
    await device.publish(market.topic, b"m5")
    assert await until(lambda: service.stats.deliveries_held_for_credit == 1, 2.0)
    assert service.intake.queued == 1  # still lingering
    assert policy() == os.SCHED_OTHER
    assert await until(lambda: service.meter.accounts[channel].paid == 5 * market.price, 3.0)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data[-1] == b"m5"  # released once the voucher counted


async def test_a_delivery_that_begins_to_wait_ends_the_unawaited_linger(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """A voucher nobody waits for may linger 5 s here to share a commit; the first delivery
    held for credit behind it ends that linger at once, so the hold lasts a commit, not 5 s."""
    market = await start_market(payments=_payments(intake={"unawaited_linger_seconds": 5.0}))
    service = market.service
    buyer, channel, device = await _paid_at_the_credit_edge(market, until)
    await _still_lingering(service, until)
    await device.publish(market.topic, b"m5")
    assert await until(lambda: service.meter.accounts[channel].paid == 5 * market.price, 2.0)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data[-1] == b"m5"  # released once the voucher counted


async def test_with_holding_off_a_refusal_for_credit_ends_the_unawaited_linger(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """``hold_messages`` 0: a delivery refused for credit is dropped, not held, so nothing
    waits on the lingering voucher; the refusal itself ends the linger (else every message
    of the next 5 s here would be dropped for a credit already paid)."""
    market = await start_market(
        payments=_payments(hold_messages=0, intake={"unawaited_linger_seconds": 5.0})
    )
    service = market.service
    buyer, channel, device = await _paid_at_the_credit_edge(market, until)
    await _still_lingering(service, until)
    await device.publish(market.topic, b"m5")  # refused for credit: dropped
    assert await until(lambda: service.meter.accounts[channel].paid == 5 * market.price, 2.0)
    await device.publish(market.topic, b"m6")
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data[-1] == b"m6"
    assert service.stats.deliveries_held_for_credit == 0


async def test_a_voucher_deliveries_wait_for_is_not_kept_behind_anothers_linger(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """Another payer's voucher lingers (nobody waits on it, 5 s here); a voucher that held
    deliveries already wait for arrives behind it: the batch is taken at once."""
    market = await start_market(payments=_payments(intake={"unawaited_linger_seconds": 5.0}))
    service = market.service
    other, other_channel = await market.channel_client("buyer2")
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(6):
        await device.publish(market.topic, b"m%d" % i)
    assert await until(lambda: service.stats.deliveries_held_for_credit == 1, 2.0)
    await Payer(market, "buyer2", other).pay(other_channel, market.price)  # a prepayment
    await _still_lingering(service, until)
    await Payer(market, "buyer", buyer).pay(channel, 5 * market.price)
    assert await until(lambda: service.meter.accounts[channel].paid == 5 * market.price, 2.0)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(6)]


async def test_an_offline_replay_paused_for_credit_ends_the_unawaited_linger(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """A prepayment from another connection of the buyer lingers (nobody waits); the
    persistent session's replay then pauses at the credit behind it: the voucher is taken
    at once and the replay goes on, not 5 s later."""
    market = await start_market(payments=_payments(intake={"unawaited_linger_seconds": 5.0}))
    service = market.service
    channel = await market.queued_offline("buyer", "buyer-persistent", 8)
    payer_client = market.client("buyer")  # the same buyer on another connection
    assert await payer_client.connect() == 0
    await Payer(market, "buyer", payer_client).pay(channel, 5 * market.price)
    assert await until(lambda: service.intake.queued == 1, 2.0)
    again = market.client("buyer", client_id="buyer-persistent", clean_session=False)
    assert await again.connect() == 0
    data, _ = split_messages(await again.got.drain(within=2.0), market.topic)
    assert data == [b"q%d" % i for i in range(8)]  # credit 5, then the voucher's 5
    assert service.meter.paid_of(channel) == 5 * market.price


async def test_no_payment_request_while_a_voucher_of_the_channel_is_on_its_way(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    # The voucher for the credit's worth sits in the intake (linger 0.5 s) when the next
    # deliveries are refused: asking then only made the payer sign a second voucher (the
    # SDK answers a request with what it received), which doubled the vouchers of a burst.
    market = await start_market(payments=_payments(intake={"linger_seconds": 0.5}))
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(5):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(5)]  # the credit's worth
    await Payer(market, "buyer", buyer).pay(channel, 5 * market.price)
    assert await until(lambda: service.intake.queued == 1, 2.0)  # lingering, not durable
    for i in range(5, 8):
        await device.publish(market.topic, b"m%d" % i)
    assert await until(lambda: service.stats.deliveries_held_for_credit == 3, 2.0)
    account = service.meter.accounts[channel]
    assert await until(lambda: account.paid == 5 * market.price, 3.0)
    data, notices = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m5", b"m6", b"m7"]  # sent once the voucher counted, in order
    assert not any(isinstance(n, PaymentRequest) for n in notices), notices
    assert service.stats.payment_requests == 0


async def test_a_withheld_payment_request_goes_out_when_the_voucher_adds_nothing(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    # The voucher on its way is the latest accepted one again (a payer unsure it arrived):
    # it raises nothing, so the held delivery is gated again and the request goes out
    # (else the member would wait for hold_seconds, then lose the message).
    market = await start_market(payments=_payments(intake={"linger_seconds": 0.3}))
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    payer = Payer(market, "buyer", buyer)
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    await payer.pay(channel, 5 * market.price)
    account = await _account_paid(market, until, channel, 5 * market.price)
    for i in range(10):
        await device.publish(market.topic, b"m%d" % i)
    data, notices = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(10)]  # paid 5 + the credit of 5
    assert not any(isinstance(n, PaymentRequest) for n in notices), notices
    await payer.pay(channel, 5 * market.price)  # the same voucher again
    assert await until(lambda: service.intake.queued == 1, 2.0)
    await device.publish(market.topic, b"m10")
    data, notices = split_messages(await buyer.got.drain(within=1.5), market.topic)
    assert data == []  # still held
    requests = [n for n in notices if isinstance(n, PaymentRequest)]
    assert len(requests) == 1, notices
    assert (requests[0].charged, requests[0].paid) == (10 * market.price, 5 * market.price)
    assert account.paid == 5 * market.price
    await payer.pay(channel, 10 * market.price)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m10"]
    assert service.stats.deliveries_held_dropped == 0


async def _account_paid(
    market: Market, until: Callable[..., Any], channel: bytes, amount: int
) -> Any:
    """The channel's account once ``amount`` is durable (the Quote's account)."""
    service = market.service
    assert await until(lambda: service.meter.paid_of(channel) == amount, 3.0)
    account = service.meter.accounts.get(channel)
    assert account is not None
    return account


async def test_a_member_that_never_pays_gets_its_credit_and_the_held_ones_are_dropped(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    market = await start_market(payments=_payments(hold_messages=3, hold_seconds=2.0))
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(10):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=0.3), market.topic)
    assert data == [b"m%d" % i for i in range(5)]
    # 5 held: 2 dropped at once (3 at most), held against the session's outgoing bound ...
    session = market.running.broker._sessions[buyer.client_id][0]
    hold = session.blendsm_credit_hold
    flow = session_flow(market, buyer.client_id)
    assert service.stats.deliveries_held_dropped == 2
    assert [item.topic for item in hold.items] == [market.topic] * 3
    assert flow.task_messages == 3
    assert flow.task_bytes == sum(item.size for item in hold.items) > 0
    # ... and the other 3 dropped once 2 s old.
    assert await until(lambda: service.stats.deliveries_held_dropped == 5, 8.0)
    assert service.stats.deliveries_held_for_credit == 5
    assert service.meter.denied_no_credit == 5  # dropped for credit, as before the hold
    account = service.meter.accounts[channel]
    assert (account.charged, account.reserved, account.delivered) == (5 * market.price, 0, 5)
    assert account.waiters == []  # nothing of the session kept alive by the account
    assert (len(hold.items), hold.topics) == (0, {})
    assert (flow.task_bytes, flow.task_messages) == (0, 0)  # no share of the bound left
    # A voucher now sends nothing of what was dropped, and charges nothing more.
    await Payer(market, "buyer", buyer).pay(channel, 5 * market.price)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == []
    assert account.charged == 5 * market.price


def session_flow(market: Market, client_id: str) -> Any:
    """The backpressure Flow of a connected client's writer."""
    _session, handler = market.running.broker._sessions[client_id]
    return handler.writer.blendsm_flow


async def test_a_subscriber_that_disconnects_is_not_charged_for_what_was_held(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    market = await start_market(payments=_payments())
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(10):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(5)]
    assert service.stats.deliveries_held_for_credit == 5
    buyer.close()
    assert await until(lambda: service.stats.deliveries_held_dropped == 5, 5.0)
    account = service.meter.accounts[channel]
    assert account.waiters == []
    # It comes back and pays what it got: nothing held is sent or charged.
    again = market.client("buyer")
    assert await again.connect() == 0
    assert await again.subscribe(f"blendsm/ctl/{market.chain.addr('buyer').lower()}/notice") == [0]
    assert await again.subscribe(market.topic) == [0]
    await Payer(market, "buyer", again).pay(channel, 5 * market.price)
    assert await until(lambda: account.paid == 5 * market.price)
    data, _ = split_messages(await again.got.drain(within=0.5), market.topic)
    assert data == []
    assert (account.charged, account.reserved, account.delivered) == (5 * market.price, 0, 5)


async def test_held_qos1_messages_of_a_persistent_session_go_to_its_offline_queue(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    market = await start_market(payments=_payments())
    service = market.service
    buyer, channel = await market.channel_client(
        "buyer", client_id="buyer-persistent", clean_session=False
    )
    assert await buyer.subscribe(market.topic, qos=1) == [1]
    device = await market.connected_device()
    for i in range(10):
        await device.publish(market.topic, b"q%d" % i, qos=1)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"q%d" % i for i in range(5)]
    buyer.close()
    session = market.running.broker._sessions["buyer-persistent"][0]
    assert await until(lambda: session.retained_messages.qsize() == 5, 5.0)
    assert service.stats.deliveries_held_dropped == 0
    account = service.meter.accounts[channel]
    assert account.charged == 5 * market.price  # queued, not charged

    again = market.client("buyer", client_id="buyer-persistent", clean_session=False)
    assert await again.connect() == 0
    await Payer(market, "buyer", again).pay(channel, 5 * market.price)
    data, _ = split_messages(await again.got.drain(within=1.0), market.topic)
    assert data == [b"q%d" % i for i in range(5, 10)]  # replayed in order once paid
    assert account.charged == 10 * market.price


async def test_a_reading_member_that_pays_late_is_held_to_its_bound_not_called_a_slow_consumer(
    start_market: Callable[..., Any], until: Callable[..., Any]
) -> None:
    """The held messages count against the session's outgoing bound (broker memory stays
    bounded), but a member that reads everything is not a slow consumer: when the hold fills
    the bound its oldest are dropped for credit (counted, never charged), the session is
    neither paused nor disconnected, and a voucher sends the newest the bound kept."""
    market = await start_market(
        payments=_payments(hold_messages=1000, hold_seconds=30.0),
        sessions=SessionsConfig(max_outgoing_messages=10, slow_consumer_seconds=0.5),
    )
    service = market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(40):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(5)]  # the credit's worth; it read them all
    hold = market.running.broker._sessions[buyer.client_id][0].blendsm_credit_hold
    assert await until(lambda: service.stats.deliveries_held_dropped == 25, 5.0)
    assert len(hold.items) == 10  # the bound's worth, the newest
    stats = service.stats
    assert (stats.deliveries_dropped_slow_consumer, stats.slow_consumers_paused) == (0, 0)
    assert service.meter.denied_no_credit == 25  # dropped for credit, as before the hold
    await asyncio.sleep(1.0)  # twice slow_consumer_seconds: still connected
    assert stats.slow_consumers_disconnected == 0
    await Payer(market, "buyer", buyer).pay(channel, 15 * market.price)
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == [b"m%d" % i for i in range(30, 40)]
    account = service.meter.accounts[channel]
    assert (account.delivered, account.charged) == (15, 15 * market.price)
