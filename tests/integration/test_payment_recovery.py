"""The payment protocol under careless and hostile clients (issue 12): prepaid vouchers are
credit, never delivery; a buyer and the broker converge after the buyer crashed with messages
in flight; vouchers on a channel whose close is pending on chain are refused."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from blendsm.device_sdk import (
    Quote,
    Receipt,
    Refusal,
    decode_envelope,
)

from .conftest import Payer, split_messages

Market = Any
CHALLENGE_PERIOD = 3600  # tests/conftest.py deploys with this


async def test_prepaid_voucher_is_credit_never_delivered_value(market: Market) -> None:
    """A voucher for 100 messages sent before the first SUBSCRIBE: all 30 published
    messages are delivered, the books show 30 delivered, and nothing above the delivered
    value is ever claimed."""
    price, service = market.price, market.service
    buyer, channel = await market.channel_client("buyer")
    await Payer(market, "buyer", buyer).pay(channel, 100 * price)
    _, notices = split_messages(await buyer.got.drain(within=1.0, until=1), market.topic)
    assert notices == [Receipt(channel, 100 * price, market.chain.addr("operator"))]

    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(30):
        await device.publish(market.topic, b"m%d" % i)
    data, notices = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert len(data) == 30, f"{len(data)} of 30 delivered"
    account = service.meter.accounts[channel]
    assert (account.delivered, account.charged, account.paid) == (30, 30 * price, 100 * price)
    quotes = [n for n in notices if isinstance(n, Quote)]
    assert (quotes[0].charged, quotes[0].paid) == (0, 100 * price)

    # The only voucher is above what was delivered: no claim may be made with it.
    await service.settler.settle_now([channel])
    info = await market.mp("oracle").channels.channel(channel)
    assert info.claimed <= account.charged
    # Once the deliveries reach the prepaid amount, the voucher is claimed.
    for i in range(30, 100):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert len(data) == 70
    assert (account.charged, account.paid) == (100 * price, 100 * price)
    results = await service.settler.settle_now([channel])
    assert [r.status for r in results] == ["confirmed"]
    info = await market.mp("oracle").channels.channel(channel)
    assert info.claimed == 100 * price


def _kill(sub: Any) -> None:
    """What a SIGKILL does to the SDK process: it stops reading, and the kernel resets the
    connection with whatever the broker wrote still unread."""
    sub._mqtt.loop_stop()
    sock = sub._mqtt.socket()
    with contextlib.suppress(OSError):
        sock.close()


async def test_subscriber_killed_with_messages_in_flight_resumes_after_restart(
    market: Market, until: Any, tmp_path: Any
) -> None:
    """Killed while messages were in flight (broker charged 15, the buyer vouchered 10),
    restarted and resumed at 10, the buyer gets a fresh payment request on its new session,
    pays the in-flight messages up to the credit, and the stream resumes."""
    price, service = market.price, market.service
    first = market.sdk_subscriber("buyer", pay_every=1)
    channel = await first.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    await asyncio.to_thread(first.connect)
    assert await asyncio.to_thread(first.subscribe, market.topic) == 0
    device = market.sdk_publisher(tmp_path / "device")
    await asyncio.to_thread(device.connect)
    for i in range(1, 11):  # paced: a live message over the credit would be dropped
        await asyncio.to_thread(device.publish, market.topic, b"a%d" % i, qos=1)
        assert await until(lambda n=i: service.meter.paid_of(channel) == n * price, 10)
    account = service.meter.accounts[channel]

    await asyncio.to_thread(first._mqtt.loop_stop)  # frozen: reads nothing more
    for i in range(10):
        await asyncio.to_thread(device.publish, market.topic, b"b%d" % i, qos=1)
    assert await until(lambda: account.charged == 15 * price, 10)
    assert first.vouchered(channel) == 10 * price
    # The one payment request goes to the frozen session, then the process dies.
    assert await until(lambda: service.stats.payment_requests == 1, 10)
    assert await until(lambda: service.meter.denied_no_credit == 5, 10)
    _kill(first)

    second = market.sdk_subscriber("buyer", pay_every=1)
    second.resume_channel(channel, first.vouchered(channel))
    got: list[bytes] = []
    second.on_message = lambda _s, m: got.append(decode_envelope(m.payload).payload)
    await asyncio.to_thread(second.connect)
    assert await asyncio.to_thread(second.subscribe, market.topic) == 0
    # The first message finds no credit (dropped, not owed: a live message over the credit
    # is never queued); it gets the new session a payment request, which the buyer pays.
    await asyncio.to_thread(device.publish, market.topic, b"c0", qos=1)
    assert await until(lambda: account.paid == account.charged >= 15 * price, 10), (
        account.charged,
        account.paid,
        second.stats,
    )
    assert second.stats.payment_requests == 1
    for i in range(1, 20):  # paced: a live message over the credit would be dropped
        await asyncio.to_thread(device.publish, market.topic, b"c%d" % i, qos=1)
        assert await until(lambda n=i: len(got) >= n, 10), f"{len(got)} of {i} received"
    assert await until(lambda: got[-1:] == [b"c19"], 10)
    assert got[-19:] == [b"c%d" % i for i in range(1, 20)]
    delivered = len(got)
    second.pay_outstanding()
    total = (15 + delivered) * price
    assert await until(lambda: account.paid == account.charged == total, 10)
    assert second.vouchered(channel) == total
    second.disconnect()
    device.close()


async def test_voucher_on_a_channel_whose_close_is_pending_is_refused(
    market: Market, until: Any
) -> None:
    """After the payer's close request (and past its challenge period on chain), a voucher
    gets a ``channel_closing`` refusal, never a receipt, and nothing more is delivered."""
    price, service = market.price, market.service
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    for i in range(3):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = split_messages(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m0", b"m1", b"m2"]

    await market.mp("buyer").channels.request_close(channel)
    await market.wait_view(lambda: service.view.channel(channel).closes_at is not None)
    market.chain.time_travel(CHALLENGE_PERIOD + 1)  # a claim can no longer land
    await Payer(market, "buyer", buyer).pay(channel, 3 * price)
    _, notices = split_messages(await buyer.got.drain(within=3.0, until=1), market.topic)
    assert [type(n) for n in notices] == [Refusal], notices
    assert notices[0].code == "channel_closing"
    assert service.meter.paid_of(channel) == 0
    assert await service.store.latest(channel) is None

    await device.publish(market.topic, b"late")
    data, _ = split_messages(await buyer.got.drain(within=0.5), market.topic)
    assert data == []
