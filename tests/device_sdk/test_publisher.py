"""The Publisher against a real stock amqtt broker (127.0.0.1, free port), read back by a raw
paho subscriber."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from eth_account import Account
from paho.mqtt.enums import CallbackAPIVersion

from blendsm.device_sdk import ConnectTokenVerifier, Publisher
from blendsm.errors import BrokerConnectionError, BrokerRefusedError, ConfigError

CHAIN_ID = 31337
DEVICE = Account.from_key(bytes.fromhex("6b" * 32))
OPERATOR = Account.from_key(bytes.fromhex("22" * 32)).address

SEEN: list[tuple[str, str | None, str | None]] = []
REFUSED_USERS: set[str] = set()


class RecordingAuth(BaseAuthPlugin):
    """Accepts everyone but REFUSED_USERS and records (client id, user name, password)."""

    async def authenticate(self, *, session: Session) -> bool:
        SEEN.append((session.client_id, session.username, session.password))
        return session.username not in REFUSED_USERS


@pytest.fixture
def port() -> Iterator[int]:
    """A stock amqtt broker on its own event loop thread; its port."""
    SEEN.clear()
    REFUSED_USERS.clear()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {f"{__name__}.RecordingAuth": {}},
    }

    async def start() -> Any:
        broker = Broker(config)
        await broker.start()
        return broker

    broker = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield int(broker._servers["default"].instance.sockets[0].getsockname()[1])
    finally:
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture
def reader(port: int) -> Iterator[queue.Queue[mqtt.MQTTMessage]]:
    """Messages on ``data/#`` seen by a raw paho subscriber."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-reader")
    c.on_message = lambda _c, _u, m: got.put(m)
    c.on_subscribe = lambda *_a: subscribed.set()
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    c.subscribe("data/#", 1)
    assert subscribed.wait(5)
    yield got
    c.disconnect()
    c.loop_stop()


def make(port: int, **kwargs: Any) -> Publisher:
    return Publisher(
        kwargs.pop("account", DEVICE),
        host="127.0.0.1",
        port=port,
        broker=OPERATOR,
        chain_id=CHAIN_ID,
        **kwargs,
    )


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publishes_bytes_as_given(
    port: int, reader: queue.Queue[mqtt.MQTTMessage], qos: int
) -> None:
    with make(port) as pub:
        info = pub.publish("data/temp", b"\x00\x01payload", qos=qos, wait=True)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        if qos:
            assert info.is_published()
        got = reader.get(timeout=5)
    assert (got.topic, got.payload) == ("data/temp", b"\x00\x01payload")


def test_connects_with_address_and_fresh_single_use_tokens(port: int) -> None:
    pub = make(port, client_id="device-7")
    pub.connect(5)
    pub.disconnect()
    pub.connect(5)
    pub.disconnect()
    assert [(cid, user) for cid, user, _ in SEEN] == [("device-7", DEVICE.address)] * 2
    passwords = [password for _, _, password in SEEN]
    assert passwords[0] != passwords[1]
    verifier = ConnectTokenVerifier(CHAIN_ID, OPERATOR)
    now = int(time.time())
    for password in passwords:
        assert verifier.verify(DEVICE.address, "device-7", password, now) == DEVICE.address
    # Single use: the verifier refuses the replay of either.
    with pytest.raises(ValueError, match="replay"):
        verifier.verify(DEVICE.address, "device-7", passwords[0], now)


def test_refused_connect_raises(port: int) -> None:
    REFUSED_USERS.add(DEVICE.address)
    with pytest.raises(BrokerRefusedError) as info:
        make(port).connect(5)
    assert info.value.return_code in (4, 5)


def test_qos0_while_disconnected_raises(port: int) -> None:
    pub = make(port)
    with pytest.raises(BrokerConnectionError):
        pub.publish("data/temp", b"x")


def test_payload_seam_encodes_every_publish(
    port: int, reader: queue.Queue[mqtt.MQTTMessage]
) -> None:
    class Wrapping(Publisher):
        def encode_payload(self, topic: str, payload: bytes) -> bytes:
            return topic.encode() + b"|" + payload

    pub = Wrapping(DEVICE, host="127.0.0.1", port=port, broker=OPERATOR, chain_id=CHAIN_ID)
    with pub:
        pub.publish("data/hum", b"55", qos=1, wait=True)
        assert reader.get(timeout=5).payload == b"data/hum|55"


@pytest.mark.parametrize(
    ("topic", "payload", "qos"),
    [
        ("blendsm/ctl/x/voucher", b"x", 0),
        ("data/+", b"x", 0),
        ("", b"x", 0),
        ("data/t", "text", 0),
        ("data/t", b"x", 3),
    ],
)
def test_bad_publishes_are_config_errors(port: int, topic: str, payload: Any, qos: int) -> None:
    with make(port) as pub, pytest.raises(ConfigError):
        pub.publish(topic, payload, qos=qos)
