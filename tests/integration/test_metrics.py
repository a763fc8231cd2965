"""The Prometheus endpoint of a real broker: enabled by ``metrics.port``, scraped over HTTP,
its values moving with real connects, paid, free and public deliveries, a voucher, a denied
delivery, chain-view lookups and a chain node that goes away, and closed with the broker."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blendsm.broker import MetricsConfig, parse_config
from blendsm.contracts import Marketplace, Policy
from blendsm.device_sdk import VoucherDomain, encode_voucher, sign_voucher
from blendsm.errors import ConfigError

from .conftest import (
    PRICE,
    Market,
    StartMarket,
    StartProxiedBroker,
    broker_config,
    enrol_market,
)

EXPECTED = {
    "blendsm_connects_accepted_total",
    "blendsm_paid_deliveries_total",
    "blendsm_deliveries_denied_total",
    "blendsm_deliveries_held_for_credit_total",
    "blendsm_deliveries_held_dropped_total",
    "blendsm_vouchers_accepted_total",
    "blendsm_vouchers_refused_total",
    "blendsm_payment_requests_total",
    "blendsm_claims_confirmed_total",
    "blendsm_claim_gas_total",
    "blendsm_claim_failures_total",
    "blendsm_anchor_batches_total",
    "blendsm_anchor_gas_total",
    "blendsm_anchor_leaves_total",
    "blendsm_anchor_failures_total",
    "blendsm_anchors_deferred_total",
    "blendsm_anchor_leaves_refused_total",
    "blendsm_envelopes_refused_total",
    "blendsm_duplicates_dropped_total",
    "blendsm_keepalive_timeouts_total",
    "blendsm_connect_timeouts_total",
    "blendsm_connections_refused_at_limit_total",
    "blendsm_connects_rate_limited_total",
    "blendsm_publishes_unacknowledged_unhealthy_total",
    "blendsm_packets_too_large_total",
    "blendsm_incoming_inflight_refused_total",
    "blendsm_protocol_violations_total",
    "blendsm_connections_aborted_total",
    "blendsm_subscriptions_refused_at_limit_total",
    "blendsm_control_dropped_total",
    "blendsm_revocation_disconnects_total",
    "blendsm_connected_sessions",
    "blendsm_chain_view_healthy",
    "blendsm_operator_low_gas",
    "blendsm_meter_channel_choice_cache_entries",
    "blendsm_public_deliveries_total",
    "blendsm_free_market_deliveries_total",
    "blendsm_chain_view_hits_total",
}
CHAIN_ERRORS = "blendsm_chain_errors_total"
MISSES = "blendsm_chain_view_misses_total"


@pytest.fixture
async def metered(start_market: StartMarket) -> Market:
    """The ``market`` fixture's marketplace, behind a broker with metrics on a free port."""
    return await start_market("paid/metrics", buyers=("buyer",), metrics=MetricsConfig(port=0))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


async def _scrape(market: Market) -> dict[str, float]:
    """Unlabelled samples by name; labelled ones as ``name{label=value}``."""
    metrics = market.running.metrics
    assert metrics is not None
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics.port}/metrics")
    return {
        sample.name
        + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _data(messages: list[Any]) -> list[bytes]:
    """Payloads of data messages (not the broker's control notices)."""
    return [m.payload for m in messages if not m.topic.startswith("blendsm/")]


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def test_metrics_endpoint_follows_the_broker(
    metered: Market, until: Callable[..., Any]
) -> None:
    market = metered
    before = await _scrape(market)
    assert before.keys() >= EXPECTED
    assert before["blendsm_connected_sessions"] == 0
    assert before["blendsm_chain_view_healthy"] == 1
    assert before["blendsm_paid_deliveries_total"] == 0

    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    buyer = market.client("buyer")
    assert await buyer.connect() == 0
    assert await buyer.subscribe(market.topic) == [0]
    assert await buyer.subscribe(f"blendsm/ctl/{market.chain.addr('buyer').lower()}/notice") == [0]
    device = market.client("device")
    assert await device.connect() == 0
    for i in range(7):  # credit_messages = 5: five delivered, then two held for credit
        await device.publish(market.topic, b"m%d" % i)
    await buyer.got.drain(within=1.0)
    domain = VoucherDomain(
        market.chain.deployment.chain_id, market.chain.deployment.address("PaymentChannels")
    )
    voucher = sign_voucher(
        bytes(market.chain.accounts["buyer"].key),
        domain,
        channel,
        market.chain.addr("operator"),
        5 * PRICE,
    )
    voucher_topic = f"blendsm/ctl/{market.chain.addr('buyer').lower()}/voucher"
    await buyer.publish(voucher_topic, encode_voucher(voucher), qos=1)
    await buyer.publish(voucher_topic, b"not a voucher", qos=1)
    # The refusal needs no fsync and may come first: wait for both answers.
    stats = market.service.stats
    assert await until(lambda: stats.vouchers_refused >= 1 and stats.vouchers_accepted >= 1)

    after = await _scrape(market)
    assert after["blendsm_connected_sessions"] == 2
    assert after["blendsm_connects_accepted_total"] >= 2
    # The voucher sent the two held ones.
    assert await until(lambda: market.service.meter.delivered == 7)
    after = await _scrape(market)
    assert after["blendsm_paid_deliveries_total"] == 7
    assert after["blendsm_deliveries_held_for_credit_total"] == 2
    assert after["blendsm_deliveries_held_dropped_total"] == 0
    assert after["blendsm_deliveries_denied_no_credit_total"] == 0
    assert after["blendsm_payment_requests_total"] >= 1
    assert after["blendsm_vouchers_accepted_total"] == 1
    assert after["blendsm_vouchers_refused_total"] == 1
    assert after["blendsm_anchor_leaves_total"] >= 7
    assert after["blendsm_meter_channel_choice_cache_entries"] >= 1
    assert after["blendsm_metered_channels"] == 1

    buyer.close()
    await buyer.wait_disconnected()
    for _ in range(100):
        if (await _scrape(market))["blendsm_connected_sessions"] == 1:
            break
        await asyncio.sleep(0.05)
    assert (await _scrape(market))["blendsm_connected_sessions"] == 1

    metrics = market.running.metrics
    assert metrics is not None
    url = f"http://127.0.0.1:{metrics.port}/nope"
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(_get, url)
    assert info.value.code == 404
    info.value.close()


async def test_metrics_are_off_by_default_and_closed_with_the_broker(
    metered: Market, tmp_path: Path
) -> None:
    assert broker_config(tmp_path).metrics == MetricsConfig("127.0.0.1", None)
    metrics = metered.running.metrics
    assert metrics is not None
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    await asyncio.to_thread(_get, url)
    await metrics.stop()  # what RunningBroker.stop does first
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, url)


def test_metrics_config_is_validated() -> None:
    assert parse_config({"metrics": {"port": 9464}}).metrics == MetricsConfig("127.0.0.1", 9464)
    assert parse_config({"metrics": {"port": None}}).metrics.port is None
    assert parse_config({"metrics": None}).metrics == MetricsConfig()
    for data, message in (
        ({"port": 70000}, "metrics.port: must be <= 65535"),
        ({"port": "9464"}, "metrics.port: must be int"),
        ({"port": True}, "metrics.port: must be int"),
        ({"host": ""}, "metrics.host: must not be empty"),
        ({"prot": 1}, "metrics.prot: unknown key; did you mean 'port'?"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"metrics": data})


async def test_chain_view_hits_and_free_deliveries_are_counted_apart_from_paid(
    metered: Market, until: Callable[..., Any]
) -> None:
    market = metered
    start = await _scrape(market)
    for source in ("chain_view", "settlement", "gas_balance", "anchors"):
        assert start[f"{CHAIN_ERRORS}{{source={source}}}"] == 0
    assert start[f"{MISSES}{{reason=unhealthy}}"] == 0
    free = await market.mp("seller").market.create_topic("free/metrics", 0, None, Policy.OPEN)
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    await market.wait_view(lambda: market.service.view.topic(free.topic_id) is not None)
    buyer, device, anon = market.client("buyer"), market.client("device"), market.client(None)
    for c in (buyer, device, anon):
        assert await c.connect() == 0
    assert await buyer.subscribe(market.topic) == [0]
    assert await buyer.subscribe("free/metrics") == [0]
    assert await anon.subscribe("public/metrics") == [0]

    # one paid delivery: decided from the view's records (hits), charged, nothing missed
    before = await _scrape(market)
    await device.publish(market.topic, b"paid", qos=1)
    assert _data(await buyer.got.drain(within=0.5)) == [b"paid"]
    moved = _moved(before, await _scrape(market))
    assert moved["blendsm_paid_deliveries_total"] == 1
    assert moved["blendsm_chain_view_hits_total"] >= 2  # RECEIVE and the gate, at least
    assert not any(k.startswith(MISSES) for k in moved)
    assert "blendsm_public_deliveries_total" not in moved
    assert "blendsm_free_market_deliveries_total" not in moved

    # a market topic priced 0: entitled and counted as free, not paid
    before = await _scrape(market)
    await device.publish("free/metrics", b"gratis", qos=1)
    assert _data(await buyer.got.drain(within=0.5)) == [b"gratis"]
    moved = _moved(before, await _scrape(market))
    assert moved["blendsm_free_market_deliveries_total"] == 1
    assert moved["blendsm_chain_view_hits_total"] >= 2
    assert "blendsm_paid_deliveries_total" not in moved

    # a public topic: no chain-view lookup at all, counted as public
    before = await _scrape(market)
    await anon.publish("public/metrics", b"hello", qos=1)
    await anon.publish("public/metrics", b"again", qos=1)
    assert [m.payload for m in await anon.got.drain(within=0.5)] == [b"hello", b"again"]
    moved = _moved(before, await _scrape(market))
    assert moved == {"blendsm_public_deliveries_total": 2}

    # a CONNECT from an address the Registry has never seen: an unknown-record miss
    before = await _scrape(market)
    assert await market.client("stranger").connect() == 5
    moved = _moved(before, await _scrape(market))
    assert moved[f"{MISSES}{{reason=unknown}}"] == 1
    assert moved["blendsm_connects_refused_total"] == 1
    assert "blendsm_chain_view_hits_total" not in moved


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_chain_node_going_away_counts_chain_errors_and_unhealthy_misses(
    chain: Any,
    mp: Callable[[str], Marketplace],
    tmp_path: Path,
    proxied_broker: StartProxiedBroker,
    until: Callable[..., Any],
) -> None:
    topic_id = await enrol_market(mp, chain, "paid/cut", buyers=("buyer",))
    channel = (
        await mp("buyer").channels.open(chain.addr("seller"), chain.addr("operator"), None, 10**15)
    ).channel_id
    base = broker_config(tmp_path / "data", metrics=MetricsConfig(port=0))
    config = replace(
        base,
        anchoring=replace(base.anchoring, batch_seconds=1.0),
        payments=replace(
            base.payments, settlement=replace(base.payments.settlement, threshold=PRICE)
        ),
    )
    proxied = await proxied_broker(config, settler_options={"tick": 0.1, "gas_check_seconds": 0.2})
    proxy, view = proxied.proxy, proxied.view
    market = Market(chain, mp, proxied.running, "paid/cut", topic_id)
    try:
        await market.wait_channel(channel)
        buyer, device, anon = market.client("buyer"), market.client("device"), market.client(None)
        for c in (buyer, device, anon):
            assert await c.connect() == 0
        assert await buyer.subscribe("paid/cut") == [0]
        assert await anon.subscribe("public/cut") == [0]
        # a real claim and a real anchor while the node is up: no chain error counted
        await device.publish("paid/cut", b"first", qos=1)
        assert _data(await buyer.got.drain(within=0.5)) == [b"first"]
        await buyer.publish(
            f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher",
            encode_voucher(
                sign_voucher(
                    bytes(chain.accounts["buyer"].key),
                    VoucherDomain(
                        chain.deployment.chain_id, chain.deployment.address("PaymentChannels")
                    ),
                    channel,
                    chain.addr("operator"),
                    PRICE,
                )
            ),
            qos=1,
        )
        service = market.service
        assert await until(
            lambda: (
                service.settler.claims_confirmed >= 1 and service.anchorer.batches_anchored >= 1
            ),
            15,
        )
        healthy = await _scrape(market)
        assert healthy["blendsm_chain_view_healthy"] == 1
        assert healthy["blendsm_claims_confirmed_total"] == 1
        assert healthy["blendsm_anchor_batches_total"] >= 1
        for source in ("chain_view", "settlement", "gas_balance", "anchors"):
            assert healthy[f"{CHAIN_ERRORS}{{source={source}}}"] == 0, source

        await device.publish("paid/cut", b"last", qos=1)  # a leaf to anchor in 1 s
        await proxy.stop()  # the node goes away
        assert await until(lambda: not view.healthy, 10)
        await device.publish("paid/cut", b"during", qos=1)  # not acknowledged: undecidable
        assert await buyer.subscribe("paid/cut") == [0x80]
        await anon.publish("public/cut", b"still here", qos=1)
        assert b"still here" in [m.payload for m in await anon.got.drain(within=0.5)]
        deadline = time.monotonic() + 10
        down = await _scrape(market)
        while time.monotonic() < deadline and not (
            down[f"{CHAIN_ERRORS}{{source=anchors}}"]
            and down[f"{CHAIN_ERRORS}{{source=gas_balance}}"]
        ):
            await asyncio.sleep(0.2)
            down = await _scrape(market)
        moved = _moved(healthy, down)
        print(f"\nmoved while the node was down: {moved}")
        assert down["blendsm_chain_view_healthy"] == 0
        assert moved[f"{CHAIN_ERRORS}{{source=chain_view}}"] >= 1
        assert moved[f"{CHAIN_ERRORS}{{source=gas_balance}}"] >= 1
        assert moved[f"{CHAIN_ERRORS}{{source=anchors}}"] >= 1
        assert moved[f"{MISSES}{{reason=unhealthy}}"] >= 1  # the SUBSCRIBE
        assert moved["blendsm_publishes_unacknowledged_unhealthy_total"] == 1  # the PUBLISH
        assert moved["blendsm_public_deliveries_total"] >= 1
        assert moved["blendsm_paid_deliveries_total"] == 1  # "last", before the cut
        got = [m.payload for m in await buyer.got.drain(within=0.3) if m.topic == "paid/cut"]
        assert got == [b"last"]  # and never "during"

        await proxy.start()  # back: healthy again, no new errors once caught up
        assert await until(lambda: view.healthy, 15)
        back = await _scrape(market)
        assert back["blendsm_chain_view_healthy"] == 1
        assert await buyer.subscribe("paid/cut") == [0]
    finally:
        market.close_clients()
