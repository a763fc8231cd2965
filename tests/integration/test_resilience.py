"""Money survives failures: the chain node going away (a TCP proxy to anvil is cut and
restored) and the broker process being SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from blendsm.device_sdk import (
    ConnectTokenSigner,
    EnvelopeSigner,
    MessageDomain,
    Receipt,
    VoucherDomain,
    decode_notice,
    encode_voucher,
    sign_voucher,
)

from .conftest import StartProxiedBroker, enrol_market, open_channel

PRICE = 1_000


async def _enrol(mp: Any, chain: Any) -> tuple[bytes, bytes]:
    topic_id = await enrol_market(mp, chain, "paid/r", price=PRICE, buyers=("buyer",))
    return topic_id, await open_channel(mp, chain, "buyer")


def _voucher_payload(chain: Any, channel: bytes, amount: int) -> bytes:
    domain = VoucherDomain(chain.deployment.chain_id, chain.deployment.address("PaymentChannels"))
    return encode_voucher(sign_voucher(bytes(chain.accounts["buyer"].key), domain, channel, amount))


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_chain_node_down_fails_closed_keeps_public_topics_and_claims_later(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    mqtt_client: Any,
    until: Any,
    proxied_broker: StartProxiedBroker,
) -> None:
    from blendsm.broker import parse_config

    _, channel = await _enrol(mp, chain)
    assert chain.anvil is not None
    config = parse_config(
        {
            "listen": {"port": 0},
            "chain": {
                "endpoint": chain.anvil.url,
                "deployment": "unused.json",
                "confirmations": 0,
                "poll_interval": 0.05,
            },
            "operator_key": {"env": "UNUSED"},
            "payments": {"settlement": {"threshold": 1, "interval_seconds": 3600}},
            "data_dir": str(tmp_path / "data"),
            "public_topics": True,
        }
    )
    proxied = await proxied_broker(
        config, settler_options={"backoff_base": 0.5, "backoff_max": 1.0, "tick": 0.1}
    )
    running, proxy, view = proxied.running, proxied.proxy, proxied.view
    service = running.service
    clients: list[Any] = []

    def client(label: str | None) -> Any:
        signer = None
        account = None
        envelopes = None
        if label is not None:
            account = chain.accounts[label]
            signer = ConnectTokenSigner(
                bytes(account.key), chain.deployment.chain_id, chain.addr("operator")
            )
            envelopes = EnvelopeSigner(
                bytes(account.key),
                MessageDomain(chain.deployment.chain_id, chain.deployment.address("Registry")),
            )
        made = mqtt_client(
            running.host, running.port, account=account, signer=signer, envelope_signer=envelopes
        )
        clients.append(made)
        return made

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
        for c in clients:
            c.close()


def _stored(db: Path, channel: bytes) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        row = con.execute("SELECT amount FROM channels WHERE channel_id = ?", (channel,)).fetchone()
    return 0 if row is None else int.from_bytes(row[0], "big")


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
        assert _stored(db, channel) >= max(receipts)
        before_restart = _stored(db, channel)

        proc = broker.start()
        buyer = await connected()
        start = before_restart // PRICE + 1
        for i in range(start, 301):
            buyer.mqtt.publish(voucher_topic, _voucher_payload(chain, channel, i * PRICE), qos=0)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        assert await until(lambda: _stored(db, channel) == 300 * PRICE, 20)
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
    logs = chain.PaymentChannels.events.ChannelClaimed().get_logs(
        from_block=chain.deployment.block, argument_filters={"channelId": channel}
    )
    amounts = [int(e["args"]["cumulativeAmount"]) for e in logs]
    assert amounts == sorted(set(amounts))
    assert sum(int(e["args"]["payout"]) for e in logs) == 300 * PRICE  # fee included
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        confirmed = con.execute(
            "SELECT count(*) FROM claims WHERE channel_id = ? AND state = 'confirmed'", (channel,)
        ).fetchone()[0]
    assert confirmed == len(logs)
    print(
        f"\nreceipts before SIGKILL: {len(receipts)} (max {max(receipts)}), on-chain claims: {len(logs)}"
    )
