"""Money survives failures: the chain node going away (a TCP proxy to anvil is cut and
restored) and the broker process being SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import claim_logs, confirmed_claims, stored_voucher

from blendsm.device_sdk import (
    ConnectTokenSigner,
    EnvelopeSigner,
    MessageDomain,
    Receipt,
    decode_notice,
)

from .conftest import (
    Participants,
    StartProxiedBroker,
    enrol_market,
    open_channel,
    proxied_config,
    voucher_payload,
)

PRICE = 1_000


async def _enrol(mp: Any, chain: Any) -> tuple[bytes, bytes]:
    topic_id = await enrol_market(mp, chain, "paid/r", price=PRICE, buyers=("buyer",))
    return topic_id, await open_channel(mp, chain, "buyer")


def _voucher_payload(chain: Any, channel: bytes, amount: int) -> bytes:
    return voucher_payload(chain, "buyer", channel, amount)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_chain_node_down_fails_closed_keeps_public_topics_and_claims_later(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    mqtt_client: Any,
    until: Any,
    proxied_broker: StartProxiedBroker,
) -> None:
    _, channel = await _enrol(mp, chain)
    config = proxied_config(
        chain,
        tmp_path / "data",
        payments={"settlement": {"threshold": 1, "interval_seconds": 3600}},
    )
    proxied = await proxied_broker(
        config, settler_options={"backoff_base": 0.5, "backoff_max": 1.0, "tick": 0.1}
    )
    running, proxy, view = proxied.running, proxied.proxy, proxied.view
    service = running.service
    participants = Participants(chain, running.port)
    client = participants.client
    try:
        await until(lambda: view.channel(channel) is not None, 10)
        buyer, device, anon = client("buyer"), client("device"), client(None)
        for c in (buyer, device, anon):
            assert await c.connect() == 0
        assert await buyer.subscribe("paid/r") == [0]
        assert await anon.subscribe("public/x") == [0]
        await device.publish("paid/r", b"before", qos=1)
        assert [m.payload for m in await buyer.got.drain(within=1.0) if m.topic == "paid/r"] == [
            b"before"
        ]
        await proxy.stop()
        # a voucher accepted just before the node went away: stored, claim pending
        await buyer.publish(
            f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher",
            _voucher_payload(chain, channel, PRICE),
            qos=1,
        )
        assert await until(lambda: service.meter.paid_of(channel) == PRICE or not view.healthy, 5)
        assert await until(lambda: not view.healthy, 5)

        # market decisions fail closed ...
        await device.publish("paid/r", b"during", qos=1)
        assert await buyer.subscribe("paid/r") == [0x80]
        late = client("buyer")
        assert await late.connect() == 5
        # ... public topics keep working, the broker keeps running
        await anon.publish("public/x", b"still here")
        assert [m.payload for m in await anon.got.drain(within=1.0)] == [b"still here"]
        assert [m.payload for m in await buyer.got.drain(within=0.5) if m.topic == "paid/r"] == []
        if service.meter.paid_of(channel) == 0:  # the voucher raced the cut: send it again
            await buyer.publish(
                f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher",
                _voucher_payload(chain, channel, PRICE),
                qos=1,
            )
        await asyncio.sleep(1.5)
        assert service.settler is not None
        failures_while_down = service.settler.failures
        assert (await mp("oracle").channels.channel(channel)).claimed == 0

        await proxy.start()  # the node comes back
        assert await until(lambda: view.healthy, 15)
        assert await until(lambda: service.meter.paid_of(channel) == PRICE, 5)
        claimed = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            claimed = (await mp("oracle").channels.channel(channel)).claimed
            if claimed == PRICE:
                break
            await asyncio.sleep(0.2)
        assert claimed == PRICE
        print(f"\nclaim failures while the node was down: {failures_while_down}")
        fresh = client("buyer")
        assert await fresh.connect() == 0
    finally:
        participants.close()


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_broker_sigkilled_mid_stream_loses_no_voucher_and_claims_each_once(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    mqtt_client: Any,
    until: Any,
    broker_process: Any,
) -> None:
    _, channel = await _enrol(mp, chain)
    broker = broker_process(
        payments={"settlement": {"threshold": str(40 * PRICE), "interval_seconds": 1}}
    )
    port = broker.port
    signer = ConnectTokenSigner(
        bytes(chain.accounts["buyer"].key), chain.deployment.chain_id, chain.addr("operator")
    )
    voucher_topic = f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher"
    notice_topic = f"blendsm/ctl/{chain.addr('buyer').lower()}/notice"
    db = tmp_path / "data" / "vouchers.sqlite3"

    async def connected() -> Any:
        deadline = time.monotonic() + 20
        while True:
            c = mqtt_client("127.0.0.1", port, account=chain.accounts["buyer"], signer=signer)
            if await c.connect() == 0:
                assert await c.subscribe(notice_topic) == [0]
                return c
            c.close()
            assert time.monotonic() < deadline, "buyer could not connect (channel not seen yet?)"
            await asyncio.sleep(0.2)

    proc = broker.start()
    receipts: list[int] = []
    try:
        buyer = await connected()
        # stream vouchers without waiting for receipts; kill the broker mid-stream
        for i in range(1, 301):
            buyer.mqtt.publish(voucher_topic, _voucher_payload(chain, channel, i * PRICE), qos=0)
            if i == 150:  # vouchers still in flight: kill now
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                break
            if i % 10 == 0:
                await asyncio.sleep(0.005)
        for m in await buyer.got.drain(within=0.3):
            notice = decode_notice(m.payload)
            if isinstance(notice, Receipt):
                receipts.append(notice.amount)
        buyer.close()
        assert receipts, "no voucher was accepted before the kill"
        # Every voucher the broker acknowledged is on disk after the crash.
        assert stored_voucher(db, channel) >= max(receipts)
        before_restart = stored_voucher(db, channel)

        proc = broker.start()
        buyer = await connected()
        start = before_restart // PRICE + 1
        for i in range(start, 301):
            buyer.mqtt.publish(voucher_topic, _voucher_payload(chain, channel, i * PRICE), qos=0)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        assert await until(lambda: stored_voucher(db, channel) == 300 * PRICE, 20)
        # No claim is above the delivered value, which survives the restart (nothing was
        # delivered before it): deliver the 300 prepaid messages, and the latest voucher can
        # be claimed.
        assert await buyer.subscribe("paid/r") == [0]
        device = mqtt_client(
            "127.0.0.1",
            port,
            account=chain.accounts["device"],
            signer=ConnectTokenSigner(
                bytes(chain.accounts["device"].key),
                chain.deployment.chain_id,
                chain.addr("operator"),
            ),
            envelope_signer=EnvelopeSigner(
                bytes(chain.accounts["device"].key),
                MessageDomain(chain.deployment.chain_id, chain.deployment.address("Registry")),
            ),
        )
        assert await device.connect() == 0
        for i in range(300):
            await device.publish("paid/r", b"m%d" % i, qos=1)
        device.close()
        claimed = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            claimed = (await mp("oracle").channels.channel(channel)).claimed
            if claimed == 300 * PRICE:
                break
            await asyncio.sleep(0.2)
        assert claimed == 300 * PRICE
        buyer.close()
    finally:
        broker.stop(proc)
    # Exactly once: one ChannelClaimed per claim, amounts strictly increasing, none repeated,
    # and every confirmed intent in the store matches one on-chain claim.
    logs = claim_logs(chain, channel)
    amounts = [amount for amount, _ in logs]
    assert amounts == sorted(set(amounts))
    assert sum(payout for _, payout in logs) == 300 * PRICE  # fee included
    assert confirmed_claims(db, channel) == len(logs)
    print(
        f"\nreceipts before SIGKILL: {len(receipts)} (max {max(receipts)}), on-chain claims: {len(logs)}"
    )
