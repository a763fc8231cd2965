"""The control-topic wire protocol's integrity messages: anchor notices, proof requests,
proofs and the ``proof_unavailable`` refusal. Round trips, the conventions (``"v": 1``,
decimal strings, ``0x`` hex), and malformed input that must fail as WireError only."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.device_sdk import (
    ANCHORS_TOPIC,
    CONTROL_ROOT,
    MAX_PROOF_DEPTH,
    PROOF,
    AnchorNotice,
    MerkleTree,
    Proof,
    ProofRequest,
    Receipt,
    Refusal,
    control_topic,
    decode_anchor_notice,
    decode_any_notice,
    decode_notice,
    decode_proof_request,
    encode_anchor_notice,
    encode_notice,
    encode_proof_request,
    is_control_topic,
    leaf_hash,
    parse_control_topic,
    verify_proof,
)
from blendsm.errors import WireError

ADDR = "0x" + "ab" * 20
DEVICE = "0x52908400098527886E0F7030069857D2E4169EE7"  # a checksum address
ROOT = b"\x11" * 32
TX = b"\x22" * 32


def _proof(**kw: object) -> Proof:
    tree = MerkleTree([leaf_hash(bytes([i])) for i in range(5)])
    fields: dict[str, object] = {
        "request_id": "req-1",
        "topic": "sensors/berlin/temp",
        "sequence": 2**64 - 1,
        "device": DEVICE,
        "leaf": tree.leaves[3],
        "proof": tuple(tree.proof(3)),
        "batch_id": 2**200,
        "root": tree.root,
        "tx_hash": TX,
        "index": 3,
    }
    fields.update(kw)
    return Proof(**fields)  # type: ignore[arg-type]


# --- topics -------------------------------------------------------------------------------


def test_topics() -> None:
    assert ANCHORS_TOPIC == "blendsm/anchors"
    assert not is_control_topic(ANCHORS_TOPIC)  # broadcast, not under the control root
    topic = control_topic(ADDR.upper().replace("0X", "0x"), PROOF)
    assert topic == f"{CONTROL_ROOT}/{ADDR}/proof"
    assert parse_control_topic(topic) == (ADDR, "proof")
    assert parse_control_topic(f"{CONTROL_ROOT}/{ADDR}/voucher") == (ADDR, "voucher")
    assert parse_control_topic(f"{CONTROL_ROOT}/{ADDR}/notice") == (ADDR, "notice")
    assert parse_control_topic(f"{CONTROL_ROOT}/{ADDR}/proofs") is None


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("tx", [TX, None])
def test_anchor_notice_round_trip(tx: bytes | None) -> None:
    notice = AnchorNotice(batch_id=7, root=ROOT, leaf_count=1000, tx_hash=tx)
    payload = encode_anchor_notice(notice)
    data = orjson.loads(payload)
    assert data["v"] == 1
    assert data["type"] == "anchor"
    assert data["batch"] == "7"
    assert data["leaves"] == "1000"
    assert data["root"] == "0x" + ROOT.hex()
    assert data["tx"] == (None if tx is None else "0x" + tx.hex())
    assert decode_anchor_notice(payload) == notice


@pytest.mark.parametrize(
    "request_",
    [
        ProofRequest("r1", topic="a/b", sequence=5),
        ProofRequest("r2", topic="a/b", sequence=2**64 - 1, device=DEVICE),
        ProofRequest("r3", leaf=ROOT),
        ProofRequest("r4", topic="a/b", sequence=0, device=DEVICE, leaf=ROOT),
    ],
)
def test_proof_request_round_trip(request_: ProofRequest) -> None:
    payload = encode_proof_request(request_)
    assert orjson.loads(payload)["type"] == "proof_request"
    assert decode_proof_request(payload) == request_


def test_proof_round_trip_and_verifies() -> None:
    proof = _proof()
    payload = encode_notice(proof)
    data = orjson.loads(payload)
    assert data["type"] == "proof"
    assert data["sequence"] == str(2**64 - 1)
    assert data["batch"] == str(2**200)
    decoded = decode_any_notice(payload)
    assert decoded == proof
    assert isinstance(decoded, Proof)
    assert verify_proof(decoded.leaf, decoded.proof, decoded.root)
    # A deep proof (more than a 2 KiB payload) still goes through.
    deep = _proof(proof=(ROOT,) * MAX_PROOF_DEPTH, tx_hash=None)
    payload = encode_notice(deep)
    assert len(payload) > 2048
    assert decode_any_notice(payload) == deep
    with pytest.raises(WireError, match="unknown notice type"):
        decode_notice(encode_notice(proof))  # the old decoder knows only the old notices
    with pytest.raises(WireError, match="more than"):
        encode_notice(_proof(proof=(ROOT,) * (MAX_PROOF_DEPTH + 1)))


def test_refusal_proof_unavailable_and_old_notices() -> None:
    refusal = Refusal("proof_unavailable", "not anchored yet", request_id="req-9")
    payload = encode_notice(refusal)
    assert orjson.loads(payload)["request_id"] == "req-9"
    assert decode_notice(payload) == refusal
    assert decode_any_notice(payload) == refusal
    old = Refusal("not_newer", "already have 1000", b"\x01" * 32, 1000)
    assert "request_id" not in orjson.loads(encode_notice(old))  # old payloads unchanged
    assert decode_any_notice(encode_notice(old)) == old
    receipt = Receipt(b"\x02" * 32, 5)
    assert decode_any_notice(encode_notice(receipt)) == receipt


# --- malformed input ----------------------------------------------------------------------


def _bad(body: dict[str, object]) -> bytes:
    return orjson.dumps({"v": 1, **body})


GOOD_REQUEST = {"type": "proof_request", "request_id": "r", "topic": "a/b", "sequence": "1"}
GOOD_ANCHOR = {"type": "anchor", "batch": "1", "root": "0x" + ROOT.hex(), "leaves": "3", "tx": None}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 65}, "request_id"),
        ({"request_id": 5}, "request_id"),
        ({"topic": "a/+"}, "topic"),
        ({"topic": "a/#"}, "topic"),
        ({"topic": ""}, "topic"),
        ({"sequence": "-1"}, "sequence"),
        ({"sequence": str(2**64)}, "sequence"),
        ({"sequence": 1}, "sequence"),
        ({"device": "0x1234"}, "device"),
        ({"leaf": "0x12"}, "leaf"),
        ({"type": "proof"}, "type"),
        ({"sequence": None}, "sequence"),
    ],
)
def test_proof_request_malformed(change: dict[str, object], match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_proof_request(_bad({**GOOD_REQUEST, **change}))


def test_proof_request_needs_a_target() -> None:
    with pytest.raises(WireError, match="needs a leaf"):
        decode_proof_request(_bad({"type": "proof_request", "request_id": "r", "topic": "a"}))
    with pytest.raises(WireError, match="needs a leaf"):
        encode_proof_request(ProofRequest("r", sequence=3))
    with pytest.raises(WireError, match="version"):
        decode_proof_request(orjson.dumps({**GOOD_REQUEST, "v": 2}))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"batch": "0x1"}, "batch"),
        ({"root": "0x" + "g" * 64}, "root"),
        ({"leaves": str(2**64)}, "leaves"),
        ({"tx": "0x00"}, "tx"),
        ({"type": "anchors"}, "type"),
    ],
)
def test_anchor_notice_malformed(change: dict[str, object], match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_anchor_notice(_bad({**GOOD_ANCHOR, **change}))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"proof": "0x00"}, "proof"),
        ({"proof": ["0x00"]}, "proof item"),
        ({"proof": [5]}, "proof item"),
        ({"proof": ["0x" + "11" * 32] * (MAX_PROOF_DEPTH + 1)}, "elements"),
        ({"index": "x"}, "index"),
        ({"device": "nobody"}, "device"),
        ({"request_id": None}, "request_id"),
    ],
)
def test_proof_malformed(change: dict[str, object], match: str) -> None:
    good = orjson.loads(encode_notice(_proof()))
    with pytest.raises(WireError, match=match):
        decode_any_notice(orjson.dumps({**good, **change}))


def test_oversized_payloads() -> None:
    big_receipt = orjson.dumps(
        {"v": 1, "type": "receipt", "channel": "0x" + "11" * 32, "amount": "1", "pad": "x" * 3000}
    )
    with pytest.raises(WireError, match="too large"):
        decode_any_notice(big_receipt)  # only proofs may exceed 2 KiB
    with pytest.raises(WireError, match="too large"):
        decode_any_notice(b" " * 9000)
    with pytest.raises(WireError, match="too large"):
        decode_proof_request(b" " * 3000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_only_wire_errors(data: bytes) -> None:
    for decode in (decode_anchor_notice, decode_proof_request, decode_any_notice, decode_notice):
        with contextlib.suppress(WireError):
            decode(data)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([GOOD_REQUEST, GOOD_ANCHOR, orjson.loads(encode_notice(_proof()))]),
    st.dictionaries(
        st.sampled_from(
            [
                "type",
                "request_id",
                "topic",
                "sequence",
                "device",
                "leaf",
                "proof",
                "batch",
                "root",
                "tx",
                "index",
                "leaves",
            ]
        ),
        _json_values,
        max_size=3,
    ),
)
def test_mutated_json_only_wire_errors(good: dict[str, object], change: dict[str, object]) -> None:
    payload = _bad({**good, **change})
    for decode in (decode_anchor_notice, decode_proof_request, decode_any_notice):
        with contextlib.suppress(WireError):
            decode(payload)
