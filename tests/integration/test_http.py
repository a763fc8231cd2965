"""The broker's HTTP API over real TCP: a real broker with ``http.port: 0`` in front of the test
chain, real paid MQTT traffic (device publishing, buyer subscribing and paying), and every
endpoint's values checked against the contracts and the service independently; then the error
answers (404, 400, 405, 500), the dashboard's static files (no path traversal) and the config."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from support import Client
from yarl import URL

from blendsm.broker import (
    BrokerConfig,
    ChainConnection,
    HttpConfig,
    load_config,
    parse_config,
    start_broker,
)
from blendsm.contracts import Policy
from blendsm.device_sdk import (
    MessageDomain,
    VoucherDomain,
    decode_envelope,
    encode_voucher,
    sign_voucher,
    verify_envelope_leaf,
    verify_proof,
)
from blendsm.errors import ConfigError

from .conftest import PRICE, Market, StartMarket, broker_config

BIG_DEPOSIT = 20 * 10**18
"""Above 2**64 wei: the JSON must still carry it as an exact number."""


@dataclass
class Api:
    """A running marketplace broker with its HTTP API, and a client session for it."""

    market: Market
    session: aiohttp.ClientSession
    base: str

    async def raw(self, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
        """Status, headers and body; ``path`` is sent as written (no client normalisation)."""
        url = URL(self.base + path, encoded=True)
        async with self.session.request(method, url) as response:
            return response.status, response.headers, await response.read()

    async def get(self, path: str, status: int = 200) -> Any:
        code, headers, body = await self.raw(path)
        assert code == status, (path, code, body[:300])
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Cache-Control"] == "no-store"
        return json.loads(body)  # exact integers (orjson would turn uint256 ones into floats)


@pytest.fixture
async def api(start_market: StartMarket) -> AsyncIterator[Api]:
    """The ``market`` fixture's marketplace, behind a broker with the HTTP API on a free port."""
    market = await start_market(http=HttpConfig(port=0))
    running = market.running
    assert running.http is not None
    assert running.http.port > 0
    async with aiohttp.ClientSession() as session:
        yield Api(market, session, f"http://127.0.0.1:{running.http.port}")


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


async def _raw_message(client: Client, topic: str, within: float = 5.0) -> bytes:
    """The next message on ``topic`` as it came off the wire (the signed envelope)."""
    while True:
        message = await asyncio.to_thread(client.got.messages.get, True, within)
        if message.topic == topic:
            return bytes(message.payload)


async def _pay(market: Market, buyer: Client, channel: bytes, amount: int) -> None:
    domain = VoucherDomain(
        market.chain.deployment.chain_id, market.chain.deployment.address("PaymentChannels")
    )
    voucher = sign_voucher(
        bytes(market.chain.accounts["buyer"].key),
        domain,
        channel,
        market.chain.addr("operator"),
        amount,
    )
    topic = f"blendsm/ctl/{market.chain.addr('buyer').lower()}/voucher"
    accepted = market.service.stats.vouchers_accepted
    await buyer.publish(topic, encode_voucher(voucher), qos=1)
    for _ in range(500):
        if market.service.stats.vouchers_accepted > accepted:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("voucher not accepted")


# --------------------------------------------------------------------------- live values


async def test_status_topics_and_channels_follow_paid_traffic_and_the_chain(
    api: Api, until: Callable[..., Any]
) -> None:
    market, chain = api.market, api.market.chain
    seller = market.mp("seller")
    status = await api.get("/api/status")
    assert status["operator"] == chain.addr("operator")
    assert (
        status["chain_id"] == chain.deployment.chain_id == int(await market.service.w3.eth.chain_id)
    )
    assert status["contracts"] == chain.deployment.addresses
    assert status["chain_healthy"] is True
    assert status["sessions"] == 0
    assert (
        chain.deployment.block <= status["block"] <= int(await market.service.w3.eth.block_number)
    )
    assert status["uptime_s"] >= 0
    assert status["counters"] == dict.fromkeys(
        (
            "deliveries_paid",
            "deliveries_denied",
            "vouchers_accepted",
            "vouchers_refused",
            "anchors_confirmed",
            "amount_charged",
            "amount_vouchered",
            "amount_claimed",
        ),
        0,
    )

    # --- topics: a second, rating-gated one sorts first; a price change shows up
    gated = await seller.market.create_topic("a/gated", 7, None, Policy.MIN_RATING, 450)
    await seller.market.set_price(market.topic_id, 2 * PRICE)
    await market.wait_view(
        lambda: (
            (t := market.service.view.topic(market.topic_id)) is not None
            and t.price == 2 * PRICE
            and market.service.view.topic(gated.topic_id) is not None
        )
    )
    topics = (await api.get("/api/topics"))["topics"]
    assert [t["name"] for t in topics] == ["a/gated", "paid/temp"]
    for row, topic_id in zip(topics, (gated.topic_id, market.topic_id), strict=True):
        on_chain = await seller.market.topic(topic_id)
        assert on_chain is not None
        assert row == {
            "name": on_chain.name,
            "topic_id": _hex(topic_id),
            "seller": chain.addr("seller"),
            "price": on_chain.price,
            "token": None,
            "policy": on_chain.policy.name.lower(),
            "min_rating": on_chain.min_rating_x100 / 100,
            "paused": on_chain.paused,
            "encrypted": await seller.market.is_encrypted(topic_id),
            "rating": {"count": 0, "average": 0},
            # no operator list set: any active operator may serve (Brokers.servingOperators)
            "serving": {"any_operator": True, "operators": []},
        }
    assert topics[0]["policy"] == "min_rating"
    assert topics[0]["min_rating"] == 4.5
    assert topics[1]["price"] == 2 * PRICE
    await seller.market.set_price(market.topic_id, PRICE)
    await market.wait_view(
        lambda: (t := market.service.view.topic(market.topic_id)) is not None and t.price == PRICE
    )

    # --- paid traffic: 5 delivered on credit, the 6th and 7th held, one voucher for 5 sends them
    channel = (
        await market.mp("buyer").channels.open(
            chain.addr("seller"), chain.addr("operator"), None, BIG_DEPOSIT, 100
        )
    ).channel_id
    await market.wait_channel(channel)
    buyer = market.client("buyer")
    device = market.client("device")
    assert await buyer.connect() == 0
    assert await device.connect() == 0
    assert await buyer.subscribe(market.topic) == [0]
    for i in range(7):
        await device.publish(market.topic, b"m%d" % i)
    got = [m for m in await buyer.got.drain(within=1.0) if m.topic == market.topic]
    assert len(got) == 5
    await _pay(market, buyer, channel, 5 * PRICE)
    status = await api.get("/api/status")
    assert status["sessions"] == 2
    counters = status["counters"]
    assert counters["deliveries_paid"] == market.service.meter.delivered == 7
    assert counters["deliveries_denied"] == market.service.stats.deliveries_denied == 0
    assert counters["vouchers_accepted"] == 1
    assert counters["vouchers_refused"] == 0
    assert counters["amount_vouchered"] == 5 * PRICE
    assert counters["amount_claimed"] == 0

    rows = (await api.get("/api/channels"))["channels"]
    assert len(rows) == 1
    row = rows[0]
    assert row == await api.get(f"/api/channels/{_hex(channel)}")
    info = await market.mp("buyer").channels.channel(channel)
    assert info is not None
    assert row["channel_id"] == _hex(channel)
    assert (
        (row["payer"], row["payee"])
        == (info.payer, info.payee)
        == (
            chain.addr("buyer"),
            chain.addr("seller"),
        )
    )
    assert row["deposit"] == info.deposit == BIG_DEPOSIT > 2**64
    assert row["token"] is None
    assert row["fee_bps"] == info.fee_bps == 100
    assert row["claimed"] == info.claimed == 0
    assert row["vouchered"] == 5 * PRICE
    # everything charged so far (the credit after the voucher may already carry more)
    account = market.service.meter.accounts[channel]
    assert row["charged"] == account.charged >= 5 * PRICE
    assert counters["amount_charged"] >= 5 * PRICE
    assert row["remaining"] == BIG_DEPOSIT
    assert (row["closing"], row["closes_at"], row["settled"]) == (False, None, False)

    # --- settle: the claim lands on chain and in the channel and counters
    settler = market.service.settler
    assert settler is not None
    results = await settler.settle_now([channel])
    assert [r.status for r in results] == ["confirmed"]
    info = await market.mp("buyer").channels.channel(channel)
    assert info is not None
    assert info.claimed == 5 * PRICE
    await market.wait_view(
        lambda: (c := market.service.view.channel(channel)) is not None and c.claimed > 0
    )
    row = await api.get(f"/api/channels/{_hex(channel)}")
    assert row["claimed"] == info.claimed == 5 * PRICE
    assert row["remaining"] == BIG_DEPOSIT - 5 * PRICE
    assert (await api.get("/api/status"))["counters"]["amount_claimed"] == settler.amount_claimed
    assert settler.amount_claimed == 5 * PRICE

    # --- a rating of the seller shows on its topics, as the Ratings contract holds it
    await market.mp("buyer").ratings.rate(channel, 4)
    await market.wait_view(lambda: market.service.view.rating_of(chain.addr("seller"))[0] == 1)
    rating = await market.mp("buyer").ratings.rating_of(chain.addr("seller"))
    average = await market.mp("buyer").ratings.average_x100(chain.addr("seller"))
    for t in (await api.get("/api/topics"))["topics"]:
        assert (
            t["rating"]
            == {"count": rating.count, "average": average / 100}
            == {
                "count": 1,
                "average": 4.0,
            }
        )

    # --- closing: the close request and its deadline, as on chain
    closing = await market.mp("buyer").channels.request_close(channel)
    await market.wait_view(
        lambda: (c := market.service.view.channel(channel)) is not None and c.closes_at is not None
    )
    row = await api.get(f"/api/channels/{_hex(channel)}")
    info = await market.mp("buyer").channels.channel(channel)
    assert info is not None
    assert info.closes_at is not None
    assert row["closing"] is True
    assert row["closes_at"] == info.closes_at == closing.closes_at

    # --- a channel naming no operator is not this broker's
    other = await market.mp("buyer2").channels.open(chain.addr("seller"), None, None, 10**15)
    await market.wait_channel(other.channel_id)
    assert [r["channel_id"] for r in (await api.get("/api/channels"))["channels"]] == [
        _hex(channel)
    ]
    error = await api.get(f"/api/channels/{_hex(other.channel_id)}", 404)
    assert error["error"].startswith("channel_id:")
    await api.get(f"/api/channels/0x{'ab' * 32}", 404)
    for bad in ("0x1234", "xyz", "0x" + "g" * 64, "0x" + "ab" * 33):
        assert (await api.get(f"/api/channels/{bad}", 400))["error"].startswith("channel_id:")


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
async def test_anchors_and_proofs_match_the_chain(api: Api) -> None:
    market, chain = api.market, api.market.chain
    created = await market.mp("seller").market.create_topic("data/free", 0, None, Policy.OPEN)
    await market.wait_view(lambda: market.service.view.topic(created.topic_id) is not None)
    buyer = market.client("buyer")
    device = market.client("device")
    for c in (buyer, device):
        assert await c.connect() == 0
    assert await buyer.subscribe("data/free") == [0]
    assert (await api.get("/api/anchors")) == {"anchors": []}

    domain = MessageDomain(chain.deployment.chain_id, chain.deployment.address("Registry"))
    leaves = []
    for i in range(5):
        await device.publish("data/free", b"reading %d" % i, qos=1)
        signer, leaf = verify_envelope_leaf(
            domain, "data/free", decode_envelope(await _raw_message(buyer, "data/free"))
        )
        assert signer == chain.addr("device")
        leaves.append(leaf)
    # durable but not anchored yet: no proof
    error = await api.get(f"/api/proofs/{_hex(leaves[2])}", 404)
    assert error["error"].startswith("leaf:")

    anchorer = market.service.anchorer
    assert anchorer is not None
    first = await anchorer.anchor_now()
    await device.publish("data/free", b"later", qos=1)
    second = await anchorer.anchor_now()
    assert [r.leaf_count for r in first + second] == [5, 1]

    anchors = (await api.get("/api/anchors"))["anchors"]
    assert [a["batch_id"] for a in anchors] == [second[0].batch_id, first[0].batch_id]
    for row, record in zip(anchors, second + first, strict=True):
        on_chain = await market.mp("oracle").anchors.anchor_of(
            chain.addr("operator"), record.batch_id
        )
        assert on_chain is not None
        assert row["root"] == _hex(on_chain.root) == _hex(record.root)
        assert row["leaf_count"] == on_chain.leaf_count
        assert row["status"] == "confirmed"
        assert row["tx"] == _hex(record.tx_hash) is not None
        assert row["block"] == on_chain.block_number
        # The broker's clock when it saw the confirmation (anvil's clock may run ahead:
        # other tests time-travel it, and evm_revert does not rewind time).
        assert abs(row["anchored_at"] - time.time()) < 120
    status = await api.get("/api/status")
    assert status["counters"]["anchors_confirmed"] == anchorer.batches_anchored == 2
    assert [a["batch_id"] for a in (await api.get("/api/anchors?limit=1"))["anchors"]] == [
        second[0].batch_id
    ]
    too_many = await api.get("/api/anchors?limit=1000000")  # far above the cap: clamped
    assert len(too_many["anchors"]) == 2
    for bad in ("abc", "0", "-3", "1.5", ""):
        error = await api.get(f"/api/anchors?limit={bad}", 400)
        assert error["error"].startswith("limit:"), error

    served = market.service.stats.proofs_served
    proof = await api.get(f"/api/proofs/{_hex(leaves[2])}")
    assert market.service.stats.proofs_served == served + 1
    on_chain = await market.mp("oracle").anchors.anchor_of(
        chain.addr("operator"), proof["batch_id"]
    )
    assert on_chain is not None
    assert proof["batch_id"] == first[0].batch_id
    assert proof["leaf"] == _hex(leaves[2])
    assert proof["root"] == _hex(on_chain.root)
    assert proof["leaf_count"] == 5
    assert proof["verified_on_chain"] is True
    path = [bytes.fromhex(p[2:]) for p in proof["proof"]]
    assert verify_proof(leaves[2], path, on_chain.root)
    assert await market.mp("oracle").anchors.verify(
        chain.addr("operator"), proof["batch_id"], leaves[2], path
    )
    # the same proof the MQTT proof request gets
    record = await anchorer.proof_by_leaf(leaves[2])
    assert record is not None
    assert [_hex(p) for p in record.proof] == proof["proof"]

    error = await api.get(f"/api/proofs/0x{'cd' * 32}", 404)
    assert error["error"].startswith("leaf:")
    for bad in ("0x12", leaves[0].hex(), "0x" + "zz" * 32):
        assert (await api.get(f"/api/proofs/{bad}", 400))["error"].startswith("leaf:")


# --------------------------------------------------------------------------- errors, files


async def test_errors_are_json_and_a_failing_handler_does_not_hurt_the_broker(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for path in ("/api/nope", "/nope", "/api/channels/0x12/extra", "/api"):
        error = await api.get(path, 404)
        assert set(error) == {"error"}
    code, headers, body = await api.raw("/api/status", method="POST")
    assert code == 405
    assert "GET" in headers["Allow"]
    assert "error" in orjson.loads(body)

    # Fault injection: the chain view's listing raises; the API answers 500 and logs it.
    def broken() -> list[Any]:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(api.market.service.view, "all_topics", broken)
    with caplog.at_level(logging.ERROR, logger="blendsm.broker.http"):
        error = await api.get("/api/topics", 500)
    assert "injected" not in error["error"]
    assert any(
        r.exc_info is not None and "injected failure" in str(r.exc_info[1]) for r in caplog.records
    )
    monkeypatch.undo()
    assert len((await api.get("/api/topics"))["topics"]) == 1
    client = api.market.client("buyer")
    assert await client.connect() == 0  # MQTT still serves


async def test_dashboard_files_are_served_and_nothing_else(api: Api) -> None:
    folder = resources.files("blendsm.broker") / "_dashboard"
    code, headers, body = await api.raw("/")
    assert code == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body == (folder / "index.html").read_bytes()
    for name, kind in (
        ("index.html", "text/html"),
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        code, headers, body = await api.raw(f"/static/{name}")
        assert code == 200, name
        assert headers["Content-Type"].startswith(kind)
        assert body == (folder / name).read_bytes()
    secret = (resources.files("blendsm.broker") / "_config.py").read_bytes()
    for path in (
        "/static/../_config.py",
        "/static/..%2F_config.py",
        "/static/%2e%2e%2f_config.py",
        "/static/%2E%2E/_config.py",
        "/static/_config.py",
        "/static/..",
        "/static/.",
        "/static/%2e%2e",
        "/static/_dashboard/..%2F..%2F_config.py",
        "/static/%2Fetc%2Fpasswd",
        "/static/..%5C_config.py",
        "/static/nothere.js",
        "/../broker/_config.py",
    ):
        code, headers, body = await api.raw(path)
        assert code in (400, 404), (path, code)
        assert secret not in body, path
        assert b"root:" not in body, path


# --------------------------------------------------------------------------- config


def test_http_config_is_validated(tmp_path: Path) -> None:
    assert parse_config({}).http == HttpConfig("127.0.0.1", None)
    assert BrokerConfig().http.port is None
    assert parse_config({"http": {"port": 8080}}).http == HttpConfig("127.0.0.1", 8080)
    assert parse_config({"http": {"port": 0, "host": "0.0.0.0"}}).http == HttpConfig("0.0.0.0", 0)
    assert parse_config({"http": {"port": None}}).http.port is None
    assert parse_config({"http": None}).http == HttpConfig()
    path = tmp_path / "broker.yaml"
    path.write_text("http:\n  host: 127.0.0.1\n  port: null\n")
    assert load_config(path).http == HttpConfig()
    for data, message in (
        ({"port": 70000}, "http.port: must be <= 65535"),
        ({"port": -1}, "http.port: must be >= 0"),
        ({"port": "8080"}, "http.port: must be int"),
        ({"port": True}, "http.port: must be int"),
        ({"host": ""}, "http.host: must not be empty"),
        ({"host": 5}, "http.host: must be str"),
        ({"prot": 1}, "http.prot: unknown key; did you mean 'port'?"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"http": data})
    with pytest.raises(ConfigError, match=re.escape("http: must be a mapping")):
        parse_config({"http": 8080})
    with pytest.raises(ConfigError, match=re.escape("htp: unknown key; did you mean 'http'?")):
        parse_config({"htp": {}})


async def test_http_is_off_by_default_and_a_busy_port_is_a_config_error(
    market: Market, tmp_path: Path
) -> None:
    assert market.running.http is None
    chain = market.chain
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = broker_config(tmp_path / "second", http=HttpConfig(port=port))
        with pytest.raises(ConfigError, match=rf"^http: cannot listen on 127\.0\.0\.1:{port}"):
            await start_broker(
                config,
                chain=ChainConnection(
                    market.running.chain.w3,
                    chain.deployment,
                    chain.accounts["operator"],
                    owned=False,
                ),
            )


async def test_the_api_closes_with_the_broker(api: Api) -> None:
    http = api.market.running.http
    assert http is not None
    await api.get("/api/status")
    await http.stop()  # what RunningBroker.stop does first
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.raw("/api/status")
