"""Exact accounting end to end: SDK subscribers pay as messages arrive, the broker meters
every delivery, settles on chain, and the channels close with every wei accounted for.

Figures printed with ``-s`` go into the paid-delivery issue's closing note."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import enrol

from blendsm.contracts import Role
from blendsm.device_sdk import Subscriber

BUYERS = ("buyer", "buyer2", "validator", "stranger")
DEPOSIT = 10**16
FEE_BPS = 100  # 1 % to the broker operator
CHALLENGE_PERIOD = 3600  # tests/conftest.py deploys with this
CREDIT_MESSAGES = 20  # the broker lets a channel owe 20 messages ...
PAY_EVERY = 5  # ... and the SDK pays every 5, so vouchers in flight never stall delivery


@pytest.mark.parametrize(
    ("chain", "target"), [("embedded", 10_000), ("anvil", 2_000)], indirect=["chain"]
)
async def test_delivered_times_price_equals_vouchers_claims_and_payouts(
    market: Any, until: Any, target: int, tmp_path: Path
) -> None:
    chain, mp, service = market.chain, market.mp, market.service
    price = market.price
    for label in BUYERS[2:]:
        await enrol(mp, chain, label, Role.BUYER)
    subscribers: dict[str, Subscriber] = {}
    channels: dict[str, bytes] = {}
    for label in BUYERS:
        sub = market.sdk_subscriber(label, pay_every=PAY_EVERY)
        channels[label] = await sub.open_channel(
            mp(label), chain.addr("seller"), DEPOSIT, fee_bps=FEE_BPS
        )
        subscribers[label] = sub
    for channel in channels.values():
        await market.wait_channel(channel)
    for sub in subscribers.values():
        await asyncio.to_thread(sub.connect)
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0

    service.meter.credit_messages = CREDIT_MESSAGES
    # Sample the broker's exposure while the stream runs: never above the credit.
    credit = CREDIT_MESSAGES * price
    worst = 0
    sampling = True

    async def sample() -> None:
        nonlocal worst
        while sampling:
            for account in service.meter.accounts.values():
                worst = max(worst, account.charged + account.reserved - account.paid)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    device = market.sdk_publisher(tmp_path / "device")
    await asyncio.to_thread(device.connect)
    stop = threading.Event()
    published = 0

    def publish() -> None:
        nonlocal published
        while not stop.is_set():
            device.publish(market.topic, b"%063d" % published, qos=0)
            published += 1
            time.sleep(0.0005)

    started = time.monotonic()
    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert await until(lambda: service.meter.delivered >= target, 180)
    finally:
        stop.set()
        publisher.join()
    elapsed = time.monotonic() - started

    # Everything in flight lands: each subscriber pays the tail below pay_every ...
    def settled_off_chain() -> bool:
        for sub in subscribers.values():
            sub.pay_outstanding()  # no-op unless a message arrived since the last voucher
        return all(
            service.meter.accounts[channels[label]].paid
            == service.meter.accounts[channels[label]].charged
            == sub.vouchered(channels[label])
            for label, sub in subscribers.items()
        )

    assert await until(settled_off_chain, 30), [
        (
            service.meter.accounts[channels[label]].paid,
            service.meter.accounts[channels[label]].charged,
            sub.vouchered(channels[label]),
            sub.stats,
        )
        for label, sub in subscribers.items()
    ]
    sampling = False
    await sampler
    assert worst <= credit

    delivered = 0
    for label, sub in subscribers.items():
        account = service.meter.accounts[channels[label]]
        assert account.delivered == sub.stats.paid_messages
        assert account.delivered * price == account.charged == sub.vouchered(channels[label])
        latest = await service.store.latest(channels[label])
        assert latest is not None
        assert latest.cumulative_amount == account.charged
        delivered += account.delivered
    assert delivered == service.meter.delivered >= target

    # Settle on chain: claimed == latest voucher, per channel.
    results = await service.settler.settle_now()
    assert all(r.status == "confirmed" for r in results), results
    for label in BUYERS:
        info = await mp("oracle").channels.channel(channels[label])
        assert info.claimed == service.meter.accounts[channels[label]].charged

    # Close: payee + operator fee + refund == deposit.
    for label, sub in subscribers.items():
        await sub.close_channel(mp(label), channels[label])
    chain.time_travel(CHALLENGE_PERIOD + 1)
    payouts = fees = refunds = 0  # payouts: what reached the seller
    for label, sub in subscribers.items():
        settlement = await sub.withdraw(mp(label), channels[label])
        refunds += settlement.refund
    logs = chain.PaymentChannels.events.ChannelClaimed().get_logs(from_block=chain.deployment.block)
    ours = {bytes(e["args"]["channelId"]) for e in logs} & set(channels.values())
    assert ours == set(channels.values())
    for e in logs:
        if bytes(e["args"]["channelId"]) in ours:
            fees += int(e["args"]["fee"])  # the event's payout includes the operator's fee
            payouts += int(e["args"]["payout"]) - int(e["args"]["fee"])
    assert payouts + fees == delivered * price
    assert fees == sum(
        service.meter.accounts[c].charged * FEE_BPS // 10_000 for c in channels.values()
    )
    assert payouts + fees + refunds == DEPOSIT * len(BUYERS)
    for sub in subscribers.values():
        sub.disconnect()
    device.close()
    print(
        f"\n[{chain.kind}] {delivered} paid deliveries to {len(BUYERS)} subscribers in"
        f" {elapsed:.1f}s ({delivered / elapsed:.0f}/s), published {published},"
        f" dropped for credit {service.meter.denied_no_credit};"
        f" vouchered = charged = claimed = {delivered * price} wei;"
        f" payouts {payouts} + fees {fees} + refunds {refunds} = deposits {DEPOSIT * len(BUYERS)};"
        f" worst unpaid exposure {worst} <= credit {credit}; claims {len(results)}"
    )
