"""The async ``Brokers`` binding against the embedded chain: every method round-trips, errors
come out by name, and a deployment file made before the Brokers contract still loads (and
says clearly that it has no Brokers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from support import enrol

from blendsm.contracts import (
    BrokerInfo,
    BrokerStatus,
    Deployment,
    EventDecoder,
    Market,
    Marketplace,
    Role,
    ServingOperators,
    split_endpoints,
    test_account,
)
from blendsm.errors import ConfigError, ContractRevertError

MakeMp = Callable[[str], Marketplace]
KEY = test_account("binding-broker-1").address
KEY2 = test_account("binding-broker-2").address


def test_split_endpoints() -> None:
    assert split_endpoints("  mqtt://a:1  wss://b/m ") == "mqtt://a:1 wss://b/m"
    assert split_endpoints(["mqtt://a:1", " wss://b/m"]) == "mqtt://a:1 wss://b/m"


def test_serving_operators_record() -> None:
    anyone = ServingOperators(True, ())
    assert anyone.serves("0xAbC")
    assert not anyone.serves("0xabc", operator_active=False)
    chosen = ServingOperators(False, ("0xAbC",))
    assert chosen.serves("0xabc")
    assert not chosen.serves("0xdef")
    assert not ServingOperators(False, ()).serves("0xabc")


async def test_brokers_round_trip(chain: Any, mp: MakeMp) -> None:
    operator = await enrol(mp, chain, "operator", Role.OPERATOR)
    op2 = await enrol(mp, chain, "validator", Role.OPERATOR)
    await enrol(mp, chain, "seller", Role.SELLER)
    brokers = mp("operator").brokers
    assert await brokers.broker(KEY) is None
    assert await brokers.brokers() == []
    result = await brokers.register_broker(KEY, ["mqtt://h:1883", "wss://h/mqtt"])
    assert result.gas_used > 21_000
    info = await brokers.broker(KEY)
    assert info == BrokerInfo(
        broker_key=KEY,
        operator=operator,
        status=BrokerStatus.ACTIVE,
        registered_at=info.registered_at if info else 0,
        endpoints=("mqtt://h:1883", "wss://h/mqtt"),
        active=True,
    )
    await mp("validator").brokers.register_broker(KEY2, "mqtts://g:8883")
    assert [b.broker_key for b in await brokers.brokers()] == [KEY, KEY2]
    assert [b.broker_key for b in await brokers.brokers(limit=1)] == [KEY]
    assert [b.broker_key for b in await brokers.brokers(op2)] == [KEY2]
    assert await brokers.operator_broker_keys(operator) == [KEY]
    assert await brokers.broker_count() == 2
    await brokers.update_endpoints(KEY, "ws://h:80/mqtt")
    assert (await brokers.broker(KEY)).endpoints == ("ws://h:80/mqtt",)  # type: ignore[union-attr]
    await brokers.retire_broker(KEY)
    retired = await brokers.broker(KEY)
    assert retired is not None
    assert retired.status is BrokerStatus.RETIRED
    assert not retired.active
    assert not await brokers.is_active_broker(KEY)
    assert await brokers.is_active_broker(KEY2)

    with pytest.raises(ContractRevertError) as err:
        await brokers.update_endpoints(KEY2, "http://nope")
    assert err.value.error_name == "BrokersNotBrokerOperator"
    with pytest.raises(ContractRevertError) as err:
        await mp("validator").brokers.update_endpoints(KEY2, "http://nope")
    assert err.value.error_name == "BrokersInvalidEndpoints"

    created = await mp("seller").market.create_topic("a/b", 5)
    topic = created.topic_id
    seller_brokers = mp("seller").brokers
    assert await seller_brokers.serving_operators(topic) == ServingOperators(True, ())
    await seller_brokers.set_seller_operators([operator, op2])
    assert await seller_brokers.seller_operators(chain.addr("seller")) == [operator, op2]
    assert await seller_brokers.serving_operators(topic) == ServingOperators(False, (operator, op2))
    await seller_brokers.set_topic_operators(topic, [op2])
    assert await seller_brokers.topic_operators(topic) == [op2]
    assert await seller_brokers.is_serving(topic, op2)
    assert not await seller_brokers.is_serving(topic, operator)
    with pytest.raises(ContractRevertError) as err:
        await brokers.set_topic_operators(topic, [op2])
    assert err.value.error_name == "BrokersNotSeller"
    assert Market.topic_id("a/b") == topic


async def test_deployment_before_brokers_still_loads(chain: Any, w3: Any) -> None:
    addresses = {k: v for k, v in chain.deployment.addresses.items() if k != "Brokers"}
    old = dataclasses.replace(chain.deployment, addresses=addresses)
    loaded = Deployment.from_json(old.to_json())  # no "lacks addresses" error
    assert "Brokers" not in loaded.addresses
    mp = Marketplace(w3, loaded)
    await mp.check()
    with pytest.raises(ConfigError, match="no Brokers contract"):
        _ = mp.brokers
    decoder = EventDecoder(loaded)  # follows the other contracts' events
    assert "Brokers" not in decoder.addresses.values()
    assert "Brokers" in EventDecoder(chain.deployment).addresses.values()
