"""The Prometheus endpoint of a real broker: enabled by ``metrics.port``, scraped over HTTP,
its values moving with real connects, paid deliveries, a voucher and a denied delivery, and
closed with the broker."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blendsm.broker._config import MetricsConfig, parse_config
from blendsm.broker._runner import ChainConnection, start_broker
from blendsm.contracts import Marketplace
from blendsm.contracts._bindings import Policy, Role
from blendsm.device_sdk import VoucherDomain, encode_voucher, sign_voucher
from blendsm.errors import ConfigError

from .conftest import PRICE, Market, broker_config, enrol

EXPECTED = {
    "blendsm_connects_accepted_total",
    "blendsm_paid_deliveries_total",
    "blendsm_deliveries_denied_total",
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
    "blendsm_envelopes_refused_total",
    "blendsm_revocation_disconnects_total",
    "blendsm_connected_sessions",
    "blendsm_chain_view_healthy",
    "blendsm_operator_low_gas",
    "blendsm_meter_channel_choice_cache_entries",
}


@pytest.fixture
async def metered(
    chain: Any, w3: Any, mp: Callable[[str], Marketplace], tmp_path: Path
) -> AsyncIterator[Market]:
    """The ``market`` fixture's marketplace, behind a broker with metrics on a free port."""
    await enrol(mp, "seller", Role.SELLER)
    await enrol(mp, "buyer", Role.BUYER)
    await enrol(mp, "operator", Role.OPERATOR)
    await mp("seller").registry.add_device(chain.addr("device"))
    created = await mp("seller").market.create_topic("paid/metrics", PRICE, None, Policy.OPEN)
    config = broker_config(tmp_path / "data", metrics=MetricsConfig(port=0))
    running = await start_broker(
        config,
        chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
    )
    m = Market(chain, mp, running, "paid/metrics", created.topic_id)
    try:
        yield m
    finally:
        for c in m.clients:
            with contextlib.suppress(Exception):
                c.close()
        await running.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


async def _scrape(market: Market) -> dict[str, float]:
    metrics = market.running.metrics
    assert metrics is not None
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics.port}/metrics")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


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
    for i in range(7):  # credit_messages = 5: five delivered, then denied
        await device.publish(market.topic, b"m%d" % i)
    await buyer.got.drain(within=1.0)
    domain = VoucherDomain(
        market.chain.deployment.chain_id, market.chain.deployment.address("PaymentChannels")
    )
    voucher = sign_voucher(bytes(market.chain.accounts["buyer"].key), domain, channel, 5 * PRICE)
    voucher_topic = f"blendsm/ctl/{market.chain.addr('buyer').lower()}/voucher"
    await buyer.publish(voucher_topic, encode_voucher(voucher), qos=1)
    await buyer.publish(voucher_topic, b"not a voucher", qos=1)
    assert await until(lambda: market.service.stats.vouchers_refused >= 1)

    after = await _scrape(market)
    assert after["blendsm_connected_sessions"] == 2
    assert after["blendsm_connects_accepted_total"] >= 2
    assert after["blendsm_paid_deliveries_total"] == 5
    assert after["blendsm_deliveries_denied_total"] >= 1
    assert after["blendsm_deliveries_denied_no_credit_total"] >= 1
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
