"""Brokers against a Python model, over random sequences of actions (hypothesis).

Actions: register, update and retire brokers (as any of three operators, on a pool of four
keys, with valid and invalid endpoint lists), operators revoked, leaving and coming back,
and a seller setting topic and default operator lists (with duplicates and non-operators).
The model predicts each outcome (success or which custom error, in the contract's order of
checks); a refused action must revert with exactly that error, an accepted one is sent.

Invariants after every step: every key's record, ``isActiveBroker``, ``brokerCount``,
``operatorBrokers``, and for every topic ``servingOperators`` and ``isServing`` of every
operator equal the model's. In particular a revoked or departed operator is never serving,
and a list whose operators are all gone yields nobody, never "anyone".

Each example starts from a chain snapshot and reverts to it at teardown. Bounded: 7 examples
of up to 15 steps on the embedded chain (about 40 s in CI; ``BLENDSM_BROKERS_EXAMPLES=100`` for
a longer local hunt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from eth_utils import keccak
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from blendsm.contracts import test_account

SELLER, OPERATOR = 1, 3
OPS = ("operator", "validator", "device2")
KEYS = tuple(test_account(f"stateful-broker-{i}").address for i in range(4))
TOPICS = ("s/one", "s/two")
ENDPOINTS = {  # endpoint list -> valid?
    "mqtt://a:1883": True,
    "wss://b/mqtt mqtts://b:8883": True,
    "ws://c": True,
    "http://x": False,
    "mqtt://a  mqtt://b": False,
    "": False,
}


@dataclass
class Broker:
    operator: str
    endpoints: str
    retired: bool = False


class BrokersMachine(RuleBasedStateMachine):
    chain: Any  # set by the test on a subclass
    tx: Any
    reverts: Any

    def __init__(self) -> None:
        super().__init__()
        self.snap = self.chain.snapshot()
        self.brk = self.chain.Brokers.functions
        self.reg = self.chain.Registry.functions
        self.status: dict[str, str] = {}  # operator label -> active | left | revoked
        self.brokers: dict[str, Broker] = {}  # key -> record
        self.order: list[str] = []
        self.topic_ops: dict[str, list[str]] = {t: [] for t in TOPICS}
        self.seller_ops: list[str] = []

    def teardown(self) -> None:
        self.chain.revert(self.snap)

    @initialize()
    def setup(self) -> None:
        for label in OPS:
            self.tx(self.reg.applyForRole(OPERATOR), label)
            self.tx(self.reg.approve(self.chain.addr(label)), "oracle")
            self.status[label] = "active"
        self.tx(self.reg.applyForRole(SELLER), "seller")
        self.tx(self.reg.approve(self.chain.addr("seller")), "oracle")
        for name in TOPICS:
            self.tx(
                self.chain.Market.functions.createTopic(name, 1, "0x" + "00" * 20, 0, 0), "seller"
            )

    # -- plumbing ---------------------------------------------------------------------------

    def _do(self, call: Any, sender: str, error: str | None) -> bool:
        """Send ``call`` if the model accepts it, else check it reverts with ``error``."""
        if error is None:
            self.tx(call, sender)
            return True
        with self.reverts(error):
            call.call({"from": self.chain.addr(sender)})
        return False

    def _active(self, label: str) -> bool:
        return self.status[label] == "active"

    def _label(self, address: str) -> str:
        return next(label for label in OPS if self.chain.addr(label) == address)

    def _list_error(self, labels: list[str]) -> str | None:
        for i, label in enumerate(labels):
            if not self._active(label) or label in labels[:i]:
                return "BrokersInvalidOperator"
        return None

    def _serving(self, topic: str) -> tuple[bool, list[str]]:
        chosen = self.topic_ops[topic] or self.seller_ops
        if not chosen:
            return True, []
        return False, [self.chain.addr(label) for label in chosen if self._active(label)]

    # -- brokers ----------------------------------------------------------------------------

    @rule(op=st.sampled_from(OPS), key=st.sampled_from(KEYS), ep=st.sampled_from(list(ENDPOINTS)))
    def register(self, op: str, key: str, ep: str) -> None:
        error = None
        if not self._active(op):
            error = "BrokersNotActiveOperator"
        elif key in self.brokers:
            error = "BrokersKeyUnavailable"
        elif not ENDPOINTS[ep]:
            error = "BrokersInvalidEndpoints"
        if self._do(self.brk.registerBroker(key, ep), op, error):
            self.brokers[key] = Broker(self.chain.addr(op), ep)
            self.order.append(key)

    def _own_error(self, op: str, key: str) -> str | None:
        found = self.brokers.get(key)
        if found is None:
            return "BrokersUnknownBroker"
        if found.operator != self.chain.addr(op):
            return "BrokersNotBrokerOperator"
        if found.retired:
            return "BrokersBrokerRetired"
        return None

    @rule(op=st.sampled_from(OPS), key=st.sampled_from(KEYS), ep=st.sampled_from(list(ENDPOINTS)))
    def update(self, op: str, key: str, ep: str) -> None:
        error = self._own_error(op, key)
        if error is None and not ENDPOINTS[ep]:
            error = "BrokersInvalidEndpoints"
        if self._do(self.brk.updateEndpoints(key, ep), op, error):
            self.brokers[key].endpoints = ep

    @rule(op=st.sampled_from(OPS), key=st.sampled_from(KEYS))
    def retire(self, op: str, key: str) -> None:
        if self._do(self.brk.retireBroker(key), op, self._own_error(op, key)):
            self.brokers[key].retired = True

    # -- membership -------------------------------------------------------------------------

    @rule(op=st.sampled_from(OPS))
    def revoke(self, op: str) -> None:
        error = "RegistryWrongStatus" if self.status[op] == "revoked" else None
        if self._do(self.reg.revoke(self.chain.addr(op)), "oracle", error):
            self.status[op] = "revoked"

    @rule(op=st.sampled_from(OPS))
    def leave_or_return(self, op: str) -> None:
        if self.status[op] == "active":
            self.tx(self.reg.leave(), op)
            self.status[op] = "left"
        elif self.status[op] == "left":
            self.tx(self.reg.applyForRole(OPERATOR), op)
            self.tx(self.reg.approve(self.chain.addr(op)), "oracle")
            self.status[op] = "active"

    # -- serving operators ------------------------------------------------------------------

    @rule(topic=st.sampled_from(TOPICS), ops=st.lists(st.sampled_from(OPS), max_size=4))
    def set_topic(self, topic: str, ops: list[str]) -> None:
        addresses = [self.chain.addr(label) for label in ops]
        call = self.brk.setTopicOperators(keccak(topic.encode()), addresses)
        if self._do(call, "seller", self._list_error(ops)):
            self.topic_ops[topic] = list(ops)

    @rule(ops=st.lists(st.sampled_from(OPS), max_size=4))
    def set_default(self, ops: list[str]) -> None:
        addresses = [self.chain.addr(label) for label in ops]
        if self._do(self.brk.setSellerOperators(addresses), "seller", self._list_error(ops)):
            self.seller_ops = list(ops)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def brokers_match(self) -> None:
        assert self.brk.brokerCount().call() == len(self.order)
        for key in KEYS:
            endpoints, operator, _, status = self.brk.broker(key).call()
            found = self.brokers.get(key)
            if found is None:
                assert (endpoints, status) == ("", 0)
                assert not self.brk.isActiveBroker(key).call()
                continue
            assert (operator, endpoints) == (found.operator, found.endpoints)
            assert status == (2 if found.retired else 1)
            active = not found.retired and self._active(self._label(found.operator))
            assert self.brk.isActiveBroker(key).call() == active
        for label in OPS:
            mine = [k for k in self.order if self.brokers[k].operator == self.chain.addr(label)]
            assert self.brk.operatorBrokers(self.chain.addr(label)).call() == mine

    @invariant()
    def serving_matches(self) -> None:
        for topic in TOPICS:
            topic_id = keccak(topic.encode())
            any_op, ops = self.brk.servingOperators(topic_id).call()
            assert (any_op, list(ops)) == self._serving(topic)
            for label in OPS:
                serving = self.brk.isServing(topic_id, self.chain.addr(label)).call()
                expected = self._active(label) and (any_op or self.chain.addr(label) in ops)
                assert serving == expected, (topic, label)


RUN = settings(
    max_examples=int(os.environ.get("BLENDSM_BROKERS_EXAMPLES", "7")),
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("chain", ["embedded"], indirect=True)
def test_brokers_match_the_model(chain: Any, tx: Any, reverts: Any) -> None:
    machine = type(
        "Machine",
        (BrokersMachine,),
        {"chain": chain, "tx": staticmethod(tx), "reverts": staticmethod(reverts)},
    )
    run_state_machine_as_test(machine, settings=RUN)
