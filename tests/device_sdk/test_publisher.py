"""The signing, store-and-forward Publisher against a real stock amqtt broker (127.0.0.1,
free port), read back by a raw paho subscriber that verifies every envelope."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from eth_account import Account
from support.stock_amqtt import EnvelopeReader
from support.stock_amqtt import StockBroker as _StockBroker

from blendsm.device_sdk import (
    FLAG_ENCRYPTED,
    Acknowledgement,
    ConnectTokenVerifier,
    MessageDomain,
    OutboxFullError,
    Publisher,
    PublisherCallbackAPI,
)
from blendsm.errors import BrokerConnectionError, BrokerRefusedError, ConfigError, StoreError

CHAIN_ID = 31337
REGISTRY = "0x" + "5b" * 20
DOMAIN = MessageDomain(CHAIN_ID, REGISTRY)
DEVICE = Account.from_key(bytes.fromhex("6b" * 32))
OPERATOR = Account.from_key(bytes.fromhex("22" * 32)).address

SEEN: list[tuple[str, str | None, str | None]] = []
REFUSED_USERS: set[str] = set()
DEVICE_GATE = threading.Event()  # while clear, the device's CONNECT waits (readers go first)


class RecordingAuth(BaseAuthPlugin):
    """Accepts everyone but REFUSED_USERS, records (client id, user name, password), and
    holds the device's CONNECT until DEVICE_GATE is set."""

    async def authenticate(self, *, session: Session) -> bool:
        SEEN.append((session.client_id, session.username, session.password))
        if session.username == DEVICE.address:
            while not DEVICE_GATE.is_set():  # noqa: ASYNC110 (a threading.Event)
                await asyncio.sleep(0.01)
        return session.username not in REFUSED_USERS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def StockBroker(port: int) -> _StockBroker:  # noqa: N802 (stands for the class it makes)
    """The shared stock broker, with this module's recording auth plugin."""
    return _StockBroker(port, {f"{__name__}.RecordingAuth": {}})


def Reader(port: int) -> EnvelopeReader:  # noqa: N802 (stands for the class it makes)
    """The shared envelope reader, checking this module's device and domain."""
    return EnvelopeReader(port, DOMAIN, DEVICE.address)


@pytest.fixture(autouse=True)
def _reset_auth() -> Iterator[None]:
    SEEN.clear()
    REFUSED_USERS.clear()
    DEVICE_GATE.set()
    yield
    DEVICE_GATE.set()


@pytest.fixture
def broker() -> Iterator[_StockBroker]:
    running = StockBroker(free_port()).start()
    try:
        yield running
    finally:
        DEVICE_GATE.set()
        running.close()


@pytest.fixture
def reader(broker: _StockBroker, closing: Callable[[Reader], Reader]) -> Reader:
    return closing(Reader(broker.port))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "device-state"


def make(port: int, state_dir: Path, **kwargs: Any) -> Publisher:
    return Publisher(
        kwargs.pop("account", DEVICE),
        host="127.0.0.1",
        port=port,
        broker=OPERATOR,
        chain_id=CHAIN_ID,
        registry=REGISTRY,
        state_dir=state_dir,
        **kwargs,
    )


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_message_is_a_verified_envelope_with_increasing_sequence(
    broker: _StockBroker, reader: Reader, state_dir: Path, qos: int
) -> None:
    payloads = [b"\x00\x01binary", b"", bytes(range(256)) * 4]
    with make(broker.port, state_dir) as pub:
        sequences = [pub.publish("data/temp", p, qos=qos) for p in payloads]
        if qos:
            pub.flush(5)
        got = reader.take(3)
    assert sequences == [1, 2, 3]
    assert [t for t, _ in got] == ["data/temp"] * 3
    # Binary payloads travel as they are, behind the 103-byte header.
    assert [e.payload for _, e in got] == payloads
    assert [e.sequence for _, e in got] == sequences
    assert all(e.flags == 0 for _, e in got)
    assert all(e.device_address == DEVICE.address for _, e in got)
    stamps = [e.timestamp_ms for _, e in got]
    assert stamps == sorted(stamps)
    assert abs(stamps[0] - time.time() * 1000) < 60_000


def test_sequences_are_per_topic(broker: _StockBroker, reader: Reader, state_dir: Path) -> None:
    with make(broker.port, state_dir) as pub:
        got = [pub.publish(t, b"x") for t in ("data/a", "data/b", "data/a", "data/b", "data/a")]
        pub.flush(5)
    assert got == [1, 1, 2, 2, 3]
    received = reader.take(5)
    assert [(t, e.sequence) for t, e in received] == [
        ("data/a", 1),
        ("data/b", 1),
        ("data/a", 2),
        ("data/b", 2),
        ("data/a", 3),
    ]


def test_encryptor_hook_sets_the_flag_and_signs_the_ciphertext(
    broker: _StockBroker, reader: Reader, state_dir: Path
) -> None:
    def xor(topic: str, plaintext: bytes) -> bytes:  # a toy cipher, keyed by the topic
        key = topic.encode()
        return bytes(b ^ key[i % len(key)] for i, b in enumerate(plaintext))

    with make(broker.port, state_dir, encryptor=xor) as pub:
        pub.publish("data/secret", b"21.5C")
        pub.flush(5)
    topic, envelope = reader.take(1)[0]  # the reader verified the signature
    assert envelope.flags == FLAG_ENCRYPTED
    assert envelope.encrypted
    assert envelope.payload == xor(topic, b"21.5C") != b"21.5C"
    assert xor(topic, envelope.payload) == b"21.5C"


def test_connects_with_address_and_fresh_single_use_tokens(
    broker: _StockBroker, state_dir: Path
) -> None:
    pub = make(broker.port, state_dir, client_id="device-7")
    pub.connect(5)
    pub.disconnect()
    pub.connect(5)
    pub.close()
    assert [(cid, user) for cid, user, _ in SEEN] == [("device-7", DEVICE.address)] * 2
    passwords = [password for _, _, password in SEEN]
    assert passwords[0] != passwords[1]
    verifier = ConnectTokenVerifier(CHAIN_ID, OPERATOR)
    now = int(time.time())
    for password in passwords:
        assert verifier.verify(DEVICE.address, "device-7", password, now) == DEVICE.address
    with pytest.raises(ValueError, match="replay"):
        verifier.verify(DEVICE.address, "device-7", passwords[0], now)


def test_refused_connect_raises(broker: _StockBroker, state_dir: Path) -> None:
    REFUSED_USERS.add(DEVICE.address)
    pub = make(broker.port, state_dir)
    with pytest.raises(BrokerRefusedError) as info:
        pub.connect(5)
    pub.close()
    assert info.value.return_code in (4, 5)


def _connects_and_publishes_once_a_broker_listens(
    pub: Publisher, port: int, closing: Callable[[Reader], Reader], payload: bytes
) -> None:
    """A broker starts on ``port``; ``pub`` connects, its QoS 1 message arrives, it closes."""
    broker = StockBroker(port).start()
    try:
        reader = closing(Reader(port))
        pub.connect(5)
        pub.publish("data/temp", payload, qos=1)
        pub.flush(5)
        assert [e.payload for _, e in reader.take(1)] == [payload]
        pub.close()
    finally:
        broker.close()


def test_connect_works_again_once_the_broker_listens(
    state_dir: Path, closing: Callable[[Reader], Reader]
) -> None:
    """paho marks the connection as opening before it opens the socket, and kept that mark
    when the socket could not be opened: every later ``connect`` raised paho's RuntimeError
    ("updating connect_timeout on established connection"), so a device retrying in a loop
    never connected again, whatever the broker did."""
    port = free_port()
    pub = make(port, state_dir)
    for _ in range(2):  # the second failure is the same clean error, not paho's
        with pytest.raises(BrokerConnectionError, match="cannot reach the broker"):
            pub.connect(2)
    _connects_and_publishes_once_a_broker_listens(pub, port, closing, b"back")


def test_a_closed_publisher_neither_connects_nor_starts(state_dir: Path) -> None:
    """``close()`` released the outbox and the sequence file and stopped the sender: a later
    ``connect()`` or ``start()`` connected anyway, and ``start()`` left paho's network thread
    retrying for ever for a publisher that could send nothing."""
    pub = make(free_port(), state_dir)
    pub.close()
    with pytest.raises(StoreError, match="publisher is closed"):
        pub.connect(1)
    with pytest.raises(StoreError, match="publisher is closed"):
        pub.start()
    time.sleep(0.2)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]


def test_qos0_while_disconnected_raises_and_queues_nothing(state_dir: Path) -> None:
    pub = make(free_port(), state_dir)
    with pytest.raises(BrokerConnectionError):
        pub.publish("data/temp", b"x", qos=0)
    assert pub.pending == 0
    pub.close()


@pytest.mark.parametrize(
    ("topic", "payload", "qos"),
    [
        ("blendsm/ctl/x/voucher", b"x", 1),
        ("data/+", b"x", 1),
        ("data/#", b"x", 0),
        ("", b"x", 1),
        ("data/t", "text", 1),
        ("data/t", b"x", 3),
    ],
)
def test_bad_publishes_are_config_errors(
    state_dir: Path, topic: str, payload: Any, qos: int
) -> None:
    pub = make(free_port(), state_dir)
    with pytest.raises(ConfigError):
        pub.publish(topic, payload, qos=qos)
    assert pub.pending == 0
    pub.close()


def test_state_dir_is_exclusive(state_dir: Path) -> None:
    pub = make(free_port(), state_dir)
    with pytest.raises(ConfigError, match="in use"):
        make(free_port(), state_dir)
    pub.close()
    make(free_port(), state_dir).close()  # free again once closed
    other = Account.from_key(bytes.fromhex("7c" * 32))
    with pytest.raises(ConfigError, match="belongs to device"):
        make(free_port(), state_dir, account=other)


def test_broker_down_queues_on_disk_then_delivers_exactly_once_in_order(
    state_dir: Path,
) -> None:
    port = free_port()
    pub = make(port, state_dir, max_pending=30)
    pub.start()  # keeps retrying in the background with jittered backoff
    sequences = [pub.publish("data/queued", b"%d" % i) for i in range(30)]
    with pytest.raises(OutboxFullError) as full:
        pub.publish("data/queued", b"one too many")
    assert (full.value.pending, full.value.max_messages) == (30, 30)
    assert pub.pending == 30
    assert not pub.connected
    with pytest.raises(BrokerConnectionError, match="30 messages still in the outbox"):
        pub.flush(0.2)

    DEVICE_GATE.clear()  # the reader subscribes before the device gets in
    broker = StockBroker(port).start()
    reader = Reader(port)
    try:
        DEVICE_GATE.set()
        pub.flush(5)
        got = reader.take(30)
        assert reader.quiet()
        assert [e.sequence for _, e in got] == sequences == list(range(1, 31))
        assert [e.payload for _, e in got] == [b"%d" % i for i in range(30)]
        assert pub.pending == 0
    finally:
        pub.close()
        reader.close()
        broker.close()


def test_outbox_bounded_by_bytes(state_dir: Path) -> None:
    pub = make(free_port(), state_dir, max_pending_bytes=1000)
    pub.publish("data/big", bytes(500))
    with pytest.raises(OutboxFullError, match="refused"):
        pub.publish("data/big", bytes(500))
    assert pub.pending == 1
    pub.publish("data/big", bytes(100))  # still fits
    assert pub.pending == 2
    pub.close()


def test_broker_restart_mid_stream_loses_nothing(state_dir: Path) -> None:
    port = free_port()
    DEVICE_GATE.set()
    broker = StockBroker(port).start()
    reader = Reader(port)
    pub = make(port, state_dir)
    published: list[int] = []
    try:
        pub.connect(5)
        published += [pub.publish("data/stream", b"%d" % i) for i in range(40)]
        received = [e.sequence for _, e in reader.take(40)]
        # Stopped between deliveries, a QoS 1 delivery to the reader possibly in flight;
        # amqtt may drop what it acked but not yet broadcast, not the publisher's doing.
        broker.stop(3)  # every message stays in the outbox until its PUBACK
        published += [pub.publish("data/stream", b"%d" % i) for i in range(40, 80)]
        assert pub.pending >= 40
        DEVICE_GATE.clear()
        broker.start()
        reader.subscribed.clear()
        assert reader.subscribed.wait(5)  # the reader resubscribed after its reconnect
        DEVICE_GATE.set()
        pub.flush(5)
        while set(received) != set(published):
            received.append(reader.got.get(timeout=5)[1].sequence)
        assert reader.quiet()
        # Duplicates (a resend of what the old broker had already delivered) are allowed
        # because subscribers detect them by sequence; losses are not.
        assert set(received) == set(published) == set(range(1, 81))
    finally:
        pub.close()
        reader.close()
        broker.close()


_CRASHING_DEVICE = """
import os, signal, sys
from blendsm.device_sdk import Publisher
pub = Publisher(
    bytes.fromhex("6b" * 32), host="127.0.0.1", port=int(sys.argv[1]), broker="0x" + "22" * 20,
    chain_id=31337, registry="0x" + "5b" * 20, state_dir=sys.argv[2], sequence_block=8,
)
print(",".join(str(pub.publish("data/crash", b"%d" % i)) for i in range(5)), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(): exact counters never written
"""


def test_kill_restart_never_reuses_a_sequence_and_keeps_the_outbox(
    broker: _StockBroker, reader: Reader, state_dir: Path
) -> None:
    DEVICE_GATE.set()
    dead = free_port()  # the crashing device never reaches a broker
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CRASHING_DEVICE), str(dead), str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    before = [int(s) for s in out.stdout.strip().split(",")]
    assert before == [1, 2, 3, 4, 5]

    # A new Publisher on the same state_dir, also without a clean close in between.
    pub = make(broker.port, state_dir, sequence_block=8)
    assert pub.pending == 5  # the durable outbox survived the kill
    after = [pub.publish("data/crash", b"new") for _ in range(3)]
    assert min(after) > max(before)  # may skip (to the reservation, 9), never repeat
    assert after == [9, 10, 11]
    pub.connect(5)
    pub.flush(5)
    got = [e.sequence for _, e in reader.take(8)]
    assert got == before + after
    pub.close()

    # After a clean close the exact counter is kept: no gap.
    pub = make(broker.port, state_dir, sequence_block=8)
    assert pub.publish("data/crash", b"x") == 12
    pub.close()
    assert os.path.exists(state_dir / "outbox.sqlite3")


def test_from_env_and_keystore(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BSM_TEST_DEVICE_KEY", "0x" + "6b" * 32)
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "broker": OPERATOR,
        "chain_id": CHAIN_ID,
        "registry": REGISTRY,
    }
    pub = Publisher.from_env("BSM_TEST_DEVICE_KEY", state_dir=state_dir, **kwargs)
    assert pub.address == DEVICE.address
    pub.close()
    keystore = state_dir.parent / "key.json"
    keystore.write_text(json.dumps(Account.encrypt(DEVICE.key, "pw", iterations=2)))
    monkeypatch.setenv("BSM_TEST_PW", "pw")
    pub = Publisher.from_keystore(keystore, "BSM_TEST_PW", state_dir=state_dir, **kwargs)
    assert pub.address == DEVICE.address
    pub.close()


def test_on_acknowledged_reports_each_acknowledged_message_with_its_sequence(
    broker: _StockBroker, reader: Reader, state_dir: Path
) -> None:
    """PUBACK (QoS 1) and PUBCOMP (QoS 2) are reported once per message, with the sequence
    number publish() returned, after the message left the outbox; QoS 0 has no ack."""
    acks: queue.Queue[tuple[Any, Acknowledgement, int]] = queue.Queue()
    with make(broker.port, state_dir, callback_api_version=PublisherCallbackAPI.VERSION1) as pub:
        pub.on_acknowledged = lambda p, ack: acks.put((p, ack, p.pending))
        sent = [
            ("data/a", pub.publish("data/a", b"1", qos=1), 1),
            ("data/b", pub.publish("data/b", b"2", qos=2), 2),
            ("data/a", pub.publish("data/a", b"3", qos=1), 1),
        ]
        pub.publish("data/a", b"fire and forget", qos=0)
        pub.flush(5)
        got = [acks.get(timeout=5) for _ in sent]
        reader.take(4)
        time.sleep(0.3)
        assert acks.empty()  # nothing for QoS 0, nothing twice
    assert all(p is pub for p, _, _ in got)
    assert sorted((a.topic, a.sequence, a.qos) for _, a, _ in got) == sorted(sent)
    assert [a.sequence for _, a, _ in got if a.topic == "data/a"] == [1, 2]
    # Reported once it left the outbox: what is still pending never includes it.
    assert all(pending <= len(sent) - 1 for _, _, pending in got)


def test_on_acknowledged_errors_are_logged_and_delivery_goes_on(
    broker: _StockBroker, reader: Reader, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_p: Any, _a: Acknowledgement) -> None:
        raise RuntimeError("callback bug")

    with make(broker.port, state_dir) as pub:
        pub.on_acknowledged = boom
        for i in range(3):
            pub.publish("data/a", b"%d" % i)
        pub.flush(5)
        assert [e.sequence for _, e in reader.take(3)] == [1, 2, 3]
    assert "error in on_acknowledged" in caplog.text


def test_an_unknown_callback_api_version_is_refused(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="callback_api_version"):
        make(1, state_dir, callback_api_version=2)


def test_connect_while_start_waits_for_a_connack(
    state_dir: Path, closing: Callable[[Reader], Reader]
) -> None:
    """``start()``'s attempt is connected and waiting for its CONNACK when the application
    calls ``connect()``: closing that attempt must not count as this call's connection
    closing (it failed at once with "closed the connection before any CONNACK")."""
    port = free_port()
    silent = socket.create_server(("127.0.0.1", port))
    pub = make(port, state_dir)
    pub.start()
    silent.settimeout(5)
    held, _ = silent.accept()  # start()'s attempt: its CONNECT is never answered
    silent.close()
    try:
        _connects_and_publishes_once_a_broker_listens(pub, port, closing, b"mine")
    finally:
        held.close()


def test_connect_works_after_start_retried_in_vain(
    state_dir: Path, closing: Callable[[Reader], Reader]
) -> None:
    """``start()``'s background retries left paho's connection marked as opening: a
    blocking ``connect()`` afterwards raised paho's RuntimeError instead of connecting."""
    port = free_port()
    pub = make(port, state_dir)
    pub.start()
    deadline = time.monotonic() + 10
    while pub.tokens_issued < 2 and time.monotonic() < deadline:  # two attempts failed
        time.sleep(0.05)
    assert pub.tokens_issued >= 2
    _connects_and_publishes_once_a_broker_listens(pub, port, closing, b"up")


def test_connect_works_again_after_a_refusal(broker: _StockBroker, state_dir: Path) -> None:
    """The refused attempt's connection is closed, not left marked open: the device is
    admitted on its next connect (e.g. once enrolled)."""
    REFUSED_USERS.add(DEVICE.address)
    pub = make(broker.port, state_dir)
    with pytest.raises(BrokerRefusedError):
        pub.connect(5)
    REFUSED_USERS.clear()
    pub.connect(5)
    pub.close()
