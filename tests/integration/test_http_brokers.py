"""``GET /api/brokers`` and the ``serving`` field of ``GET /api/topics`` over real TCP, in
front of the test chain: brokers registered, updated, retired, an operator revoked, a seller's
operator lists; each answer checked against the Brokers contract read independently. Then the
directory's failure rules with a real dead endpoint and a deployment that predates Brokers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from support import enrol

from blendsm.broker import HttpConfig
from blendsm.contracts import Marketplace, Role, connect, disconnect, free_port, test_account

from .conftest import Market, StartMarket

KEY = test_account("http-broker-1").address
KEY2 = test_account("http-broker-2").address
KEY3 = test_account("http-broker-3").address


@dataclass
class Api:
    market: Market
    session: aiohttp.ClientSession
    base: str

    async def get(self, path: str, status: int = 200) -> Any:
        async with self.session.get(self.base + path) as response:
            body = await response.read()
            assert response.status == status, (path, response.status, body[:300])
            assert response.headers["Cache-Control"] == "no-store"
            return json.loads(body)

    async def until(self, path: str, check: Callable[[Any], bool], within: float = 10.0) -> Any:
        """GET ``path`` until ``check(answer)`` holds (bounded); the answer."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            answer = await self.get(path)
            if check(answer):
                return answer
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{path}: never satisfied; last {answer}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(start_market: StartMarket) -> AsyncIterator[Api]:
    market = await start_market(http=HttpConfig(port=0))
    http = market.running.http
    assert http is not None
    http.directory.ttl = 0.0  # refresh on every request (in the background): fast tests
    async with aiohttp.ClientSession() as session:
        yield Api(market, session, f"http://127.0.0.1:{http.port}")


async def on_chain(mp: Marketplace, key: str) -> dict[str, Any]:
    """The row the API must show for ``key``, from the contract directly."""
    endpoints, operator, registered_at, status = await mp.brokers.contract.functions.broker(
        key
    ).call()
    active = await mp.brokers.contract.functions.isActiveBroker(key).call()
    return {
        "broker": key,
        "operator": operator,
        "status": {1: "active", 2: "retired"}[status],
        "active": active,
        "registered_at": registered_at,
        "endpoints": endpoints.split(),
    }


def keys(answer: Any) -> list[str]:
    return [b["broker"] for b in answer["brokers"]]


async def test_brokers_and_serving_follow_the_chain(api: Api) -> None:
    market, chain = api.market, api.market.chain
    op = chain.addr("operator")
    op2 = await enrol(market.mp, chain, "validator", Role.OPERATOR)
    ops = market.mp("operator").brokers
    await ops.register_broker(KEY, "mqtt://b1:1883 wss://b1/mqtt")

    answer = await api.get("/api/brokers")  # the first call waits for a read
    assert answer["brokers"] == [await on_chain(market.mp("operator"), KEY)]
    assert answer["error"] is None
    assert answer["truncated"] is False
    assert 0 <= answer["age_s"] < 10
    topics = (await api.get("/api/topics"))["topics"]
    assert [t["serving"] for t in topics] == [{"any_operator": True, "operators": []}]

    await ops.register_broker(KEY2, "mqtts://b2:8883")
    await market.mp("validator").brokers.register_broker(KEY3, "ws://b3/mqtt")
    await ops.update_endpoints(KEY, "mqtt://b1:1884")
    answer = await api.until("/api/brokers", lambda a: len(a["brokers"]) == 3)
    assert answer["brokers"] == [
        await on_chain(market.mp("operator"), k) for k in (KEY, KEY2, KEY3)
    ]
    assert answer["brokers"][0]["endpoints"] == ["mqtt://b1:1884"]
    assert keys(await api.get(f"/api/brokers?operator={op2.lower()}")) == [KEY3]
    assert keys(await api.get(f"/api/brokers?operator={op}")) == [KEY, KEY2]

    await ops.retire_broker(KEY2)
    answer = await api.until("/api/brokers", lambda a: a["brokers"][1]["status"] == "retired")
    assert answer["brokers"][1] == await on_chain(market.mp("operator"), KEY2)
    assert answer["brokers"][1]["active"] is False

    # The seller chooses op2 for its topic: /api/topics shows it.
    seller = market.mp("seller").brokers
    await seller.set_topic_operators(market.topic_id, [op2])
    topics = await api.until(
        "/api/topics", lambda a: a["topics"][0]["serving"]["any_operator"] is False
    )
    assert topics["topics"][0]["serving"] == {"any_operator": False, "operators": [op2]}

    # op2 revoked: its broker turns inactive and the topic is served by nobody (fail closed).
    await market.mp("oracle").registry.revoke(op2)
    topics = await api.until("/api/topics", lambda a: a["topics"][0]["serving"]["operators"] == [])
    assert topics["topics"][0]["serving"] == {"any_operator": False, "operators": []}
    answer = await api.get(f"/api/brokers?operator={op2}")
    assert answer["brokers"][0]["active"] is False
    assert answer["brokers"][0]["status"] == "active"  # the record; "active" is the verdict


async def test_bad_operator_parameter(api: Api) -> None:
    answer = await api.get("/api/brokers?operator=0x12", status=400)
    assert answer == {"error": "operator: must be 0x and 40 hex digits, got '0x12'"}


async def test_a_failed_refresh_keeps_the_last_snapshot(api: Api, w3: Any) -> None:
    market = api.market
    http = market.running.http
    assert http is not None
    await market.mp("operator").brokers.register_broker(KEY, "mqtt://b1:1883")
    assert keys(await api.get("/api/brokers")) == [KEY]
    dead = connect(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        http.directory.marketplace = Marketplace(dead, market.chain.deployment)
        answer = await api.until("/api/brokers", lambda a: a["error"] is not None)
        assert keys(answer) == [KEY]  # still the last good read
        assert answer["error"].startswith("ChainUnavailableError")
        assert http.directory.failures >= 1
        topics = (await api.get("/api/topics"))["topics"]
        assert topics[0]["serving"] == {"any_operator": True, "operators": []}
    finally:
        await disconnect(dead)


async def test_a_deployment_without_brokers_answers_without_them(api: Api, w3: Any) -> None:
    market = api.market
    http = market.running.http
    assert http is not None
    deployment = market.chain.deployment
    old = dataclasses.replace(
        deployment, addresses={k: v for k, v in deployment.addresses.items() if k != "Brokers"}
    )
    http.directory.marketplace = Marketplace(w3, old)
    http.directory._snapshot = type(http.directory._snapshot)()  # as at start-up
    answer = await api.get("/api/brokers")
    assert answer["brokers"] == []
    assert answer["age_s"] is None
    assert answer["error"].startswith("ConfigError: this deployment has no Brokers contract")
    topics = (await api.get("/api/topics"))["topics"]
    assert [t["serving"] for t in topics] == [None]
