"""Integrity end to end: a device signs at the edge, the real BlendSM broker anchors leaves
on anvil, and an SDK Subscriber checks every message and samples inclusion proofs against
the root it reads from the chain itself. Then the broker turns hostile (a wrapped delivery
path or proof service alters, drops, reorders, replays, forges or lies about roots) and the
subscriber must say so.

Anvil only: the SDK reads the chain from its own worker thread, and eth-tester is not
thread-safe."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import enrol

from blendsm.broker import MeteredHandler
from blendsm.device_sdk import (
    EnvelopeSigner,
    IntegrityEvent,
    IntegrityKind,
    MessageDomain,
    Proof,
    Publisher,
    ReceivedMessage,
    Refusal,
    Subscriber,
    Web3ChainReader,
    decode_envelope,
    keccak256,
    new_topic_key,
    open_sealed,
    seal,
)
from blendsm.errors import EnvelopeError

TOPIC = "integrity/temp"
COUNT = 6

Market = Any
Tamper = Callable[..., Awaitable[Any]]
Answer = Callable[[Any], Awaitable[Any]]


@dataclass
class Stream:
    """A verifying subscriber and a signing device on the free market topic ``TOPIC``."""

    market: Market
    sub: Subscriber
    device: Publisher
    record: Path
    until: Any
    messages: list[ReceivedMessage] = field(default_factory=list)
    events: list[IntegrityEvent] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    errors: list[Exception] = field(default_factory=list)

    def kinds(self, *only: IntegrityKind) -> list[IntegrityKind]:
        return [e.kind for e in self.events if not only or e.kind in only]

    async def publish(self, count: int = COUNT) -> list[int]:
        def run() -> list[int]:
            seqs = [self.device.publish(TOPIC, b"reading %d" % i, qos=1) for i in range(count)]
            self.device.flush(10)
            return seqs

        return await asyncio.to_thread(run)

    async def delivered(self, count: int) -> list[int]:
        """Publish ``count`` more messages and wait until the subscriber has checked them."""
        total = len(self.messages) + count
        seqs = await self.publish(count)
        await self.wait(lambda: len(self.messages) == total)
        await self.idle()
        return seqs

    async def ask(self, sequence: int, within: float = 10.0, device: str | None = None) -> Any:
        """The subscriber's on-demand proof check of the device's message ``sequence``."""
        device = device or self.market.chain.addr("device")
        return await asyncio.to_thread(self.sub.request_proof, TOPIC, device, sequence, within)

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        assert await self.until(predicate, within), (self.messages, self.events)

    async def idle(self) -> None:
        assert await asyncio.to_thread(self.sub.wait_idle, 10)

    async def anchor(self) -> None:
        records = await self.market.service.anchorer.anchor_now()
        assert records, "nothing was anchored"


@pytest.fixture
async def stream(market: Market, until: Any, tmp_path: Path) -> AsyncIterator[Stream]:
    mp = market.mp
    await mp("seller").market.create_topic(TOPIC, 0)
    await market.wait_view(lambda: market.service.view.topic_for_name(TOPIC) is not None)
    record = tmp_path / "record.jsonl"
    sub = market.proving_subscriber(record)
    device = market.sdk_publisher(tmp_path / "device")
    s = Stream(market, sub, device, record, until)

    def on_message(_s: Subscriber, m: ReceivedMessage) -> None:
        s.threads.add(threading.current_thread().name)
        s.messages.append(m)

    sub.on_message = on_message
    sub.on_integrity = lambda _s, e: s.events.append(e)
    sub.on_error = lambda _s, exc: s.errors.append(exc)
    await asyncio.to_thread(sub.connect)
    assert await asyncio.to_thread(sub.subscribe, TOPIC) == 0
    await asyncio.to_thread(device.connect)
    try:
        yield s
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(device.close)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(sub.disconnect)


def _sequence(data: bytes | bytearray) -> int | None:
    try:
        return decode_envelope(data).sequence
    except EnvelopeError:
        return None


def tamper_delivery(monkeypatch: pytest.MonkeyPatch, tamper: Tamper, topic: str = TOPIC) -> None:
    """Route every delivery on ``topic`` through ``tamper(send, data, sequence)``, where
    ``send(data)`` is the honest broker's delivery of ``data``."""
    original = MeteredHandler.mqtt_publish

    async def mqtt_publish(
        self: Any,
        name: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> Any:
        async def send(payload: bytes | bytearray) -> Any:
            return await original(self, name, payload, qos, retain, ack_timeout)

        if name != topic:
            return await send(data)
        return await tamper(send, bytes(data), _sequence(data))

    monkeypatch.setattr(MeteredHandler, "mqtt_publish", mqtt_publish)


def answer_proofs(
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[Answer, Any], Awaitable[Any]],
) -> None:
    """The broker answers proof requests with ``answer(honest, request)``, where
    ``honest(request)`` is what the honest broker would have answered."""
    anchorer = stream.market.service.anchorer
    honest = anchorer.answer

    async def answering(request: Any) -> Any:
        return await answer(honest, request)

    monkeypatch.setattr(anchorer, "answer", answering)


def _records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# --------------------------------------------------------------------------- honest


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_honest_stream_is_verified_and_every_sampled_proof_matches_the_chain_root(
    stream: Stream,
) -> None:
    seqs = await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT)
    device = stream.market.chain.addr("device")
    assert [(m.payload, m.device, m.sequence, m.verified) for m in stream.messages] == [
        (b"reading %d" % i, device, seq, True) for i, seq in enumerate(seqs)
    ]
    await stream.idle()
    assert stream.events == []
    assert stream.threads == {f"blendsm-verify-{stream.sub.client_id}"}  # not paho's
    assert stream.sub.pending_proofs() == COUNT

    await stream.anchor()
    await stream.wait(lambda: len(stream.events) == COUNT)
    assert stream.kinds() == [IntegrityKind.PROOF_VERIFIED] * COUNT
    assert sorted(e.sequence for e in stream.events if e.sequence is not None) == seqs
    batch = stream.events[0].batch_id
    assert batch is not None
    info = await stream.market.mp("buyer").anchors.anchor_of(
        stream.market.chain.addr("operator"), batch
    )
    assert info is not None
    assert info.root.hex() in stream.events[0].detail  # checked against the chain's root
    assert stream.sub.pending_proofs() == 0

    # On demand, for a message already proven by sampling: the same verdict.
    again = await asyncio.to_thread(stream.sub.request_proof, TOPIC, device, seqs[2], 10)
    assert again.kind is IntegrityKind.PROOF_VERIFIED
    assert stream.sub.stats.verified_messages == COUNT

    await asyncio.to_thread(stream.sub.disconnect)
    lines = _records(stream.record)
    messages = [x for x in lines if x["type"] == "message"]
    proofs = [x for x in lines if x["type"] == "proof"]
    assert [_sequence(bytes.fromhex(m["envelope"][2:])) for m in messages] == seqs
    assert all(m["topic"] == TOPIC and m["verified"] is True for m in messages)
    assert sorted(x["sequence"] for x in proofs) == sorted([*seqs, seqs[2]])
    assert all(x["verdict"] == "proof_verified" and x["batch"] == batch for x in proofs)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_proof_requested_before_anchoring_is_unavailable_then_verified(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream.sub.proof_sampling = 0.0  # on demand only
    seqs = await stream.delivered(3)
    early = await stream.ask(seqs[0])
    assert early.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "proof_unavailable" in early.detail
    await stream.anchor()
    device = stream.market.chain.addr("device")
    late = await stream.ask(seqs[0], device=device.lower())
    assert late.kind is IntegrityKind.PROOF_VERIFIED
    assert (late.topic, late.device, late.sequence) == (TOPIC, device, seqs[0])
    never = await stream.ask(99)
    assert never.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "not received" in never.detail
    assert stream.kinds() == [IntegrityKind.PROOF_UNAVAILABLE, IntegrityKind.PROOF_VERIFIED]


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_unavailable_proofs_stay_pending_then_are_reported(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that anchors but never proves: a sampled message stays pending through
    ``proof_attempts`` anchor notices, then it is reported unavailable, once."""
    asked: list[Any] = []

    async def refuse(_honest: Answer, request: Any) -> Any:
        asked.append(request)
        return Refusal("proof_unavailable", "not anchored", request_id=request.request_id)

    answer_proofs(stream, monkeypatch, refuse)
    stream.sub.proof_attempts = 2
    await stream.delivered(1)
    stream.sub.proof_sampling = 0.0  # only the first message waits for a proof
    for notice in (1, 2):
        await stream.publish(1)  # a new leaf, so the next anchor is a new batch, a new notice
        await stream.anchor()
        await stream.wait(lambda n=notice: len(asked) == n)
        await stream.idle()
        assert stream.sub.pending_proofs() == 1
        assert stream.events == []
    await stream.publish(1)
    await stream.anchor()
    await stream.wait(lambda: len(stream.events) == 1)
    assert stream.kinds() == [IntegrityKind.PROOF_UNAVAILABLE]
    assert "after 2 anchor notices" in stream.events[0].detail
    assert stream.events[0].sequence == 1
    assert stream.sub.pending_proofs() == 0
    assert len(asked) == 2  # not asked again after giving up


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_request_proof_times_out_without_an_answer(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(honest: Answer, request: Any) -> Any:  # long after the buyer stopped waiting
        await asyncio.sleep(3)
        return await honest(request)

    answer_proofs(stream, monkeypatch, slow)
    seqs = await stream.delivered(1)
    event = await stream.ask(seqs[0], within=0.5)
    assert event.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "no answer" in event.detail


# --------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_an_altered_payload_byte_is_a_bad_signature(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def alter(send: Any, data: bytes, seq: int | None) -> Any:
        if seq == 3:
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        return await send(data)

    tamper_delivery(monkeypatch, alter)
    await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT)
    await stream.idle()
    assert [m.verified for m in stream.messages] == [True, True, False, True, True, True]
    bad = [e for e in stream.events if e.kind is IntegrityKind.BAD_SIGNATURE]
    assert [(e.sequence, e.device) for e in bad] == [(3, stream.market.chain.addr("device"))]
    # The genuine message 3 never arrived, and that is a gap too.
    gaps = [e.missing for e in stream.events if e.kind is IntegrityKind.GAP]
    assert gaps == [(3, 3)]


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_data_that_is_no_envelope_is_reported_and_skipped_by_the_tracker(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def garble(send: Any, data: bytes, seq: int | None) -> Any:
        return await send(b"not an envelope" if seq == 3 else data)

    tamper_delivery(monkeypatch, garble)
    await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT)
    await stream.idle()
    assert [m.verified for m in stream.messages] == [True, True, False, True, True, True]
    assert stream.messages[2].payload == b"not an envelope"
    assert stream.kinds() == [IntegrityKind.BAD_ENVELOPE, IntegrityKind.GAP]
    assert stream.events[1].missing == (3, 3)  # the garbage did not count as message 3
    assert stream.sub.stats.integrity_events == 2


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_dropped_message_is_a_gap(stream: Stream, monkeypatch: pytest.MonkeyPatch) -> None:
    async def drop(send: Any, data: bytes, seq: int | None) -> Any:
        return None if seq == 4 else await send(data)

    tamper_delivery(monkeypatch, drop)
    await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT - 1)
    await stream.idle()
    assert stream.kinds() == [IntegrityKind.GAP]
    assert stream.events[0].missing == (4, 4)
    assert stream.events[0].sequence == 5
    assert all(m.verified for m in stream.messages)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_two_swapped_messages_are_a_gap_then_a_late_arrival(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[bytes] = []

    async def swap(send: Any, data: bytes, seq: int | None) -> Any:
        if seq == 2:
            held.append(data)
            return None
        sent = await send(data)
        if seq == 3:
            await send(held.pop())
        return sent

    tamper_delivery(monkeypatch, swap)
    await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT)
    await stream.idle()
    assert [m.sequence for m in stream.messages] == [1, 3, 2, 4, 5, 6]
    assert stream.kinds() == [IntegrityKind.GAP, IntegrityKind.REORDER]
    assert stream.events[0].missing == (2, 2)
    assert stream.events[1].sequence == 2


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_replayed_message_is_reported(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def replay(send: Any, data: bytes, seq: int | None) -> Any:
        sent = await send(data)
        if seq == 2:
            await send(data)
        return sent

    tamper_delivery(monkeypatch, replay)
    await stream.publish()
    await stream.wait(lambda: len(stream.messages) == COUNT + 1)
    await stream.idle()
    assert stream.kinds() == [IntegrityKind.REPLAY]
    assert stream.events[0].sequence == 2
    # A replay is authentic data delivered twice: the signature still checks out.
    assert all(m.verified for m in stream.messages)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_message_forged_by_the_broker_is_from_an_unknown_device(stream: Stream) -> None:
    await stream.publish(2)
    await stream.wait(lambda: len(stream.messages) == 2)
    chain = stream.market.chain
    domain = MessageDomain(chain.deployment.chain_id, chain.deployment.address("Registry"))
    forger = EnvelopeSigner(bytes(chain.accounts["stranger"].key), domain)
    forged = forger.sign(TOPIC, b"reading 99", 3, 1).encode()
    await stream.market.service.broker.internal_message_broadcast(TOPIC, forged, 0)
    await stream.wait(lambda: len(stream.messages) == 3)
    await stream.idle()
    assert stream.messages[-1].verified is False
    assert stream.kinds() == [IntegrityKind.UNKNOWN_DEVICE]
    assert stream.events[0].device == chain.addr("stranger")


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_proof_against_a_substituted_root_fails(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lying_answer(honest: Answer, request: Any) -> Any:
        answer = await honest(request)
        if not isinstance(answer, Proof):
            return answer
        # A root of the broker's choosing, with a proof that leads to it.
        sibling = keccak256(b"not in the batch")
        leaf = answer.leaf
        root = keccak256(leaf + sibling if leaf < sibling else sibling + leaf)
        return replace(answer, root=root, proof=(sibling,))

    answer_proofs(stream, monkeypatch, lying_answer)
    await stream.publish(3)
    await stream.wait(lambda: len(stream.messages) == 3)
    await stream.idle()
    await stream.anchor()
    await stream.wait(lambda: len(stream.events) == 3)
    assert stream.kinds() == [IntegrityKind.PROOF_FAILED] * 3
    assert all("not the on-chain root" in e.detail for e in stream.events)
    asked = await stream.ask(1)
    assert asked.kind is IntegrityKind.PROOF_FAILED  # on demand: the same lie, caught


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_keyring_decrypts_encrypted_envelopes_and_reports_missing_epochs(
    stream: Stream,
) -> None:
    keys = {1: new_topic_key(), 2: new_topic_key()}
    held = {1: keys[1]}  # this buyer never got epoch 2 (its right ended)

    class Keyring:
        def decrypt(self, topic: str, payload: bytes) -> bytes:
            return open_sealed(held.get, topic, payload)

    stream.sub.keyring = Keyring()
    epoch = [1]
    stream.device.encryptor = lambda topic, text: seal(keys[epoch[0]], epoch[0], topic, text)
    await stream.delivered(1)
    epoch[0] = 2
    await stream.delivered(1)
    got = stream.messages
    assert [(m.encrypted, m.decrypted, m.verified) for m in got] == [
        (True, True, True),
        (True, False, True),
    ]
    assert got[0].payload == b"reading 0"
    assert b"reading 0" not in got[1].payload
    assert len(stream.errors) == 1
    assert "epoch 2" in str(stream.errors[0])


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_paid_message_with_a_broken_signature_is_not_paid_for(
    market: Market, until: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker alters a paid message in transit: the verifying buyer flags it and
    vouchers only the authentic ones."""

    async def alter(send: Any, data: bytes, seq: int | None) -> Any:
        return await send(data[:-1] + bytes([data[-1] ^ 0x01]) if seq == 2 else data)

    tamper_delivery(monkeypatch, alter, topic=market.topic)
    deployment = market.chain.deployment
    assert market.chain.anvil is not None
    sub = market.sdk_subscriber(
        "buyer",
        pay_every=1,
        registry=deployment.address("Registry"),
        chain_reader=Web3ChainReader(market.chain.anvil.url, deployment),
    )
    got: list[ReceivedMessage] = []
    sub.on_message = lambda _s, m: got.append(m)
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    device = market.sdk_publisher(tmp_path / "device")
    try:
        await asyncio.to_thread(sub.connect)
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        await asyncio.to_thread(device.connect)
        for i in (1, 2, 3):  # paced: one delivery at a time, each within the credit
            await asyncio.to_thread(device.publish, market.topic, b"r%d" % i, qos=1)
            assert await until(lambda n=i: len(got) == n, 10), got
        assert await asyncio.to_thread(sub.wait_idle, 10)
        assert [m.verified for m in got] == [True, False, True]
        assert [m.paid for m in got] == [True, False, True]
        assert sub.vouchered(channel) == 2 * market.price  # not the altered message
        assert sub.stats.unpaid_invalid == 1
    finally:
        await asyncio.to_thread(device.close)
        await asyncio.to_thread(sub.disconnect)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_paid_message_signature_is_recovered_once_by_a_verifying_buyer(
    market: Market, until: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifying buyer checks a paid envelope's signature before paying for it (paho's
    thread); the worker's full check then reuses that envelope instead of decoding it and
    recovering its signer a second time (one ECDSA recovery per message, not two)."""
    from blendsm.device_sdk import verify_envelope as real

    recoveries: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:  # the real check, counted
        recoveries.append(1)
        return real(*args, **kwargs)

    for module in ("_integrity", "_subscriber"):  # the SDK's two callers of the check
        monkeypatch.setattr(f"blendsm.device_sdk.{module}.verify_envelope", counting)
    deployment = market.chain.deployment
    assert market.chain.anvil is not None
    sub = market.sdk_subscriber(
        "buyer",
        pay_every=1,
        registry=deployment.address("Registry"),
        chain_reader=Web3ChainReader(market.chain.anvil.url, deployment),
    )
    got: list[ReceivedMessage] = []
    sub.on_message = lambda _s, m: got.append(m)
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    device = market.sdk_publisher(tmp_path / "device")
    try:
        await asyncio.to_thread(sub.connect)
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        await asyncio.to_thread(device.connect)
        for i in (1, 2, 3):
            await asyncio.to_thread(device.publish, market.topic, b"r%d" % i, qos=1)
            assert await until(lambda n=i: len(got) == n, 10), got
        assert await asyncio.to_thread(sub.wait_idle, 10)
        assert [m.verified for m in got] == [True, True, True]
        assert [m.paid for m in got] == [True, True, True]
        assert sub.vouchered(channel) == 3 * market.price
        assert len(recoveries) == 3  # before: 6, each paid message checked twice
    finally:
        await asyncio.to_thread(device.close)
        await asyncio.to_thread(sub.disconnect)


# --------------------------------------------------------------------------- chain reader


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_web3_chain_reader_reads_the_three_facts_and_caches_all_but_absent_roots(
    chain: Any, mp: Any, tmp_path: Path
) -> None:
    from blendsm.contracts import Role
    from blendsm.errors import ConfigError

    for label, role in (("seller", Role.SELLER), ("operator", Role.OPERATOR)):
        await enrol(mp, chain, label, role)
    await mp("seller").registry.add_device(chain.addr("device"))
    await mp("seller").market.create_topic("reader/topic", 0)
    path = tmp_path / "deployment.json"
    chain.deployment.save(path)
    now = [0.0]
    reader = Web3ChainReader(chain.anvil.url, path, ttl=30, clock=lambda: now[0])
    assert reader.registry == chain.deployment.address("Registry")

    def facts() -> tuple[Any, ...]:
        return (
            reader.seller_of_topic("reader/topic"),
            reader.seller_of_topic("reader/none"),
            reader.active_seller_of(chain.addr("device").lower()),
            reader.active_seller_of(chain.addr("stranger")),
        )

    expected = (chain.addr("seller"), None, chain.addr("seller"), None)
    assert await asyncio.to_thread(facts) == expected
    calls = reader.calls
    assert await asyncio.to_thread(facts) == expected
    assert reader.calls == calls  # all four from the cache, the "none" answers too

    operator = chain.addr("operator")
    assert await asyncio.to_thread(reader.anchor_root, operator, 1) is None
    root = keccak256(b"batch one")
    await mp("operator").anchors.anchor(1, root, 3)
    assert await asyncio.to_thread(reader.anchor_root, operator, 1) == root  # None not cached
    calls = reader.calls
    assert await asyncio.to_thread(reader.anchor_root, operator, 1) == root
    assert reader.calls == calls

    # A revoked device is refused once the cache entry expires.
    await mp("seller").registry.remove_device(chain.addr("device"))
    assert await asyncio.to_thread(reader.active_seller_of, chain.addr("device")) == (
        chain.addr("seller")
    )
    now[0] += 31
    assert await asyncio.to_thread(reader.active_seller_of, chain.addr("device")) is None

    with pytest.raises(ConfigError, match="http"):
        Web3ChainReader("ws://127.0.0.1:1", chain.deployment)
