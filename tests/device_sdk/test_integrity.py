"""Integrity checks in the SDK: the sequence tracker, and the message verifier and proof
checks against a real chain (anvil, read over JSON-RPC by the SDK's own Web3ChainReader, with
sellers, devices, topics and anchored roots put there by real transactions). The Subscriber's
verification worker, proof sampling, proof requests, record file and payments run against the
real broker in tests/integration/test_integrity.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from support import enrol

from blendsm.contracts import Role, free_port
from blendsm.device_sdk import (
    EnvelopeSigner,
    IntegrityKind,
    MerkleTree,
    MessageDomain,
    MessageVerifier,
    Proof,
    SequenceTracker,
    Subscriber,
    Web3ChainReader,
    check_proof,
    message_leaf,
)
from blendsm.errors import ChainUnavailableError, ConfigError

ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)
TOPIC = "market/temp/1"
OTHER_TOPIC = "market/other"
# For the pure proof checks, which need no chain: any domain and key.
DOMAIN = MessageDomain(31337, "0x" + "a1" * 20)
DEVICE = EnvelopeSigner(bytes.fromhex("d1" * 32), DOMAIN)


def signed(
    seq: int, signer: EnvelopeSigner, payload: bytes = b"21.5C", topic: str = TOPIC
) -> bytes:
    return signer.sign(topic, payload, seq, 1_700_000_000_000 + seq).encode()


@dataclass
class OnChain:
    """What the verifier reads, put on the anvil chain: ``seller`` sells ``TOPIC`` and owns
    ``device``; ``other_seller`` (the buyer2 account) sells ``OTHER_TOPIC`` and owns
    ``device2``; ``stranger`` is registered nowhere; ``operator`` may anchor roots."""

    chain: Any
    mp: Callable[[str], Any]
    domain: MessageDomain
    reader: Web3ChainReader
    seller: str
    other_seller: str
    operator: str
    device: EnvelopeSigner
    device2: EnvelopeSigner
    stranger: EnvelopeSigner

    def dead_reader(self) -> Web3ChainReader:
        """A reader of a node that is not there (nothing listens on its port)."""
        port = free_port()
        return Web3ChainReader(f"http://127.0.0.1:{port}", self.chain.deployment, timeout=2.0)


@pytest.fixture
async def onchain(chain: Any, mp: Callable[[str], Any]) -> OnChain:
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    other_seller = await enrol(mp, chain, "buyer2", Role.SELLER)
    operator = await enrol(mp, chain, "operator", Role.OPERATOR)
    await mp("seller").registry.add_device(chain.addr("device"))
    await mp("buyer2").registry.add_device(chain.addr("device2"))
    await mp("seller").market.create_topic(TOPIC, 0)
    await mp("buyer2").market.create_topic(OTHER_TOPIC, 0)
    deployment = chain.deployment
    domain = MessageDomain(deployment.chain_id, deployment.address("Registry"))

    def device(label: str) -> EnvelopeSigner:
        return EnvelopeSigner(bytes(chain.accounts[label].key), domain)

    assert chain.anvil is not None
    return OnChain(
        chain,
        mp,
        domain,
        Web3ChainReader(chain.anvil.url, deployment, timeout=10.0),
        seller,
        other_seller,
        operator,
        device("device"),
        device("device2"),
        device("stranger"),
    )


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
def verifier(onchain: OnChain) -> MessageVerifier:
    return MessageVerifier(onchain.domain, onchain.reader)


@ANVIL
async def test_verifier_accepts_a_message_signed_by_the_sellers_device(
    onchain: OnChain, verifier: MessageVerifier
) -> None:
    v = verifier.check(TOPIC, signed(7, onchain.device, b"reading"))
    assert v.market is True
    assert v.verified is True
    assert v.payload == b"reading"
    assert (v.device, v.sequence) == (onchain.device.address, 7)
    assert v.events == ()
    assert v.envelope is not None
    assert v.leaf == message_leaf(onchain.domain, TOPIC, v.envelope)
    assert v.error is None


@ANVIL
async def test_verifier_passes_non_market_topics_through_unchecked(
    verifier: MessageVerifier,
) -> None:
    v = verifier.check("plain/topic", b"hello")
    assert (v.market, v.verified, v.payload, v.events) == (False, None, b"hello", ())


@ANVIL
async def test_verifier_reports_data_that_is_no_envelope(verifier: MessageVerifier) -> None:
    v = verifier.check(TOPIC, b"21.5C")
    assert v.verified is False
    assert v.payload == b"21.5C"
    assert [e.kind for e in v.events] == [IntegrityKind.BAD_ENVELOPE]


@ANVIL
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d[:-1] + bytes([d[-1] ^ 1]), id="payload byte"),
        pytest.param(lambda d: d[:29] + bytes([d[29] ^ 1]) + d[30:], id="sequence"),
        pytest.param(lambda d: d[:37] + bytes([d[37] ^ 1]) + d[38:], id="timestamp"),
        pytest.param(lambda d: d[:50] + bytes([d[50] ^ 1]) + d[51:], id="signature"),
    ],
)
async def test_verifier_reports_any_altered_byte_as_a_bad_signature(
    onchain: OnChain, verifier: MessageVerifier, tamper: Callable[[bytes], bytes]
) -> None:
    assert verifier.check(TOPIC, signed(2, onchain.device)).verified is True  # unaltered
    v = verifier.check(TOPIC, tamper(signed(3, onchain.device)))
    assert v.verified is False
    assert [e.kind for e in v.events] == [IntegrityKind.BAD_SIGNATURE]
    assert v.leaf is None


@ANVIL
async def test_verifier_reports_a_message_signed_for_another_topic_or_deployment(
    onchain: OnChain, verifier: MessageVerifier
) -> None:
    moved = verifier.check(TOPIC, signed(1, onchain.device, topic=OTHER_TOPIC))
    elsewhere = MessageDomain(onchain.domain.chain_id + 1, onchain.domain.registry)
    other = EnvelopeSigner(bytes(onchain.chain.accounts["device"].key), elsewhere)
    foreign = verifier.check(TOPIC, other.sign(TOPIC, b"x", 1, 1).encode())
    for v in (moved, foreign):
        assert [e.kind for e in v.events] == [IntegrityKind.BAD_SIGNATURE]


@ANVIL
async def test_verifier_reports_devices_that_are_not_the_topic_sellers(
    onchain: OnChain, verifier: MessageVerifier
) -> None:
    others = verifier.check(TOPIC, signed(1, onchain.device2))
    unknown = verifier.check(TOPIC, signed(1, onchain.stranger))
    assert others.verified is False
    assert unknown.verified is False
    assert [e.kind for e in others.events] == [IntegrityKind.UNKNOWN_DEVICE]
    assert onchain.other_seller in others.events[0].detail
    assert [e.kind for e in unknown.events] == [IntegrityKind.UNKNOWN_DEVICE]
    assert "not registered" in unknown.events[0].detail
    # device2 is genuine on its own seller's topic
    assert verifier.check(OTHER_TOPIC, signed(1, onchain.device2, topic=OTHER_TOPIC)).verified


@ANVIL
async def test_a_removed_device_is_refused_once_the_reader_forgets_it(
    onchain: OnChain,
) -> None:
    now = [0.0]
    reader = Web3ChainReader(
        onchain.chain.anvil.url, onchain.chain.deployment, ttl=30, clock=lambda: now[0]
    )
    verifier = MessageVerifier(onchain.domain, reader)
    assert verifier.check(TOPIC, signed(1, onchain.device)).verified is True
    await onchain.mp("seller").registry.remove_device(onchain.device.address)
    assert verifier.check(TOPIC, signed(2, onchain.device)).verified is True  # cached, ttl
    now[0] += 31
    gone = verifier.check(TOPIC, signed(3, onchain.device))
    assert gone.verified is False
    assert [e.kind for e in gone.events] == [IntegrityKind.UNKNOWN_DEVICE]


@ANVIL
async def test_forged_messages_do_not_move_the_sequence_tracker(
    onchain: OnChain, verifier: MessageVerifier
) -> None:
    device = onchain.device
    assert verifier.check(TOPIC, signed(1, device)).events == ()
    forged = bytearray(signed(2, device))
    forged[-1] ^= 1
    assert verifier.check(TOPIC, bytes(forged)).events[0].kind is IntegrityKind.BAD_SIGNATURE
    assert verifier.check(TOPIC, signed(2, device)).events == ()  # the genuine 2: no replay
    gap = verifier.check(TOPIC, signed(4, device)).events
    assert [(e.kind, e.missing) for e in gap] == [(IntegrityKind.GAP, (3, 3))]
    replay = verifier.check(TOPIC, signed(4, device)).events
    assert [e.kind for e in replay] == [IntegrityKind.REPLAY]


@ANVIL
async def test_verifier_with_the_chain_down_checks_the_signature_and_says_it_could_not_check_more(
    onchain: OnChain,
) -> None:
    verifier = MessageVerifier(onchain.domain, onchain.dead_reader())
    v = verifier.check(TOPIC, signed(1, onchain.device))
    assert v.verified is None
    assert isinstance(v.error, ChainUnavailableError)
    assert v.payload == b"21.5C"
    bad = verifier.check(TOPIC, signed(2, onchain.device)[:-1] + b"X")
    assert bad.verified is False
    assert [e.kind for e in bad.events] == [IntegrityKind.BAD_SIGNATURE]
    not_envelope = verifier.check(TOPIC, b"plain")
    assert (not_envelope.verified, not_envelope.events) == (None, ())


# --------------------------------------------------------------------------- proofs


def _batch(
    n: int = 5,
    batch_id: int = 1,
    index: int = 2,
    device: EnvelopeSigner = DEVICE,
) -> tuple[list[bytes], MerkleTree, Proof, Any]:
    envelopes = [device.sign(TOPIC, b"m%d" % i, i, i) for i in range(1, n + 1)]
    leaves = [message_leaf(device.domain, TOPIC, e) for e in envelopes]
    tree = MerkleTree(leaves)
    target = envelopes[index]
    proof = Proof(
        request_id="r1",
        topic=TOPIC,
        sequence=target.sequence,
        device=device.address,
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


@ANVIL
async def test_verifier_check_proof_reads_the_root_from_the_chain(
    onchain: OnChain, verifier: MessageVerifier
) -> None:
    _, tree, proof, target = _batch(batch_id=1, device=onchain.device)
    operator = onchain.operator
    assert verifier.check_proof(operator, TOPIC, target, proof).kind is (
        IntegrityKind.PROOF_UNAVAILABLE
    )
    await onchain.mp("operator").anchors.anchor(1, tree.root, len(tree.leaves))
    assert verifier.check_proof(operator, TOPIC, target, proof).kind is (
        IntegrityKind.PROOF_VERIFIED
    )
    tampered = replace(target, payload=b"changed")
    assert verifier.check_proof(operator, TOPIC, tampered, proof).kind is (
        IntegrityKind.PROOF_FAILED
    )
    elsewhere = replace(proof, batch_id=2)  # a batch this broker never anchored
    assert verifier.check_proof(operator, TOPIC, target, elsewhere).kind is (
        IntegrityKind.PROOF_UNAVAILABLE
    )
    down = MessageVerifier(onchain.domain, onchain.dead_reader()).check_proof(
        operator, TOPIC, target, proof
    )
    assert down.kind is IntegrityKind.PROOF_UNAVAILABLE
    assert "cannot read the root" in down.detail


# --------------------------------------------------------------------------- Subscriber


def test_subscriber_rejects_incomplete_integrity_settings(chain: Any) -> None:
    buyer = chain.accounts["buyer"]
    deployment = chain.deployment
    registry = deployment.address("Registry")
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1883,
        "broker": chain.addr("operator"),
        "chain_id": deployment.chain_id,
        "channels_contract": deployment.address("PaymentChannels"),
    }
    # Made, never asked: a reader dials its node only for a question.
    reader = Web3ChainReader("http://127.0.0.1:1", deployment)
    with pytest.raises(ConfigError, match="both registry and chain_reader"):
        Subscriber(buyer, registry=registry, **common)
    with pytest.raises(ConfigError, match="need verification"):
        Subscriber(buyer, proof_sampling=0.5, **common)
    with pytest.raises(ConfigError, match="proof_sampling"):
        Subscriber(buyer, registry=registry, chain_reader=reader, proof_sampling=1.5, **common)
    elsewhere = MessageDomain(deployment.chain_id + 1, registry)
    with pytest.raises(ConfigError, match="chain id"):
        Subscriber(buyer, verifier=MessageVerifier(elsewhere, reader), **{**common, "chain_id": 1})
    with pytest.raises(ConfigError, match="needs verification"):
        Subscriber(buyer, **common).request_proof(TOPIC, DEVICE.address, 1)
