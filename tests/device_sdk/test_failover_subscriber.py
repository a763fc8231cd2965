"""FailoverSubscriber against real stock amqtt brokers and real paho clients: the failover
order, repeats dropped before the application and before value is counted or paid, gaps from
the window and from a broker's resume answer. (Paid failover between BlendSM brokers with
replay: tests/integration/test_failover.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from eth_account import Account
from paho.mqtt.enums import CallbackAPIVersion
from support import wait_until
from support.stock_amqtt import STOCK_OPERATORS as OPERATORS
from support.stock_amqtt import StockBroker, free_port

from blendsm.device_sdk import (
    NOTICE,
    BrokerEndpoint,
    EnvelopeSigner,
    FailoverEvent,
    FailoverSubscriber,
    Gap,
    MessageDomain,
    MultiHomedPublisher,
    Quote,
    ReceivedMessage,
    Resumed,
    Unserved,
    control_topic,
    decode_envelope,
    encode_notice,
    encode_resumed,
)
from blendsm.errors import ConfigError

CHAIN_ID = 31337
REGISTRY = "0x" + "5c" * 20
CHANNELS = "0x" + "c4" * 20
DOMAIN = MessageDomain(CHAIN_ID, REGISTRY)
DEVICE = Account.from_key(bytes.fromhex("6c" * 32))  # TEST-ONLY key
BUYER = Account.from_key(bytes.fromhex("7d" * 32))  # TEST-ONLY key
TOPIC = "market/t"
PRICE = 1000


class Tape:
    def __init__(self, fsub: FailoverSubscriber) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[int, int]] = []  # (sequence, broker port)
        self.gaps: list[Gap] = []
        self.failovers: list[FailoverEvent] = []
        self.resumed: list[Resumed] = []
        fsub.on_message = self.message
        fsub.on_gap = lambda _f, g: self._add(self.gaps, g)
        fsub.on_failover = lambda _f, e: self._add(self.failovers, e)
        fsub.on_resumed = lambda _f, n, _b: self._add(self.resumed, n)

    def _add(self, items: list[Any], item: Any) -> None:
        with self.lock:
            items.append(item)

    def message(self, _f: FailoverSubscriber, m: ReceivedMessage, b: BrokerEndpoint) -> None:
        self._add(self.messages, (decode_envelope(m.payload).sequence, b.port))


def _endpoints(*ports: int) -> list[BrokerEndpoint]:
    return [
        BrokerEndpoint("127.0.0.1", port, OPERATORS[i % 2], CHAIN_ID)
        for i, port in enumerate(ports)
    ]


def _raw(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_fails_over_in_order_and_drops_the_retained_repeat(
    brokers: list[StockBroker], tmp_path: Path
) -> None:
    dead = free_port()
    a, b = brokers
    fsub = FailoverSubscriber(
        BUYER, _endpoints(dead, a.port, b.port), channels_contract=CHANNELS, connect_timeout=1.0
    )
    tape = Tape(fsub)
    pub = MultiHomedPublisher(
        DEVICE, registry=REGISTRY, state_dir=tmp_path / "dev", endpoints=_endpoints(a.port, b.port)
    )
    try:
        fsub.connect(10)  # the dead endpoint is skipped
        assert fsub.active is not None
        assert fsub.active.port == a.port
        fsub.subscribe(TOPIC, 1)
        pub.connect(10)
        sequences = [pub.publish(TOPIC, b"r%d" % i, retain=True) for i in range(5)]
        pub.flush(10)
        wait_until(lambda: len(tape.messages) == 5, 10, what="five messages from A")
        lost = time.monotonic()
        a.stop()
        wait_until(lambda: bool(tape.failovers), 5, what="a failover within 5 s")
        print(f"\nfailover within {time.monotonic() - lost:.2f} s")
        assert tape.failovers[0].to is not None
        assert tape.failovers[0].to.port == b.port  # after A: B (the dead one comes last)
        sequences += [pub.publish(TOPIC, b"s%d" % i) for i in range(5)]
        wait_until(lambda: len(tape.messages) == 10, 10, what="five more from B")
        time.sleep(0.3)  # B's retained copy of the last one came at the SUBSCRIBE
        assert [s for s, _ in tape.messages] == sequences
        assert fsub.stats.duplicates_dropped == 1
        assert fsub.stats.resumes_sent == 1
        assert tape.gaps == []
    finally:
        fsub.disconnect()
        pub.close()


def test_a_repeat_is_neither_counted_nor_paid_and_gaps_are_reported(
    brokers: list[StockBroker],
) -> None:
    broker = brokers[0]
    fsub = FailoverSubscriber(
        BUYER, _endpoints(broker.port), channels_contract=CHANNELS, window=64, pay_every=1
    )
    tape = Tape(fsub)
    raw = _raw(broker.port)
    signer = EnvelopeSigner(bytes(DEVICE.key), DOMAIN)
    channel = b"\x11" * 32
    try:
        fsub.connect(10)
        fsub.subscribe(TOPIC, 1)
        notice = control_topic(BUYER.address, NOTICE)
        quote = Quote(TOPIC, OPERATORS[0], channel, PRICE, 5 * PRICE, 0, 0)
        raw.publish(notice, encode_notice(quote), qos=1).wait_for_publish(5)
        member = fsub.member(fsub.endpoints[0])
        assert member is not None
        wait_until(lambda: member.quote(TOPIC) is not None, 5, what="the quote")
        first = signer.sign(TOPIC, b"one", 1, 1).encode()
        for _ in range(3):  # the same envelope three times (a broker delivering repeats)
            raw.publish(TOPIC, first, qos=1).wait_for_publish(5)
        far = signer.sign(TOPIC, b"far", 100, 2).encode()
        raw.publish(TOPIC, far, qos=1).wait_for_publish(5)
        wait_until(lambda: len(tape.messages) == 2, 5, what="two first copies")
        wait_until(lambda: fsub.stats.duplicates_dropped == 2, 5, what="two repeats dropped")
        assert [s for s, _ in tape.messages] == [1, 100]
        assert member.received_value(channel) == 2 * PRICE  # the repeats count nothing
        wait_until(lambda: member.vouchered(channel) == 2 * PRICE, 5, what="paid for two")
        device = DEVICE.address.lower()
        assert tape.gaps == [Gap(device, TOPIC, 2, 36)]  # left the 64-sequence window unseen
        assert fsub.missing(DEVICE.address, TOPIC)[:2] == [37, 38]

        answer = Resumed("r1", TOPIC, 4, (Unserved(DEVICE.address, 37, 60),))
        raw.publish(notice, encode_resumed(answer), qos=1).wait_for_publish(5)
        wait_until(lambda: len(tape.resumed) == 1, 5, what="the resume answer")
        assert tape.gaps[1] == Gap(device, TOPIC, 37, 60, "broker")
        assert fsub.stats.replayed == 4
    finally:
        fsub.disconnect()
        raw.loop_stop()
        raw.disconnect()


def test_bad_settings_are_refused() -> None:
    endpoint = _endpoints(1883)
    with pytest.raises(ConfigError):
        FailoverSubscriber(BUYER, [], channels_contract=CHANNELS)
    with pytest.raises(ConfigError):
        FailoverSubscriber(BUYER, endpoint, channels_contract=CHANNELS, window=10)
    with pytest.raises(ConfigError):
        FailoverSubscriber(BUYER, endpoint, channels_contract=CHANNELS, connect_timeout=0)
    with pytest.raises(ConfigError):
        FailoverSubscriber(BUYER, endpoint, channels_contract=CHANNELS, clean_session=False)
