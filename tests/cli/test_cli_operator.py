"""`blendsm operator broker ...` and `blendsm market serve|serving` against anvil over
JSON-RPC: every action in human and JSON form, checked against the Brokers contract through
plain web3, and the errors users meet (not an operator, bad endpoint, bad address, no key)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from eth_utils import keccak

from blendsm.contracts import test_account

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

SELLER, BUYER, OPERATOR = 1, 2, 3
ACTIVE, RETIRED = 1, 2
TOPIC = "farm/1/soil"
KEY = test_account("cli-broker-1").address
KEY2 = test_account("cli-broker-2").address

Run = Callable[..., tuple[int, str, str]]


def check_tx(chain: Any, data: dict[str, Any]) -> None:
    receipt = chain.w3.eth.get_transaction_receipt(data["tx"])
    assert receipt["status"] == 1
    assert receipt["blockNumber"] == data["block"]
    assert receipt["gasUsed"] == data["gas_used"]


def on_chain(chain: Any, key: str) -> tuple[str, str, int, int]:
    endpoints, operator, registered_at, status = chain.Brokers.functions.broker(key).call()
    return endpoints, operator, registered_at, status


@pytest.fixture
def operators(chain: Any, enrol: Callable[[str, int], None]) -> tuple[str, str]:
    enrol("operator", OPERATOR)
    enrol("validator", OPERATOR)
    return chain.addr("operator"), chain.addr("validator")


def test_broker_add_update_retire_list(chain: Any, cli: Run, operators: tuple[str, str]) -> None:
    op, op2 = operators
    code, out, err = cli(
        "operator",
        "broker",
        "add",
        KEY.lower(),
        "--endpoint",
        "mqtt://b1:1883",
        "--endpoint",
        "wss://b1/mqtt",
        "--json",
        key="operator",
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["action"] == "add"
    assert data["broker"] == KEY  # checksummed
    assert data["operator"] == op
    assert (data["status"], data["active"]) == ("active", True)
    assert data["endpoints"] == ["mqtt://b1:1883", "wss://b1/mqtt"]
    check_tx(chain, data)
    assert on_chain(chain, KEY)[0] == "mqtt://b1:1883 wss://b1/mqtt"
    assert on_chain(chain, KEY)[3] == ACTIVE

    code, out, err = cli("operator", "broker", "add", KEY2, "--endpoint", "mqtts://b2:8883")
    assert code == 2  # no key
    code, out, err = cli(
        "operator", "broker", "add", KEY2, "--endpoint", "mqtts://b2:8883", key="validator"
    )
    assert (code, err) == (0, "")
    assert f"broker {KEY2} registered to {op2}: mqtts://b2:8883" in out
    assert " tx 0x" in out

    code, out, err = cli(
        "operator", "broker", "update", KEY, "--endpoint", "ws://b1:80/mqtt", key="operator"
    )
    assert (code, err) == (0, "")
    assert f"broker {KEY} now at ws://b1:80/mqtt" in out
    assert on_chain(chain, KEY)[0] == "ws://b1:80/mqtt"

    code, out, err = cli("operator", "broker", "list", "--json", key="operator")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["operator"] == op
    assert [b["broker"] for b in data["brokers"]] == [KEY]
    code, out, err = cli("operator", "broker", "list", "--all", "--json", key=None)
    assert (code, err) == (0, "")
    assert [b["broker"] for b in json.loads(out)["brokers"]] == [KEY, KEY2]
    code, out, err = cli("operator", "broker", "list", op2, key=None)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"1 broker of {op2}, 1 active"
    assert "  endpoint    mqtts://b2:8883" in out

    code, out, err = cli("operator", "broker", "retire", KEY, "--json", key="operator")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert (data["status"], data["active"]) == ("retired", False)
    check_tx(chain, data)
    assert on_chain(chain, KEY)[3] == RETIRED
    code, out, err = cli("operator", "broker", "list", op, key=None)
    assert out.splitlines()[0] == f"1 broker of {op}, 0 active"
    assert f"{KEY}  retired" in out


def test_broker_errors_are_one_line_naming_the_revert(
    chain: Any, cli: Run, operators: tuple[str, str]
) -> None:
    code, out, err = cli("operator", "broker", "add", KEY, "--endpoint", "mqtt://h", key="buyer")
    assert (code, out) == (2, "")
    assert err == f"blendsm: error: BrokersNotActiveOperator(caller='{chain.addr('buyer')}')\n"
    code, _, err = cli("operator", "broker", "add", KEY, "--endpoint", "http://h", key="operator")
    assert code == 2
    assert err == "blendsm: error: BrokersInvalidEndpoints()\n"
    code, _, err = cli("operator", "broker", "add", KEY, "--endpoint", "mqtt://a b", key="operator")
    assert code == 2
    assert err == "blendsm: error: --endpoint: 'mqtt://a b' is empty or contains whitespace\n"
    code, _, err = cli(
        "operator", "broker", "add", "0x12", "--endpoint", "mqtt://h", key="operator"
    )
    assert code == 2
    assert err == "blendsm: error: BROKER: not an address: '0x12'\n"
    code, _, err = cli("operator", "broker", "retire", KEY, key="operator")
    assert code == 2
    assert err.startswith("blendsm: error: BrokersUnknownBroker(")
    code, _, err = cli("operator", "broker", "list", key=None)
    assert code == 2
    assert err.startswith("blendsm: error: give OPERATOR or --all, or a key ($BLENDSM_KEY")
    assert err.count("\n") == 1


def test_market_serve_and_serving(
    chain: Any, cli: Run, enrol: Callable[[str, int], None], operators: tuple[str, str]
) -> None:
    op, op2 = operators
    enrol("seller", SELLER)
    assert cli("market", "create", TOPIC, "--price", "1000", key="seller")[0] == 0
    assert (
        cli("operator", "broker", "add", KEY, "--endpoint", "mqtt://b1:1883", key="operator")[0]
        == 0
    )
    assert (
        cli("operator", "broker", "add", KEY2, "--endpoint", "mqtt://b2:1883", key="validator")[0]
        == 0
    )

    code, out, err = cli("market", "serving", TOPIC, "--json", key=None)
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert (data["any_operator"], data["operators"]) == (True, [])
    assert [b["broker"] for b in data["brokers"]] == [KEY, KEY2]

    code, out, err = cli("market", "serve", TOPIC, "--operators", op2, "--json", key="seller")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert (data["scope"], data["operators"]) == ("topic", [op2])
    check_tx(chain, data)
    topic_id = keccak(TOPIC.encode())
    assert chain.Brokers.functions.servingOperators(topic_id).call() == [False, [op2]]
    code, out, err = cli("market", "serving", TOPIC, key=None)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"{TOPIC}: served by {op2}", f"  {KEY2}  mqtt://b2:1883"]

    code, out, err = cli("market", "serve", "--all-topics", "--operators", op, op2, key="seller")
    assert (code, err) == (0, "")
    assert out.startswith(f"default operators of {chain.addr('seller')}: {op}, {op2}")
    assert chain.Brokers.functions.sellerOperators(chain.addr("seller")).call() == [op, op2]
    code, out, err = cli("market", "serve", TOPIC, "--any", key="seller")
    assert (code, err) == (0, "")
    assert "(cleared: the seller's default applies)" in out
    assert chain.Brokers.functions.servingOperators(topic_id).call() == [False, [op, op2]]

    # Revoking an operator: serving shows it gone, nobody is disconnected by the chain.
    assert cli("registry", "revoke", op, key="oracle")[0] == 0
    code, out, err = cli("market", "serving", TOPIC, "--json", key=None)
    data = json.loads(out)
    assert data["operators"] == [op2]
    assert [b["broker"] for b in data["brokers"]] == [KEY2]
    assert cli("registry", "revoke", op2, key="oracle")[0] == 0
    code, out, err = cli("market", "serving", TOPIC, key=None)
    assert out.splitlines() == [f"{TOPIC}: served by nobody (every chosen operator is gone)"]


def test_market_serve_errors(
    chain: Any, cli: Run, enrol: Callable[[str, int], None], operators: tuple[str, str]
) -> None:
    op, _ = operators
    enrol("seller", SELLER)
    enrol("buyer2", SELLER)
    assert cli("market", "create", TOPIC, "--price", "1000", key="seller")[0] == 0
    code, _, err = cli("market", "serve", TOPIC, "--operators", op, key="buyer2")
    assert code == 2
    assert err.startswith("blendsm: error: BrokersNotSeller(")
    code, _, err = cli("market", "serve", TOPIC, "--operators", chain.addr("buyer"), key="seller")
    assert code == 2
    assert err == f"blendsm: error: BrokersInvalidOperator(operator='{chain.addr('buyer')}')\n"
    code, _, err = cli("market", "serve", "--operators", op, key="seller")
    assert code == 2
    assert err == "blendsm: error: give TOPIC or --all-topics (exactly one)\n"
    code, _, err = cli("market", "serve", TOPIC, "--all-topics", "--any", key="seller")
    assert code == 2
    code, _, err = cli("market", "serve", "--all-topics", "--operators", op, key="buyer")
    assert code == 2
    assert err.startswith("blendsm: error: BrokersNotActiveSeller(")
    code, _, err = cli("market", "serving", "no/such/topic", key=None)
    assert code == 2
    assert err.startswith("blendsm: error: unknown topic 'no/such/topic'")
