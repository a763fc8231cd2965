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
    Subscriber,
    Web3ChainReader,
    decode_envelope,
    keccak256,
)
from blendsm.errors import EnvelopeError

TOPIC = "integrity/temp"
COUNT = 6

Market = Any
Tamper = Callable[..., Awaitable[Any]]


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

    def kinds(self, *only: IntegrityKind) -> list[IntegrityKind]:
        return [e.kind for e in self.events if not only or e.kind in only]

    async def publish(self, count: int = COUNT) -> list[int]:
        def run() -> list[int]:
            seqs = [self.device.publish(TOPIC, b"reading %d" % i, qos=1) for i in range(count)]
            self.device.flush(10)
            return seqs

        return await asyncio.to_thread(run)

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
    sub.on_message = lambda _s, m: s.messages.append(m)
    sub.on_integrity = lambda _s, e: s.events.append(e)
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


def tamper_delivery(monkeypatch: pytest.MonkeyPatch, tamper: Tamper) -> None:
    """Route every delivery on ``TOPIC`` through ``tamper(send, data, sequence)``, where
    ``send(data)`` is the honest broker's delivery of ``data``."""
    original = MeteredHandler.mqtt_publish

    async def mqtt_publish(
        self: Any,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> Any:
        async def send(payload: bytes | bytearray) -> Any:
            return await original(self, topic, payload, qos, retain, ack_timeout)

        if topic != TOPIC:
            return await send(data)
        return await tamper(send, bytes(data), _sequence(data))

    monkeypatch.setattr(MeteredHandler, "mqtt_publish", mqtt_publish)


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
    assert [x["type"] for x in lines].count("message") == COUNT
    assert [x["type"] for x in lines].count("proof") == COUNT + 1
    assert all(x["verdict"] == "proof_verified" for x in lines if x["type"] == "proof")


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_proof_requested_before_anchoring_is_unavailable_then_verified(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream.sub.proof_sampling = 0.0  # on demand only
    seqs = await stream.publish(3)
    await stream.wait(lambda: len(stream.messages) == 3)
    await stream.idle()
    device = stream.market.chain.addr("device")
    early = await asyncio.to_thread(stream.sub.request_proof, TOPIC, device, seqs[0], 10)
    assert early.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "proof_unavailable" in early.detail
    await stream.anchor()
    late = await asyncio.to_thread(stream.sub.request_proof, TOPIC, device, seqs[0], 10)
    assert late.kind is IntegrityKind.PROOF_VERIFIED


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
    anchorer = stream.market.service.anchorer
    honest = anchorer.answer

    async def lying_answer(request: Any) -> Any:
        answer = await honest(request)
        if not isinstance(answer, Proof):
            return answer
        # A root of the broker's choosing, with a proof that leads to it.
        sibling = keccak256(b"not in the batch")
        leaf = answer.leaf
        root = keccak256(leaf + sibling if leaf < sibling else sibling + leaf)
        return replace(answer, root=root, proof=(sibling,))

    monkeypatch.setattr(anchorer, "answer", lying_answer)
    await stream.publish(3)
    await stream.wait(lambda: len(stream.messages) == 3)
    await stream.idle()
    await stream.anchor()
    await stream.wait(lambda: len(stream.events) == 3)
    assert stream.kinds() == [IntegrityKind.PROOF_FAILED] * 3
    assert all("not the on-chain root" in e.detail for e in stream.events)


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
