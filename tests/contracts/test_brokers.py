"""Brokers: operators registering broker keys and endpoints, sellers choosing the operators
that serve their topics, and what revocation, leaving and retirement do to both.

Every test runs on the embedded chain and on anvil. Broker keys are TEST-ONLY addresses
derived from labels; they never send a transaction (their operator does).
"""

from __future__ import annotations

import pytest
from eth_utils import keccak

from blendsm.contracts import test_account

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
SELLER, BUYER, OPERATOR = 1, 2, 3
NONE, ACTIVE, RETIRED = 0, 1, 2
NAME = "sensors/room1/temperature"
NAME2 = "sensors/room2/humidity"
EP = "mqtt://b1.example:1883 mqtts://b1.example:8883 wss://b1.example/mqtt"
KEY = test_account("broker-key-1").address
KEY2 = test_account("broker-key-2").address
KEY3 = test_account("broker-key-3").address


def tid(name: str) -> bytes:
    return keccak(name.encode())


@pytest.fixture
def world(chain, enrol, tx, mkt, reg):
    """operator and validator-as-second-operator ("op2") active; seller with topics NAME and
    NAME2, buyer2 as a second seller with no topic; device registered to seller."""
    enrol("operator", OPERATOR)
    enrol("validator", OPERATOR)
    enrol("seller", SELLER)
    enrol("buyer2", SELLER)
    enrol("buyer", BUYER)
    tx(reg.addDevice(chain.addr("device")), "seller")
    tx(mkt.createTopic(NAME, 1000, ZERO, 0, 0), "seller")
    tx(mkt.createTopic(NAME2, 1000, ZERO, 0, 0), "seller")
    return {"op": chain.addr("operator"), "op2": chain.addr("validator")}


def record(brk, key):
    endpoints, operator, registered_at, status = brk.broker(key).call()
    return endpoints, operator, registered_at, status


# ---------------------------------------------------------------- wiring and constants


def test_wired_and_bounds(chain, brk):
    assert brk.registry().call() == chain.Registry.address
    assert brk.market().call() == chain.Market.address
    assert brk.MAX_ENDPOINTS_LENGTH().call() == 512
    assert brk.MAX_ENDPOINTS().call() == 8
    assert brk.MAX_OPERATORS().call() == 16
    assert brk.brokerCount().call() == 0
    assert record(brk, KEY) == ("", ZERO, 0, NONE)
    assert not brk.isActiveBroker(KEY).call()


# ---------------------------------------------------------------- registering brokers


def test_register_stores_emits_and_enumerates(chain, brk, tx, events, world):
    op = world["op"]
    receipt = tx(brk.registerBroker(KEY, EP), "operator")
    assert events(receipt) == [
        ("Brokers.BrokerRegistered", {"operator": op, "brokerKey": KEY, "endpoints": EP})
    ]
    ts = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert record(brk, KEY) == (EP, op, ts, ACTIVE)
    assert brk.isActiveBroker(KEY).call()
    tx(brk.registerBroker(KEY2, "mqtt://b2:1883"), "operator")
    tx(brk.registerBroker(KEY3, "ws://b3/mqtt"), "validator")
    assert brk.brokerCount().call() == 3
    assert [brk.brokerAt(i).call() for i in range(3)] == [KEY, KEY2, KEY3]
    assert brk.operatorBrokerCount(op).call() == 2
    assert brk.operatorBrokers(op).call() == [KEY, KEY2]
    assert brk.operatorBrokers(world["op2"]).call() == [KEY3]
    assert brk.operatorBrokers(chain.addr("stranger")).call() == []


def test_operator_may_register_its_own_address(chain, brk, tx, world):
    # One broker run with the operator's own key: the single-broker set-up of today.
    tx(brk.registerBroker(world["op"], "mqtt://h:1883"), "operator")
    assert brk.isActiveBroker(world["op"]).call()


@pytest.mark.parametrize("label", ["stranger", "seller", "buyer"])
def test_only_active_operators_register(chain, brk, reverts, world, label):
    with reverts("BrokersNotActiveOperator", chain.addr(label)):
        brk.registerBroker(KEY, EP).call({"from": chain.addr(label)})


def test_pending_left_or_revoked_operator_cannot_register(chain, brk, reg, tx, reverts, world):
    tx(reg.applyForRole(OPERATOR), "stranger")  # pending
    with reverts("BrokersNotActiveOperator"):
        brk.registerBroker(KEY, EP).call({"from": chain.addr("stranger")})
    tx(reg.revoke(world["op"]), "oracle")
    with reverts("BrokersNotActiveOperator", world["op"]):
        brk.registerBroker(KEY, EP).call({"from": world["op"]})
    tx(reg.leave(), "validator")
    with reverts("BrokersNotActiveOperator", world["op2"]):
        brk.registerBroker(KEY, EP).call({"from": world["op2"]})


def test_a_key_belongs_to_one_operator_for_good(chain, brk, tx, reverts, world):
    tx(brk.registerBroker(KEY, EP), "operator")
    for label in ("operator", "validator"):  # neither again, nor another operator
        with reverts("BrokersKeyUnavailable", KEY):
            brk.registerBroker(KEY, EP).call({"from": chain.addr(label)})
    tx(brk.retireBroker(KEY), "operator")
    for label in ("operator", "validator"):  # retired keys are never reused
        with reverts("BrokersKeyUnavailable", KEY):
            brk.registerBroker(KEY, EP).call({"from": chain.addr(label)})


@pytest.mark.parametrize("label", ["device", "seller", "validator", "buyer", "zero"])
def test_unavailable_keys(chain, brk, reverts, world, label):
    # zero, a device, or a participant other than the caller (another operator included)
    key = ZERO if label == "zero" else chain.addr(label)
    with reverts("BrokersKeyUnavailable", key):
        brk.registerBroker(key, EP).call({"from": world["op"]})


GOOD_ENDPOINTS = [
    "mqtt://h",
    "mqtts://h:8883",
    "ws://h:80/mqtt",
    "wss://broker.example.org/mqtt?x=1",
    "mqtt://[::1]:1883",
    " ".join(f"mqtt://h{i}:1883" for i in range(8)),  # MAX_ENDPOINTS
    "mqtt://" + "a" * 505,  # exactly 512 bytes
]
BAD_ENDPOINTS = [
    "",
    " ",
    "mqtt://h ",  # trailing space: an empty URL
    " mqtt://h",
    "mqtt://h  mqtt://g",  # double space
    "mqtt://",  # no host
    "mqtt:///path",  # no host either
    "mqtt:/h",
    "mqtt:h",
    "mqtt",
    "://h",
    "http://h",
    "tcp://h:1883",
    "MQTT://h",  # schemes are lower case
    "mqtt://h\tx",
    "mqtt://h\nmqtt://g",
    "mqtt://h\x7f",
    "mqtt://hé",  # non-ASCII
    " ".join(f"mqtt://h{i}:1883" for i in range(9)),  # one URL too many
    "mqtt://" + "a" * 506,  # 513 bytes
]


@pytest.mark.parametrize("endpoints", GOOD_ENDPOINTS)
def test_endpoint_lists_accepted(chain, brk, tx, world, endpoints):
    assert len(endpoints.encode()) <= 512
    tx(brk.registerBroker(KEY, endpoints), "operator")
    assert record(brk, KEY)[0] == endpoints


@pytest.mark.parametrize("endpoints", BAD_ENDPOINTS)
def test_endpoint_lists_refused(chain, brk, tx, reverts, world, endpoints):
    with reverts("BrokersInvalidEndpoints"):
        brk.registerBroker(KEY, endpoints).call({"from": world["op"]})
    tx(brk.registerBroker(KEY, EP), "operator")
    with reverts("BrokersInvalidEndpoints"):
        brk.updateEndpoints(KEY, endpoints).call({"from": world["op"]})


# ---------------------------------------------------------------- updating and retiring


def test_update_endpoints(chain, brk, tx, events, reverts, world):
    tx(brk.registerBroker(KEY, EP), "operator")
    registered_at = record(brk, KEY)[2]
    receipt = tx(brk.updateEndpoints(KEY, "wss://new.example/mqtt"), "operator")
    assert events(receipt) == [
        (
            "Brokers.BrokerEndpointsChanged",
            {"operator": world["op"], "brokerKey": KEY, "endpoints": "wss://new.example/mqtt"},
        )
    ]
    assert record(brk, KEY) == ("wss://new.example/mqtt", world["op"], registered_at, ACTIVE)
    with reverts("BrokersNotBrokerOperator", KEY, world["op2"]):
        brk.updateEndpoints(KEY, EP).call({"from": world["op2"]})
    with reverts("BrokersUnknownBroker", KEY2):
        brk.updateEndpoints(KEY2, EP).call({"from": world["op"]})


def test_retire(chain, brk, tx, events, reverts, world):
    tx(brk.registerBroker(KEY, EP), "operator")
    with reverts("BrokersNotBrokerOperator", KEY, world["op2"]):
        brk.retireBroker(KEY).call({"from": world["op2"]})
    with reverts("BrokersUnknownBroker", KEY2):
        brk.retireBroker(KEY2).call({"from": world["op"]})
    receipt = tx(brk.retireBroker(KEY), "operator")
    assert events(receipt) == [
        ("Brokers.BrokerRetired", {"operator": world["op"], "brokerKey": KEY})
    ]
    assert record(brk, KEY)[3] == RETIRED
    assert record(brk, KEY)[0] == EP  # the record stays, for history
    assert not brk.isActiveBroker(KEY).call()
    assert brk.operatorBrokers(world["op"]).call() == [KEY]  # still listed, as retired
    with reverts("BrokersBrokerRetired", KEY):
        brk.retireBroker(KEY).call({"from": world["op"]})
    with reverts("BrokersBrokerRetired", KEY):
        brk.updateEndpoints(KEY, EP).call({"from": world["op"]})


def test_revoked_operator_brokers_are_inactive_but_can_retire(chain, brk, reg, tx, world):
    tx(brk.registerBroker(KEY, EP), "operator")
    tx(brk.registerBroker(KEY2, EP), "operator")
    tx(reg.revoke(world["op"]), "oracle")
    assert not brk.isActiveBroker(KEY).call()
    assert not brk.isActiveBroker(KEY2).call()
    assert record(brk, KEY)[3] == ACTIVE  # the record says registered; the view says inactive
    tx(brk.retireBroker(KEY), "operator")  # a revoked operator may still take brokers down
    assert record(brk, KEY)[3] == RETIRED


def test_operator_that_left_and_returned(chain, brk, reg, tx, world):
    tx(brk.registerBroker(KEY, EP), "operator")
    tx(reg.leave(), "operator")
    assert not brk.isActiveBroker(KEY).call()
    tx(reg.applyForRole(OPERATOR), "operator")
    tx(reg.approve(world["op"]), "oracle")
    assert brk.isActiveBroker(KEY).call()
    # Came back as a seller: its brokers stay inactive (Operator role needed).
    tx(reg.leave(), "operator")
    tx(reg.applyForRole(SELLER), "operator")
    tx(reg.approve(world["op"]), "oracle")
    assert not brk.isActiveBroker(KEY).call()


# ---------------------------------------------------------------- who serves a topic


def serving(brk, name):
    any_op, ops = brk.servingOperators(tid(name)).call()
    return any_op, list(ops)


def test_default_is_any_active_operator(chain, brk, world):
    assert serving(brk, NAME) == (True, [])
    assert brk.isServing(tid(NAME), world["op"]).call()
    assert brk.isServing(tid(NAME), world["op2"]).call()
    assert not brk.isServing(tid(NAME), chain.addr("seller")).call()  # not an operator
    assert not brk.isServing(tid(NAME), chain.addr("stranger")).call()


def test_unknown_topic_is_served_by_nobody(chain, brk, world):
    assert serving(brk, "no/such/topic") == (False, [])
    assert not brk.isServing(tid("no/such/topic"), world["op"]).call()


def test_topic_operators(chain, brk, tx, events, world):
    seller = chain.addr("seller")
    receipt = tx(brk.setTopicOperators(tid(NAME), [world["op2"]]), "seller")
    assert events(receipt) == [
        (
            "Brokers.TopicOperatorsChanged",
            {"topicId": tid(NAME), "seller": seller, "operators": [world["op2"]]},
        )
    ]
    assert brk.topicOperators(tid(NAME)).call() == [world["op2"]]
    assert serving(brk, NAME) == (False, [world["op2"]])
    assert brk.isServing(tid(NAME), world["op2"]).call()
    assert not brk.isServing(tid(NAME), world["op"]).call()
    assert serving(brk, NAME2) == (True, [])  # other topics unaffected
    # an empty list clears: back to the seller default (none: anyone)
    receipt = tx(brk.setTopicOperators(tid(NAME), []), "seller")
    assert events(receipt, "TopicOperatorsChanged") == [
        {"topicId": tid(NAME), "seller": seller, "operators": []}
    ]
    assert serving(brk, NAME) == (True, [])


def test_seller_default_and_topic_override(chain, brk, tx, events, world):
    seller = chain.addr("seller")
    receipt = tx(brk.setSellerOperators([world["op"], world["op2"]]), "seller")
    assert events(receipt) == [
        (
            "Brokers.SellerOperatorsChanged",
            {"seller": seller, "operators": [world["op"], world["op2"]]},
        )
    ]
    assert brk.sellerOperators(seller).call() == [world["op"], world["op2"]]
    assert serving(brk, NAME) == (False, [world["op"], world["op2"]])
    assert serving(brk, NAME2) == (False, [world["op"], world["op2"]])
    tx(brk.setTopicOperators(tid(NAME2), [world["op2"]]), "seller")
    assert serving(brk, NAME) == (False, [world["op"], world["op2"]])
    assert serving(brk, NAME2) == (False, [world["op2"]])
    assert not brk.isServing(tid(NAME2), world["op"]).call()
    tx(brk.setSellerOperators([]), "seller")
    assert serving(brk, NAME) == (True, [])
    assert serving(brk, NAME2) == (False, [world["op2"]])


def test_revoked_operator_is_never_serving(chain, brk, reg, tx, world):
    tx(brk.setTopicOperators(tid(NAME), [world["op"], world["op2"]]), "seller")
    tx(reg.revoke(world["op"]), "oracle")
    assert serving(brk, NAME) == (False, [world["op2"]])
    assert not brk.isServing(tid(NAME), world["op"]).call()
    assert brk.topicOperators(tid(NAME)).call() == [world["op"], world["op2"]]  # as set
    # Every chosen operator gone: nobody serves (fail closed), never "anyone".
    tx(reg.leave(), "validator")
    assert serving(brk, NAME) == (False, [])
    assert not brk.isServing(tid(NAME), world["op2"]).call()
    # With no list at all, a revoked operator is not "any operator" either.
    assert serving(brk, NAME2) == (True, [])
    assert not brk.isServing(tid(NAME2), world["op"]).call()


def test_set_topic_operators_errors(chain, brk, reverts, world):
    seller, other = chain.addr("seller"), chain.addr("buyer2")
    with reverts("BrokersUnknownTopic", tid("nope")):
        brk.setTopicOperators(tid("nope"), [world["op"]]).call({"from": seller})
    with reverts("BrokersNotSeller", tid(NAME), other):
        brk.setTopicOperators(tid(NAME), [world["op"]]).call({"from": other})
    with reverts("BrokersInvalidOperator", chain.addr("buyer")):  # not an operator
        brk.setTopicOperators(tid(NAME), [world["op"], chain.addr("buyer")]).call({"from": seller})
    with reverts("BrokersInvalidOperator", world["op"]):  # listed twice
        brk.setTopicOperators(tid(NAME), [world["op"], world["op2"], world["op"]]).call(
            {"from": seller}
        )
    with reverts("BrokersInvalidOperator", ZERO):
        brk.setTopicOperators(tid(NAME), [ZERO]).call({"from": seller})


def test_set_seller_operators_errors(chain, brk, reg, tx, reverts, world):
    with reverts("BrokersNotActiveSeller", chain.addr("buyer")):
        brk.setSellerOperators([world["op"]]).call({"from": chain.addr("buyer")})
    with reverts("BrokersNotActiveSeller", world["op"]):
        brk.setSellerOperators([world["op"]]).call({"from": world["op"]})
    with reverts("BrokersInvalidOperator", chain.addr("seller")):
        brk.setSellerOperators([chain.addr("seller")]).call({"from": chain.addr("seller")})
    tx(reg.revoke(world["op2"]), "oracle")
    with reverts("BrokersInvalidOperator", world["op2"]):  # revoked: refused when set
        brk.setSellerOperators([world["op2"]]).call({"from": chain.addr("seller")})
    tx(reg.revoke(chain.addr("seller")), "oracle")
    with reverts("BrokersNotActiveSeller", chain.addr("seller")):
        brk.setSellerOperators([world["op"]]).call({"from": chain.addr("seller")})


def test_operator_list_bound(chain, brk, reg, tx, reverts, world):
    """16 distinct active operators fit; 17 are refused before any is checked."""
    ops = [world["op"], world["op2"]]
    for i in range(14):
        acct = test_account(f"extra-operator-{i}")
        chain.w3.eth.send_transaction(  # fund it (a plain transfer from the oracle)
            {"from": chain.addr("oracle"), "to": acct.address, "value": 10**17}
        )
        raw = acct.sign_transaction(
            reg.applyForRole(OPERATOR).build_transaction(
                {"from": acct.address, "nonce": 0, "gas": 200_000, "chainId": chain.w3.eth.chain_id}
            )
        )
        chain.w3.eth.wait_for_transaction_receipt(
            chain.w3.eth.send_raw_transaction(raw.raw_transaction)
        )
        tx(reg.approve(acct.address), "oracle")
        ops.append(acct.address)
    tx(brk.setTopicOperators(tid(NAME), ops), "seller")
    assert serving(brk, NAME) == (False, ops)
    tx(brk.setSellerOperators(ops), "seller")
    too_many = [*ops, chain.addr("stranger")]
    with reverts("BrokersTooManyOperators", 17):
        brk.setTopicOperators(tid(NAME), too_many).call({"from": chain.addr("seller")})
    with reverts("BrokersTooManyOperators", 17):
        brk.setSellerOperators(too_many).call({"from": chain.addr("seller")})
