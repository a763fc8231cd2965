"""A device multi-homed on several brokers (issue 14): one signed stream, one outbox per
broker, so a broker that is down holds back only its own leg. Real stock amqtt brokers on
127.0.0.1 and raw paho readers that verify every envelope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from support.stock_amqtt import STOCK_OPERATORS as OPERATORS
from support.stock_amqtt import EnvelopeReader, StockBroker, free_port

from blendsm.device_sdk import (
    BrokerEndpoint,
    Envelope,
    MessageDomain,
    MultiHomedPublisher,
    OutboxFullError,
)
from blendsm.errors import BrokerConnectionError, ConfigError

CHAIN_ID = 31337
REGISTRY = "0x" + "5c" * 20
DOMAIN = MessageDomain(CHAIN_ID, REGISTRY)
DEVICE = Account.from_key(bytes.fromhex("6c" * 32))  # TEST-ONLY key


class Reader(EnvelopeReader):
    """The shared envelope reader for this module's device; :meth:`envelopes` without topics."""

    def __init__(self, port: int) -> None:
        super().__init__(port, DOMAIN, DEVICE.address)

    def envelopes(self, n: int, timeout: float = 10.0) -> list[Envelope]:
        return [envelope for _, envelope in self.take(n, timeout)]


@pytest.fixture
def readers(brokers: list[StockBroker]) -> Iterator[list[Reader]]:
    made = [Reader(b.port) for b in brokers]
    try:
        yield made
    finally:
        for reader in made:
            reader.close()


def make(ports: list[int], state_dir: Path, **kwargs: Any) -> MultiHomedPublisher:
    endpoints = [
        BrokerEndpoint("127.0.0.1", port, operator, CHAIN_ID)
        for port, operator in zip(ports, OPERATORS, strict=True)
    ]
    return MultiHomedPublisher(
        DEVICE, registry=REGISTRY, state_dir=state_dir, endpoints=endpoints, **kwargs
    )


def test_every_broker_gets_the_same_signed_stream(
    brokers: list[StockBroker], readers: list[Reader], tmp_path: Path
) -> None:
    with make([b.port for b in brokers], tmp_path / "device") as pub:
        pub.connect(5)
        sequences = [pub.publish("data/t", b"%d" % i) for i in range(20)]
        pub.flush(10)
        got = [reader.envelopes(20) for reader in readers]
    assert sequences == list(range(1, 21))
    # One signature for both brokers: the same (device, topic, sequence) and the same bytes,
    # which is what lets a subscriber that fails over keep each message once.
    assert [e.encode() for e in got[0]] == [e.encode() for e in got[1]]
    assert [e.sequence for e in got[0]] == sequences


def test_a_broker_down_holds_back_only_its_own_leg_and_loses_nothing(
    brokers: list[StockBroker], readers: list[Reader], tmp_path: Path
) -> None:
    down = brokers[1]
    with make([b.port for b in brokers], tmp_path / "device") as pub:
        pub.connect(5)
        pub.publish("data/t", b"before")
        pub.flush(10)
        assert [len(r.envelopes(1)) for r in readers] == [1, 1]

        down.stop(5)
        sequences = [pub.publish("data/t", b"%d" % i) for i in range(30)]
        # The live broker's reader gets all 30 while the other broker is away.
        assert [e.sequence for e in readers[0].envelopes(30)] == sequences
        leg_up, leg_down = pub.legs
        assert leg_down.pending == 30
        assert not leg_down.connected
        with pytest.raises(BrokerConnectionError, match=leg_down.name):
            pub.flush(0.5)

        down.start()  # same port; the leg reconnects on its own and sends its backlog
        readers[1].subscribed.clear()
        assert readers[1].subscribed.wait(10)
        pub.flush(15)
        assert pub.pending == {leg_up.name: 0, leg_down.name: 0}
    received = [e.sequence for e in readers[1].envelopes(30)]
    assert sorted(set(received)) == sequences  # nothing lost; a resend may repeat one
    assert all(leg.missed == 0 for leg in pub.legs)


def test_a_full_leg_misses_messages_counted_without_blocking_the_others(
    brokers: list[StockBroker], readers: list[Reader], tmp_path: Path
) -> None:
    down = brokers[1]
    down.stop(5)
    pub = make([b.port for b in brokers], tmp_path / "device", max_pending=10)
    try:
        pub.connect(5)  # one broker is enough
        assert pub.connected
        sequences = [pub.publish("data/t", b"%d" % i) for i in range(25)]
        assert [e.sequence for e in readers[0].envelopes(25)] == sequences
        leg_down = pub.legs[1]
        assert (leg_down.pending, leg_down.missed) == (10, 15)
        assert pub.legs[0].missed == 0
    finally:
        pub.close()


def test_publish_refuses_only_when_every_outbox_is_full_and_uses_no_sequence(
    tmp_path: Path,
) -> None:
    ports = [free_port(), free_port()]  # nobody listens: every message stays queued
    pub = make(ports, tmp_path / "device", max_pending=3)
    try:
        assert [pub.publish("data/t", b"x") for _ in range(3)] == [1, 2, 3]
        with pytest.raises(OutboxFullError):
            pub.publish("data/t", b"x")
        assert [leg.missed for leg in pub.legs] == [0, 0]
        assert pub.pending == {leg.name: 3 for leg in pub.legs}
        with pytest.raises(BrokerConnectionError, match="no broker connected"):
            pub.publish("data/t", b"x", qos=0)
    finally:
        pub.close()
    again = make(ports, tmp_path / "device", max_pending=5)
    try:  # a restart keeps each leg's backlog, and the refused message used no number
        assert again.pending == {leg.name: 3 for leg in again.legs}
        assert again.publish("data/t", b"y") == 4
    finally:
        again.close()


def test_backlog_survives_a_device_restart(
    brokers: list[StockBroker], readers: list[Reader], tmp_path: Path
) -> None:
    down = brokers[1]
    ports = [b.port for b in brokers]
    down.stop(5)
    pub = make(ports, tmp_path / "device")
    pub.connect(5)
    sequences = [pub.publish("data/t", b"%d" % i) for i in range(5)]
    assert [e.sequence for e in readers[0].envelopes(5)] == sequences
    pub.close()  # the down broker's 5 stay in its leg's outbox on disk

    down.start()
    readers[1].subscribed.clear()
    assert readers[1].subscribed.wait(10)
    with make(ports, tmp_path / "device") as again:
        again.connect(5)
        nxt = again.publish("data/t", b"after restart")
        again.flush(15)
    assert nxt == 6  # no sequence reused after the restart
    assert sorted({e.sequence for e in readers[1].envelopes(6)}) == [*sequences, 6]


def test_bad_endpoint_lists_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        MultiHomedPublisher(DEVICE, registry=REGISTRY, state_dir=tmp_path / "a", endpoints=[])
    same = BrokerEndpoint("127.0.0.1", 1883, OPERATORS[0], CHAIN_ID)
    with pytest.raises(ConfigError, match="twice"):
        MultiHomedPublisher(
            DEVICE, registry=REGISTRY, state_dir=tmp_path / "b", endpoints=[same, same]
        )
    other_chain = BrokerEndpoint("127.0.0.1", 1884, OPERATORS[1], CHAIN_ID + 1)
    with pytest.raises(ConfigError, match="chain_id"):
        MultiHomedPublisher(
            DEVICE, registry=REGISTRY, state_dir=tmp_path / "c", endpoints=[same, other_chain]
        )
