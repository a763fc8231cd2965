"""Payment-channel lanes end to end (issue 14): one operator, two brokers, one channel.

Two broker processes' worth of BlendSM (two brokers, each with its own data directory and its
own ``broker_key``, both registered in Brokers to the one operator) on one anvil chain. A buyer
with ONE channel is served by A, then by B: each broker meters, stores and claims only its
own lane; a voucher for A's lane sent to B is refused ``wrong_lane``; after both settle, the
chain paid exactly delivered x price in total and each lane what its broker delivered.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support import eventually

from blendsm.broker import ChainConnection, OperatorKeyConfig, start_broker
from blendsm.contracts import test_account
from blendsm.device_sdk import Quote, Receipt, Refusal, VoucherDomain, sign_voucher

from .conftest import Market, Payer, broker_config, enrol_market, split_messages

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

TOPIC = "paid/lanes"
# TEST ONLY: the brokers' own keys (never funded; the operator sends the claims).
KEY_A = test_account("lanes-broker-a")
KEY_B = test_account("lanes-broker-b")


async def _broker(
    chain: Any, w3: Any, mp: Any, folder: Path, env: str, topic_id: bytes, monkeypatch: Any
) -> Market:
    key = KEY_A if env.endswith("A") else KEY_B
    monkeypatch.setenv(env, "0x" + bytes(key.key).hex())
    config = replace(broker_config(folder), broker_key=OperatorKeyConfig(env=env))
    running = await start_broker(
        config,
        chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
    )
    return Market(chain, mp, running, TOPIC, topic_id)


async def test_two_brokers_each_meter_and_claim_their_own_lane(
    chain: Any, w3: Any, mp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic_id = await enrol_market(mp, chain, TOPIC, buyers=("buyer",))
    for key, name in ((KEY_A, "a"), (KEY_B, "b")):
        await mp("operator").brokers.register_broker(key.address, f"mqtt://{name}.example:1883")
    a = await _broker(chain, w3, mp, tmp_path / "a", "LANES_BROKER_KEY_A", topic_id, monkeypatch)
    b = await _broker(chain, w3, mp, tmp_path / "b", "LANES_BROKER_KEY_B", topic_id, monkeypatch)
    try:
        assert (a.service.lane, b.service.lane) == (KEY_A.address, KEY_B.address)
        price = a.price
        channel = await a.open_channel("buyer")
        await a.wait_channel(channel)
        await b.wait_channel(channel)
        seller_before = chain.w3.eth.get_balance(chain.addr("seller"))

        # At A: 3 deliveries, quoted on lane A, paid on lane A.
        buyer_a, _ = await _buyer(a)
        device_a = await a.connected_device()
        for i in range(3):
            await device_a.publish(TOPIC, b"a%d" % i)
        data, notices = split_messages(await buyer_a.got.drain(within=1.0, until=4), TOPIC)
        assert data == [b"a0", b"a1", b"a2"]
        (quote,) = [n for n in notices if isinstance(n, Quote)]
        assert (quote.channel_id, quote.lane) == (channel, KEY_A.address)
        await Payer(a, "buyer", buyer_a).pay(channel, 3 * price, lane=KEY_A.address)
        _, notices = split_messages(await buyer_a.got.drain(within=1.0, until=1), TOPIC)
        assert notices == [Receipt(channel, 3 * price, KEY_A.address)]
        buyer_a.close()

        # At B: lane A's voucher is refused, B's own lane starts at 0.
        buyer_b, _ = await _buyer(b)
        payer_b = Payer(b, "buyer", buyer_b)
        await payer_b.pay(channel, 4 * price, lane=KEY_A.address)
        _, notices = split_messages(await buyer_b.got.drain(within=1.0, until=1), TOPIC)
        assert [(n.code, n.channel_id) for n in notices if isinstance(n, Refusal)] == [
            ("wrong_lane", channel)
        ]
        device_b = await b.connected_device()
        for i in range(2):
            await device_b.publish(TOPIC, b"b%d" % i)
        data, notices = split_messages(await buyer_b.got.drain(within=1.0, until=3), TOPIC)
        assert data == [b"b0", b"b1"]
        (quote,) = [n for n in notices if isinstance(n, Quote)]
        assert (quote.lane, quote.paid, quote.charged) == (KEY_B.address, 0, 0)
        await payer_b.pay(channel, 2 * price, lane=KEY_B.address)
        _, notices = split_messages(await buyer_b.got.drain(within=1.0, until=1), TOPIC)
        assert notices == [Receipt(channel, 2 * price, KEY_B.address)]

        # Each settles its own lane; the chain pays exactly what was delivered, per lane.
        for market in (a, b):
            results = await market.service.settler.settle_now()
            assert [r.status for r in results] == ["confirmed"]
        pc = chain.PaymentChannels.functions
        assert pc.laneClaimed(channel, KEY_A.address).call() == 3 * price
        assert pc.laneClaimed(channel, KEY_B.address).call() == 2 * price
        assert pc.laneClaimed(channel, chain.addr("operator")).call() == 0
        assert pc.channel(channel).call()[8] == 5 * price  # totalClaimed
        assert chain.w3.eth.get_balance(chain.addr("seller")) - seller_before == 5 * price
        logs = chain.PaymentChannels.events.ChannelClaimed().get_logs(
            from_block=chain.deployment.block, argument_filters={"channelId": channel}
        )
        assert sorted((e["args"]["lane"], e["args"]["payout"]) for e in logs) == sorted(
            [(KEY_A.address, 3 * price), (KEY_B.address, 2 * price)]
        )
        # The broker's books agree with the chain, lane by lane.
        await eventually(
            lambda: a.service.view.lane_claimed(channel, KEY_A.address) == 3 * price,
            10,
            what="A's chain view seeing its lane's claim",
        )
        assert a.service.meter.accounts[channel].charged == 3 * price
        assert b.service.meter.accounts[channel].charged == 2 * price
    finally:
        for market in (a, b):
            market.close_clients()
            await market.running.stop()


async def test_a_lane_is_counted_only_up_to_what_the_deposit_still_holds(
    chain: Any, w3: Any, mp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payer that overcommits: lane A claimed 5 of a 6-message deposit, so broker B counts
    at most 1 message's worth on its lane (as its chain view sees it): a voucher for 3 is
    refused ``over_deposit`` and B delivers 1 message, never more than it can be paid."""
    topic_id = await enrol_market(mp, chain, TOPIC, buyers=("buyer",))
    for key, name in ((KEY_A, "a"), (KEY_B, "b")):
        await mp("operator").brokers.register_broker(key.address, f"mqtt://{name}.example:1883")
    b = await _broker(chain, w3, mp, tmp_path / "b", "LANES_BROKER_KEY_B", topic_id, monkeypatch)
    try:
        price = b.price
        channel = await b.open_channel("buyer", deposit=6 * price)
        # Lane A's 5 messages, claimed (by anyone: here the operator, as A would).
        domain = VoucherDomain(
            chain.deployment.chain_id, chain.deployment.address("PaymentChannels")
        )
        voucher = sign_voucher(
            bytes(chain.accounts["buyer"].key), domain, channel, KEY_A.address, 5 * price
        )
        claim = await mp("operator").channels.claim(
            channel, KEY_A.address, 5 * price, voucher.signature
        )
        assert (claim.lane_claimed, claim.claimed) == (5 * price, 5 * price)
        await b.wait_view(lambda: (c := b.service.view.channel(channel)) is not None and c.claimed)
        buyer, _ = await _buyer(b)
        await Payer(b, "buyer", buyer).pay(channel, 3 * price, lane=KEY_B.address)
        _, notices = split_messages(await buyer.got.drain(within=1.0, until=1), TOPIC)
        assert [n.code for n in notices if isinstance(n, Refusal)] == ["over_deposit"]
        device = await b.connected_device()
        for i in range(3):
            await device.publish(TOPIC, b"b%d" % i)
        data, _ = split_messages(await buyer.got.drain(within=1.0), TOPIC)
        assert data == [b"b0"]  # the lane can be paid 1 message's worth: the rest waits
        assert b.service.meter.accounts[channel].charged == price
    finally:
        b.close_clients()
        await b.running.stop()


async def _buyer(market: Market) -> tuple[Any, bytes]:
    """The buyer connected to ``market``'s broker, subscribed to the topic and its notices."""
    client = market.client("buyer")
    assert await client.connect() == 0
    notice = f"blendsm/ctl/{market.chain.addr('buyer').lower()}/notice"
    assert await client.subscribe(notice) == [0]
    assert await client.subscribe(TOPIC) == [0]
    return client, b""


async def test_a_broker_key_of_nobody_refuses_to_start(
    chain: Any, w3: Any, mp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: a broker whose key is not one of its operator's brokers would count
    vouchers the contract never pays, so it does not start, and says why."""
    topic_id = await enrol_market(mp, chain, TOPIC, buyers=("buyer",))
    with pytest.raises(Exception, match="is not a broker of operator"):
        await _broker(chain, w3, mp, tmp_path / "x", "LANES_BROKER_KEY_A", topic_id, monkeypatch)
