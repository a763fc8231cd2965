"""Integrity checks in the SDK: the sequence tracker, the message verifier and proof checks
against a fake in-memory chain, and the Subscriber's verification worker, anchor-notice
sampling, proof requests and record file against a stock amqtt broker whose control side
a raw paho client plays. (Against the real broker and chain: tests/integration/test_integrity.py.)"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from eth_account import Account
from paho.mqtt.enums import CallbackAPIVersion
from support import wait_until

from blendsm.device_sdk import (
    ANCHORS_TOPIC,
    AnchorNotice,
    ChainReader,
    EnvelopeSigner,
    IntegrityEvent,
    IntegrityKind,
    MerkleTree,
    MessageDomain,
    MessageVerifier,
    Proof,
    ReceivedMessage,
    Refusal,
    SequenceTracker,
    Subscriber,
    check_proof,
    control_topic,
    decode_proof_request,
    encode_anchor_notice,
    encode_notice,
    message_leaf,
)
from blendsm.errors import ChainUnavailableError, ConfigError

CHAIN_ID = 31337
REGISTRY = "0x" + "a1" * 20
CHANNELS = "0x" + "a2" * 20
DOMAIN = MessageDomain(CHAIN_ID, REGISTRY)
OTHER_DOMAIN = MessageDomain(CHAIN_ID + 1, REGISTRY)
SELLER = Account.from_key(bytes.fromhex("33" * 32)).address
OTHER_SELLER = Account.from_key(bytes.fromhex("34" * 32)).address
OPERATOR = Account.from_key(bytes.fromhex("22" * 32)).address
BUYER = Account.from_key(bytes.fromhex("5a" * 32))
DEVICE = EnvelopeSigner(bytes.fromhex("d1" * 32), DOMAIN)
DEVICE2 = EnvelopeSigner(bytes.fromhex("d2" * 32), DOMAIN)
STRANGER = EnvelopeSigner(bytes.fromhex("d3" * 32), DOMAIN)
TOPIC = "market/temp/1"


class FakeChain:
    """An in-memory :class:`ChainReader`: topics, device owners and anchored roots."""

    def __init__(self) -> None:
        self.topics: dict[str, str] = {TOPIC: SELLER, "market/other": OTHER_SELLER}
        self.owners: dict[str, str] = {DEVICE.address: SELLER, DEVICE2.address: OTHER_SELLER}
        self.roots: dict[tuple[str, int], bytes] = {}
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ChainUnavailableError("node down (test)")

    def seller_of_topic(self, topic: str) -> str | None:
        self._check()
        return self.topics.get(topic)

    def active_seller_of(self, device: str) -> str | None:
        self._check()
        return self.owners.get(device)

    def anchor_root(self, broker: str, batch_id: int) -> bytes | None:
        self._check()
        return self.roots.get((broker, batch_id))


def signed(
    seq: int, payload: bytes = b"21.5C", signer: EnvelopeSigner = DEVICE, topic: str = TOPIC
) -> bytes:
    return signer.sign(topic, payload, seq, 1_700_000_000_000 + seq).encode()


# --------------------------------------------------------------------------- tracker


def test_tracker_in_order_stream_reports_nothing_and_first_message_sets_the_baseline() -> None:
    t = SequenceTracker()
    assert [t.observe("d", "t", s) for s in (41, 42, 43)] == [None, None, None]
    assert t.last("d", "t") == 43


def test_tracker_reports_a_gap_with_its_range() -> None:
    t = SequenceTracker()
    t.observe("d", "t", 1)
    gap = t.observe("d", "t", 5)
    assert gap is not None
    assert gap.kind is IntegrityKind.GAP
    assert gap.missing == (2, 4)
    assert gap.sequence == 5
    assert "3 messages missing" in gap.detail
    single = t.observe("d", "t", 7)
    assert single is not None
    assert single.missing == (6, 6)


def test_tracker_reports_duplicates_and_old_numbers_as_replays() -> None:
    t = SequenceTracker()
    for s in (1, 2, 3):
        t.observe("d", "t", s)
    dup = t.observe("d", "t", 3)
    old = t.observe("d", "t", 1)
    assert dup is not None
    assert dup.kind is IntegrityKind.REPLAY
    assert "duplicate" in dup.detail
    assert old is not None
    assert old.kind is IntegrityKind.REPLAY
    assert t.last("d", "t") == 3


def test_tracker_tells_a_late_message_from_a_replay() -> None:
    t = SequenceTracker()
    kinds = [t.observe("d", "t", s) for s in (1, 2, 4, 3, 5, 3)]
    assert kinds[:2] == [None, None]
    assert kinds[2] is not None
    assert kinds[2].kind is IntegrityKind.GAP
    assert kinds[3] is not None
    assert kinds[3].kind is IntegrityKind.REORDER
    assert kinds[4] is None
    assert kinds[5] is not None
    assert kinds[5].kind is IntegrityKind.REPLAY


def test_tracker_splits_a_gap_filled_in_the_middle() -> None:
    t = SequenceTracker()
    t.observe("d", "t", 1)
    t.observe("d", "t", 10)  # 2..9 missing
    for late in (5, 2, 9):
        e = t.observe("d", "t", late)
        assert e is not None
        assert e.kind is IntegrityKind.REORDER
    for again in (5, 2, 9):
        e = t.observe("d", "t", again)
        assert e is not None
        assert e.kind is IntegrityKind.REPLAY
    e = t.observe("d", "t", 3)
    assert e is not None
    assert e.kind is IntegrityKind.REORDER


def test_tracker_streams_are_per_device_and_topic_and_bounded() -> None:
    t = SequenceTracker(max_streams=2)
    assert t.observe("d1", "t", 5) is None
    assert t.observe("d2", "t", 1) is None
    assert t.observe("d1", "u", 9) is None  # d1/t is forgotten (least recently seen)
    assert t.last("d1", "t") is None
    assert t.observe("d1", "t", 1) is None  # a fresh baseline, not a replay


# --------------------------------------------------------------------------- verifier


@pytest.fixture
def fake() -> FakeChain:
    return FakeChain()


@pytest.fixture
def verifier(fake: FakeChain) -> MessageVerifier:
    assert isinstance(fake, ChainReader)
    return MessageVerifier(DOMAIN, fake)


def test_verifier_accepts_a_message_signed_by_the_sellers_device(
    verifier: MessageVerifier,
) -> None:
    data = signed(7, b"reading")
    v = verifier.check(TOPIC, data)
    assert v.market is True
    assert v.verified is True
    assert v.payload == b"reading"
    assert (v.device, v.sequence) == (DEVICE.address, 7)
    assert v.events == ()
    assert v.envelope is not None
    assert v.leaf == message_leaf(DOMAIN, TOPIC, v.envelope)
    assert v.error is None


def test_verifier_passes_non_market_topics_through_unchecked(verifier: MessageVerifier) -> None:
    v = verifier.check("plain/topic", b"hello")
    assert (v.market, v.verified, v.payload, v.events) == (False, None, b"hello", ())


def test_verifier_reports_data_that_is_no_envelope(verifier: MessageVerifier) -> None:
    v = verifier.check(TOPIC, b"21.5C")
    assert v.verified is False
    assert v.payload == b"21.5C"
    assert [e.kind for e in v.events] == [IntegrityKind.BAD_ENVELOPE]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d[:-1] + bytes([d[-1] ^ 1]), id="payload byte"),
        pytest.param(lambda d: d[:29] + bytes([d[29] ^ 1]) + d[30:], id="sequence"),
        pytest.param(lambda d: d[:37] + bytes([d[37] ^ 1]) + d[38:], id="timestamp"),
        pytest.param(lambda d: d[:50] + bytes([d[50] ^ 1]) + d[51:], id="signature"),
    ],
)
def test_verifier_reports_any_altered_byte_as_a_bad_signature(
    verifier: MessageVerifier, tamper: Callable[[bytes], bytes]
) -> None:
    v = verifier.check(TOPIC, tamper(signed(3)))
    assert v.verified is False
    assert [e.kind for e in v.events] == [IntegrityKind.BAD_SIGNATURE]
    assert v.leaf is None


def test_verifier_reports_a_message_signed_for_another_topic_or_deployment(
    verifier: MessageVerifier,
) -> None:
    moved = verifier.check(TOPIC, signed(1, topic="market/other"))
    other = EnvelopeSigner(bytes.fromhex("d1" * 32), OTHER_DOMAIN)
    foreign = verifier.check(TOPIC, other.sign(TOPIC, b"x", 1, 1).encode())
    for v in (moved, foreign):
        assert [e.kind for e in v.events] == [IntegrityKind.BAD_SIGNATURE]


def test_verifier_reports_devices_that_are_not_the_topic_sellers(
    verifier: MessageVerifier,
) -> None:
    others = verifier.check(TOPIC, signed(1, signer=DEVICE2))
    unknown = verifier.check(TOPIC, signed(1, signer=STRANGER))
    assert others.verified is False
    assert unknown.verified is False
    assert [e.kind for e in others.events] == [IntegrityKind.UNKNOWN_DEVICE]
    assert OTHER_SELLER in others.events[0].detail
    assert [e.kind for e in unknown.events] == [IntegrityKind.UNKNOWN_DEVICE]
    assert "not registered" in unknown.events[0].detail


def test_forged_messages_do_not_move_the_sequence_tracker(verifier: MessageVerifier) -> None:
    assert verifier.check(TOPIC, signed(1)).events == ()
    forged = bytearray(signed(2))
    forged[-1] ^= 1
    assert verifier.check(TOPIC, bytes(forged)).events[0].kind is IntegrityKind.BAD_SIGNATURE
    assert verifier.check(TOPIC, signed(2)).events == ()  # the genuine 2: no replay
    gap = verifier.check(TOPIC, signed(4)).events
    assert [(e.kind, e.missing) for e in gap] == [(IntegrityKind.GAP, (3, 3))]
    replay = verifier.check(TOPIC, signed(4)).events
    assert [e.kind for e in replay] == [IntegrityKind.REPLAY]


def test_verifier_with_the_chain_down_checks_the_signature_and_says_it_could_not_check_more(
    verifier: MessageVerifier, fake: FakeChain
) -> None:
    fake.down = True
    v = verifier.check(TOPIC, signed(1))
    assert v.verified is None
    assert isinstance(v.error, ChainUnavailableError)
    assert v.payload == b"21.5C"
    bad = verifier.check(TOPIC, signed(2)[:-1] + b"X")
    assert bad.verified is False
    assert [e.kind for e in bad.events] == [IntegrityKind.BAD_SIGNATURE]
    not_envelope = verifier.check(TOPIC, b"plain")
    assert (not_envelope.verified, not_envelope.events) == (None, ())


# --------------------------------------------------------------------------- proofs


def _batch(
    n: int = 5, batch_id: int = 1, index: int = 2
) -> tuple[list[bytes], MerkleTree, Proof, Any]:
    envelopes = [DEVICE.sign(TOPIC, b"m%d" % i, i, i) for i in range(1, n + 1)]
    leaves = [message_leaf(DOMAIN, TOPIC, e) for e in envelopes]
    tree = MerkleTree(leaves)
    target = envelopes[index]
    proof = Proof(
        request_id="r1",
        topic=TOPIC,
        sequence=target.sequence,
        device=DEVICE.address,
        leaf=leaves[index],
        proof=tuple(tree.proof(index)),
        batch_id=batch_id,
        root=tree.root,
        tx_hash=None,
        index=index,
    )
    return leaves, tree, proof, target


def test_check_proof_verifies_against_the_chain_root_only() -> None:
    leaves, tree, proof, target = _batch()
    ok = check_proof(TOPIC, DEVICE.address, target.sequence, leaves[2], proof, tree.root)
    assert ok.kind is IntegrityKind.PROOF_VERIFIED
    assert ok.ok
    assert ok.batch_id == 1
    fake_root = bytes(32)
    lied = check_proof(TOPIC, DEVICE.address, target.sequence, leaves[2], proof, fake_root)
    assert lied.kind is IntegrityKind.PROOF_FAILED
    assert "not the on-chain root" in lied.detail
    none = check_proof(TOPIC, DEVICE.address, target.sequence, leaves[2], proof, None)
    assert none.kind is IntegrityKind.PROOF_UNAVAILABLE


def test_check_proof_fails_for_a_substituted_root_another_leaf_or_another_message() -> None:
    leaves, tree, proof, target = _batch()
    other_tree = MerkleTree([*leaves, bytes(32)])
    substituted = replace(proof, root=other_tree.root, proof=tuple(other_tree.proof(2)))
    seq = target.sequence
    assert (
        check_proof(TOPIC, DEVICE.address, seq, leaves[2], substituted, tree.root).kind
        is IntegrityKind.PROOF_FAILED
    )
    # The broker proves another leaf and claims it is ours: our own leaf does not fit.
    wrong_leaf = replace(proof, leaf=leaves[1], proof=tuple(tree.proof(1)))
    failed = check_proof(TOPIC, DEVICE.address, seq, leaves[2], wrong_leaf, tree.root)
    assert failed.kind is IntegrityKind.PROOF_FAILED
    assert "leaf differs" in failed.detail
    other_message = replace(proof, sequence=seq + 1)
    assert (
        check_proof(TOPIC, DEVICE.address, seq, leaves[2], other_message, tree.root).kind
        is IntegrityKind.PROOF_FAILED
    )
    bad_node = replace(proof, proof=(b"short",))
    assert (
        check_proof(TOPIC, DEVICE.address, seq, leaves[2], bad_node, tree.root).kind
        is IntegrityKind.PROOF_FAILED
    )


def test_verifier_check_proof_reads_the_root_from_the_chain(
    verifier: MessageVerifier, fake: FakeChain
) -> None:
    _, tree, proof, target = _batch(batch_id=4)
    assert verifier.check_proof(OPERATOR, TOPIC, target, proof).kind is (
        IntegrityKind.PROOF_UNAVAILABLE
    )
    fake.roots[(OPERATOR, 4)] = tree.root
    assert verifier.check_proof(OPERATOR, TOPIC, target, proof).kind is (
        IntegrityKind.PROOF_VERIFIED
    )
    tampered = replace(target, payload=b"changed")
    assert verifier.check_proof(OPERATOR, TOPIC, tampered, proof).kind is (
        IntegrityKind.PROOF_FAILED
    )
    fake.down = True
    down = verifier.check_proof(OPERATOR, TOPIC, target, proof)
    assert down.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "cannot read the root" in down.detail


# --------------------------------------------------------------------------- Subscriber


class AcceptAll(BaseAuthPlugin):
    async def authenticate(self, *, session: Session) -> bool:
        return True


class StockBroker:
    """A stock amqtt broker on its own event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Any:
            broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
                    "plugins": {f"{__name__}.AcceptAll": {}},
                }
            )
            await broker.start()
            return broker

        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        server = self.broker._servers["default"].instance
        self.port = int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class FakeOperator:
    """Plays the BlendSM broker: relays data, keeps leaves, anchors batches into the fake
    chain, broadcasts anchor notices and answers proof requests (optionally lying)."""

    def __init__(self, port: int, chain: FakeChain) -> None:
        self.chain = chain
        self.leaves: list[tuple[str, bytes, bytes]] = []  # (topic, envelope bytes, leaf)
        self.batches: list[tuple[int, MerkleTree, list[tuple[str, bytes, bytes]]]] = []
        self.requests: queue.Queue[Any] = queue.Queue()
        self.tamper_root = False
        self.refuse = False
        subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-operator")
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        c.subscribe("blendsm/ctl/+/proof", 1)
        assert subscribed.wait(5)
        self.mqtt = c

    def data(self, topic: str, data: bytes, *, leaf: bool = True) -> None:
        if leaf:
            from blendsm.device_sdk import decode_envelope

            self.leaves.append((topic, data, message_leaf(DOMAIN, topic, decode_envelope(data))))
        self.mqtt.publish(topic, data, qos=1).wait_for_publish(5)

    def anchor(self) -> None:
        batch_id = len(self.batches) + 1
        rows, self.leaves = self.leaves, []
        tree = MerkleTree([leaf for _, _, leaf in rows] or [bytes(32)])
        self.batches.append((batch_id, tree, rows))
        self.chain.roots[(OPERATOR, batch_id)] = tree.root
        notice = AnchorNotice(batch_id, tree.root, len(rows), None)
        self.mqtt.publish(ANCHORS_TOPIC, encode_anchor_notice(notice), qos=1).wait_for_publish(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        request = decode_proof_request(msg.payload)
        self.requests.put(request)
        address = msg.topic.split("/")[2]
        answer: Any = Refusal("proof_unavailable", "not anchored", request_id=request.request_id)
        if not self.refuse:
            for batch_id, tree, rows in self.batches:
                for index, (topic, data, leaf) in enumerate(rows):
                    from blendsm.device_sdk import decode_envelope

                    env = decode_envelope(data)
                    if (topic, env.sequence, env.device_address) == (
                        request.topic,
                        request.sequence,
                        request.device,
                    ):
                        root, path = tree.root, tuple(tree.proof(index))
                        if self.tamper_root:
                            lie = MerkleTree([*tree.leaves, bytes(32)])
                            root, path = lie.root, tuple(lie.proof(index))
                        answer = Proof(
                            request.request_id,
                            topic,
                            env.sequence,
                            env.device_address,
                            leaf,
                            path,
                            batch_id,
                            root,
                            None,
                            index,
                        )
        self.mqtt.publish(control_topic(address, "notice"), encode_notice(answer), qos=1)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def stock(closing: Callable[[StockBroker], StockBroker]) -> StockBroker:
    return closing(StockBroker())


@pytest.fixture
def operator(
    stock: StockBroker, fake: FakeChain, closing: Callable[[FakeOperator], FakeOperator]
) -> FakeOperator:
    return closing(FakeOperator(stock.port, fake))


class Seen:
    def __init__(self, sub: Subscriber) -> None:
        self.messages: queue.Queue[ReceivedMessage] = queue.Queue()
        self.events: list[IntegrityEvent] = []
        self.threads: set[str] = set()

        def on_message(_s: Subscriber, m: ReceivedMessage) -> None:
            self.threads.add(threading.current_thread().name)
            self.messages.put(m)

        sub.on_message = on_message
        sub.on_integrity = lambda _s, e: self.events.append(e)

    def take(self, n: int, within: float = 5.0) -> list[ReceivedMessage]:
        return [self.messages.get(timeout=within) for _ in range(n)]

    def kinds(self) -> list[IntegrityKind]:
        return [e.kind for e in self.events]


@pytest.fixture
def make_sub(
    stock: StockBroker, fake: FakeChain
) -> Iterator[Callable[..., tuple[Subscriber, Seen]]]:
    made: list[Subscriber] = []

    def make(**kwargs: Any) -> tuple[Subscriber, Seen]:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": stock.port,
            "broker": OPERATOR,
            "chain_id": CHAIN_ID,
            "channels_contract": CHANNELS,
            "registry": REGISTRY,
            "chain_reader": fake,
            **kwargs,
        }
        sub = Subscriber(BUYER, **options)
        made.append(sub)
        seen = Seen(sub)
        sub.connect(5)
        sub.subscribe("market/#", 1)
        return sub, seen

    yield make
    for sub in made:
        sub.disconnect()


def test_subscriber_rejects_incomplete_integrity_settings(fake: FakeChain) -> None:
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1883,
        "broker": OPERATOR,
        "chain_id": CHAIN_ID,
        "channels_contract": CHANNELS,
    }
    with pytest.raises(ConfigError, match="both registry and chain_reader"):
        Subscriber(BUYER, registry=REGISTRY, **common)
    with pytest.raises(ConfigError, match="need verification"):
        Subscriber(BUYER, proof_sampling=0.5, **common)
    with pytest.raises(ConfigError, match="proof_sampling"):
        Subscriber(BUYER, registry=REGISTRY, chain_reader=fake, proof_sampling=1.5, **common)
    with pytest.raises(ConfigError, match="chain id"):
        Subscriber(BUYER, verifier=MessageVerifier(OTHER_DOMAIN, fake), **{**common, "chain_id": 1})
    with pytest.raises(ConfigError, match="needs verification"):
        Subscriber(BUYER, **common).request_proof(TOPIC, DEVICE.address, 1)


def test_subscriber_delivers_verified_payloads_off_the_network_thread(
    make_sub: Any, operator: FakeOperator
) -> None:
    sub, seen = make_sub()
    for seq in (1, 2, 3):
        operator.data(TOPIC, signed(seq, b"r%d" % seq))
    got = seen.take(3)
    assert [(m.payload, m.device, m.sequence, m.verified) for m in got] == [
        (b"r%d" % s, DEVICE.address, s, True) for s in (1, 2, 3)
    ]
    assert got[0].timestamp_ms == 1_700_000_000_001
    assert seen.threads == {f"blendsm-verify-{sub.client_id}"}
    assert seen.events == []
    assert sub.stats.verified_messages == 3


def test_subscriber_reports_forgery_gaps_replays_and_late_messages(
    make_sub: Any, operator: FakeOperator
) -> None:
    sub, seen = make_sub()
    forged = bytearray(signed(2))
    forged[-1] ^= 0x01
    for data in (signed(1), bytes(forged), signed(2), signed(4), signed(3), signed(4)):
        operator.data(TOPIC, data, leaf=False)
    operator.data(TOPIC, signed(1, signer=STRANGER), leaf=False)
    operator.data(TOPIC, b"not an envelope", leaf=False)
    operator.data("market/free-for-all", b"not a market topic", leaf=False)
    got = seen.take(9)
    assert [m.verified for m in got] == [True, False, True, True, True, True, False, False, None]
    assert got[-1].payload == b"not a market topic"
    assert sub.wait_idle()
    assert seen.kinds() == [
        IntegrityKind.BAD_SIGNATURE,
        IntegrityKind.GAP,
        IntegrityKind.REORDER,
        IntegrityKind.REPLAY,
        IntegrityKind.UNKNOWN_DEVICE,
        IntegrityKind.BAD_ENVELOPE,
    ]
    assert seen.events[1].missing == (3, 3)
    assert sub.stats.integrity_events == 6


def test_sampled_messages_are_proven_after_the_anchor_notice_and_recorded(
    make_sub: Any, operator: FakeOperator, tmp_path: Path
) -> None:
    record = tmp_path / "record.jsonl"
    sub, seen = make_sub(proof_sampling=1.0, record_path=record)
    for seq in (1, 2, 3):
        operator.data(TOPIC, signed(seq))
    seen.take(3)
    assert sub.wait_idle()
    assert sub.pending_proofs() == 3
    operator.anchor()
    wait_until(lambda: len(seen.events) == 3)
    assert seen.kinds() == [IntegrityKind.PROOF_VERIFIED] * 3
    assert {e.sequence for e in seen.events} == {1, 2, 3}
    assert all(e.batch_id == 1 for e in seen.events)
    assert sub.pending_proofs() == 0
    sub.disconnect()
    lines = [orjson.loads(line) for line in record.read_bytes().splitlines()]
    messages = [x for x in lines if x["type"] == "message"]
    proofs = [x for x in lines if x["type"] == "proof"]
    assert [bytes.fromhex(m["envelope"][2:]) for m in messages] == [signed(s) for s in (1, 2, 3)]
    assert all(m["topic"] == TOPIC and m["verified"] is True for m in messages)
    assert sorted(p["sequence"] for p in proofs) == [1, 2, 3]
    assert all(p["verdict"] == "proof_verified" and p["batch"] == 1 for p in proofs)


def test_a_substituted_root_fails_against_the_chain(make_sub: Any, operator: FakeOperator) -> None:
    sub, seen = make_sub(proof_sampling=1.0)
    operator.tamper_root = True
    operator.data(TOPIC, signed(1))
    operator.data(TOPIC, signed(2))
    seen.take(2)
    assert sub.wait_idle()
    operator.anchor()
    wait_until(lambda: len(seen.events) == 2)
    assert seen.kinds() == [IntegrityKind.PROOF_FAILED] * 2
    assert "not the on-chain root" in seen.events[0].detail


def test_unavailable_proofs_stay_pending_then_are_reported(
    make_sub: Any, operator: FakeOperator
) -> None:
    sub, seen = make_sub(proof_sampling=1.0, proof_attempts=2)
    operator.refuse = True
    operator.data(TOPIC, signed(1))
    seen.take(1)
    assert sub.wait_idle()
    for _ in range(2):
        operator.anchor()
        operator.requests.get(timeout=5)
        time.sleep(0.2)
        assert sub.wait_idle()
        assert sub.pending_proofs() == 1
        assert seen.events == []
    operator.anchor()
    wait_until(lambda: len(seen.events) == 1)
    assert seen.kinds() == [IntegrityKind.PROOF_UNAVAILABLE]
    assert "after 2 anchor notices" in seen.events[0].detail
    assert sub.pending_proofs() == 0


def test_request_proof_on_demand(make_sub: Any, operator: FakeOperator) -> None:
    sub, seen = make_sub()
    operator.data(TOPIC, signed(1))
    operator.data(TOPIC, signed(2))
    seen.take(2)
    assert sub.wait_idle()
    early = sub.request_proof(TOPIC, DEVICE.address, 1, timeout=5)
    assert early.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "proof_unavailable" in early.detail
    operator.anchor()
    ok = sub.request_proof(TOPIC, DEVICE.address.lower(), 2, timeout=5)
    assert ok.kind is IntegrityKind.PROOF_VERIFIED
    assert (ok.topic, ok.device, ok.sequence, ok.batch_id) == (TOPIC, DEVICE.address, 2, 1)
    never = sub.request_proof(TOPIC, DEVICE.address, 99, timeout=5)
    assert never.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "not received" in never.detail
    operator.tamper_root = True
    assert sub.request_proof(TOPIC, DEVICE.address, 1, timeout=5).kind is (
        IntegrityKind.PROOF_FAILED
    )
    assert [e.kind for e in seen.events] == [
        IntegrityKind.PROOF_UNAVAILABLE,
        IntegrityKind.PROOF_VERIFIED,
        IntegrityKind.PROOF_FAILED,
    ]


def test_request_proof_times_out_without_an_answer(make_sub: Any, fake: FakeChain) -> None:
    sub, seen = make_sub()  # no operator: nobody answers proof requests
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub")
    publisher.connect("127.0.0.1", sub.port, 30)
    publisher.loop_start()
    try:
        publisher.publish(TOPIC, signed(1), qos=1).wait_for_publish(5)
        seen.take(1)
        assert sub.wait_idle()
        event = sub.request_proof(TOPIC, DEVICE.address, 1, timeout=0.5)
        assert event.kind is IntegrityKind.PROOF_UNAVAILABLE
        assert "no answer" in event.detail
    finally:
        publisher.disconnect()
        publisher.loop_stop()


def test_a_paid_message_with_a_broken_signature_is_not_paid_for(
    make_sub: Any, operator: FakeOperator
) -> None:
    from blendsm.device_sdk import Quote, encode_notice

    sub, seen = make_sub(pay_every=1)
    channel = bytes(range(32))
    quote = Quote(TOPIC, DEVICE.address, channel, 1_000, 5_000, 0, 0)
    notice_topic = control_topic(BUYER.address, "notice")
    operator.mqtt.publish(notice_topic, encode_notice(quote), qos=1).wait_for_publish(5)
    wait_until(lambda: sub.quote(TOPIC) is not None)
    forged = bytearray(signed(2))
    forged[-1] ^= 0x01
    for data in (signed(1), bytes(forged), signed(3)):
        operator.data(TOPIC, data, leaf=False)
    got = seen.take(3)
    assert [m.verified for m in got] == [True, False, True]
    assert [m.paid for m in got] == [True, False, True]
    assert sub.vouchered(channel) == 2_000  # the two authentic messages, not the forged one
    assert sub.stats.unpaid_invalid == 1


def test_a_keyring_decrypts_encrypted_envelopes_and_reports_missing_epochs(
    make_sub: Any, operator: FakeOperator
) -> None:
    from blendsm.device_sdk import FLAG_ENCRYPTED
    from blendsm.device_sdk._crypto import new_topic_key, open_sealed, seal

    keys = {1: new_topic_key(), 2: new_topic_key()}
    held = {1: keys[1]}  # this subscriber never got epoch 2 (its right ended)

    class Keyring:
        def decrypt(self, topic: str, payload: bytes) -> bytes:
            return open_sealed(held.get, topic, payload)

    errors: list[Exception] = []
    sub, seen = make_sub(keyring=Keyring())
    sub.on_error = lambda _s, exc: errors.append(exc)

    def encrypted(seq: int, epoch: int, text: bytes) -> bytes:
        sealed = seal(keys[epoch], epoch, TOPIC, text)
        return DEVICE.sign(TOPIC, sealed, seq, 1_700_000_000_000 + seq, FLAG_ENCRYPTED).encode()

    operator.data(TOPIC, encrypted(1, 1, b"secret one"), leaf=False)
    operator.data(TOPIC, encrypted(2, 2, b"secret two"), leaf=False)
    got = seen.take(2)
    assert [(m.encrypted, m.decrypted, m.verified) for m in got] == [
        (True, True, True),
        (True, False, True),
    ]
    assert got[0].payload == b"secret one"
    assert b"secret two" not in got[1].payload
    assert len(errors) == 1
    assert "epoch 2" in str(errors[0])
