"""Control-topic wire protocol between the broker and paying subscribers.

Why a separate channel: MQTT 3.1.1 has no message properties, so payment traffic travels as
ordinary PUBLISH packets on a reserved topic tree that the broker intercepts and never
broadcasts::

    blendsm/ctl/<address>/voucher   client -> broker   a signed voucher (JSON)
    blendsm/ctl/<address>/notice    broker -> client   quote, payment request, receipt, refusal,
                                                       proof
    blendsm/ctl/<address>/proof     client -> broker   a proof request (JSON)
    blendsm/anchors                 broker -> anyone   anchor notices (batch id, root, tx)

``<address>`` is the participant's address in lower case; the broker lets a client publish
and subscribe only under its own address. Topics under ``$`` are not usable: amqtt refuses
client PUBLISHes to them.

Payloads are UTF-8 JSON objects with a version field ``"v": 1``. Amounts are decimal strings
(uint256 does not fit JSON numbers or orjson's 64-bit integers); bytes are ``0x`` hex. Every
decoder checks sizes and types and raises :class:`~blendsm.errors.WireError` with the field
name, so a malformed payload is refused cleanly, never half-read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from blendsm.errors import WireError

from ._keccak import checksum_address
from ._key_topics import KEYS_ROOT, key_topic, parse_key_topic
from ._voucher import UINT256_MAX, Voucher

__all__ = [
    "ANCHORS_TOPIC",
    "CONTROL_ROOT",
    "KEYS_ROOT",
    "MAX_CONTROL_PAYLOAD",
    "MAX_PROOF_DEPTH",
    "MAX_PROOF_PAYLOAD",
    "NOTICE",
    "PROOF",
    "RESUME",
    "VOUCHER",
    "AnchorNotice",
    "AnyNotice",
    "Notice",
    "PaymentRequest",
    "Proof",
    "ProofRequest",
    "Quote",
    "Receipt",
    "Refusal",
    "RefusalCode",
    "control_topic",
    "decode_anchor_notice",
    "decode_any_notice",
    "decode_notice",
    "decode_proof_request",
    "decode_voucher",
    "encode_anchor_notice",
    "encode_notice",
    "encode_proof_request",
    "encode_voucher",
    "is_control_topic",
    "key_topic",
    "parse_control_topic",
    "parse_key_topic",
]

CONTROL_ROOT: Final = "blendsm/ctl"
"""Root of the reserved topic tree; never broadcast, never usable for market data."""
VOUCHER: Final = "voucher"
"""Leaf a subscriber publishes its vouchers to."""
NOTICE: Final = "notice"
"""Leaf the broker sends quotes, payment requests, receipts and refusals to."""
PROOF: Final = "proof"
"""Leaf a client publishes proof requests to (the answer comes on :data:`NOTICE`)."""
RESUME: Final = "resume"
"""Leaf a subscriber publishes resume requests to (:mod:`._resume`; answered on :data:`NOTICE`)."""
ANCHORS_TOPIC: Final = "blendsm/anchors"
"""Reserved broadcast topic of anchor notices: anyone may subscribe, only the broker publishes."""
MAX_CONTROL_PAYLOAD: Final = 2048
"""Largest control payload accepted, in bytes (a voucher is about 260)."""
MAX_PROOF_DEPTH: Final = 64
"""Most siblings a proof may carry (a tree of 2**64 leaves)."""
MAX_PROOF_PAYLOAD: Final = 8192
"""Largest proof notice accepted, in bytes (a proof of :data:`MAX_PROOF_DEPTH` fits)."""
_MAX_REQUEST_ID = 64
_MAX_TOPIC = 1024
_UINT64_MAX: Final = 2**64 - 1
PROTOCOL_VERSION: Final = 1

_ADDRESS = re.compile(r"0x[0-9a-f]{40}")
_HEX32 = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX_SIG = re.compile(r"0x[0-9a-fA-F]{130}")
_DIGITS = re.compile(r"[0-9]{1,78}")

RefusalCode = Literal[
    "malformed",
    "wrong_topic",
    "unknown_channel",
    "not_metered_here",
    "not_payer",
    "bad_signature",
    "not_newer",
    "wrong_lane",
    "over_deposit",
    "channel_closing",
    "store_unavailable",
    "proof_unavailable",
    "not_serving",
]


def control_topic(address: str, leaf: str) -> str:
    """``blendsm/ctl/<address lower>/<leaf>``."""
    return f"{CONTROL_ROOT}/{address.lower()}/{leaf}"


def is_control_topic(topic: str) -> bool:
    """Whether ``topic`` (a name or a filter) lies in the reserved tree."""
    return topic == CONTROL_ROOT or topic.startswith(CONTROL_ROOT + "/")


def parse_control_topic(topic: str) -> tuple[str, str] | None:
    """``(address lower, leaf)`` for a well-formed control topic name, else None."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != CONTROL_ROOT:
        return None
    if not _ADDRESS.fullmatch(parts[2]) or parts[3] not in (VOUCHER, NOTICE, PROOF, RESUME):
        return None
    return parts[2], parts[3]


# --------------------------------------------------------------------------- fields


def _load(
    payload: bytes | bytearray | memoryview, limit: int = MAX_CONTROL_PAYLOAD
) -> dict[str, Any]:
    if len(payload) > limit:
        raise WireError(f"control payload too large: {len(payload)} > {limit} bytes")
    try:
        data = orjson.loads(bytes(payload))
    except orjson.JSONDecodeError as exc:
        raise WireError(f"control payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError(f"control payload must be a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise WireError(f"v: unsupported protocol version {version!r} (expected 1)")
    return data


def _str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise WireError(f"{name}: must be a string, got {type(value).__name__}")
    return value


def _amount(data: dict[str, Any], name: str) -> int:
    text = _str(data, name)
    if not _DIGITS.fullmatch(text):
        raise WireError(f"{name}: must be a decimal string of digits, got {text[:80]!r}")
    value = int(text)
    if value > UINT256_MAX:
        raise WireError(f"{name}: {value} does not fit uint256")
    return value


def _bytes32(data: dict[str, Any], name: str) -> bytes:
    text = _str(data, name)
    if not _HEX32.fullmatch(text):
        raise WireError(f"{name}: must be 0x + 64 hex digits, got {text[:80]!r}")
    return bytes.fromhex(text[2:])


def _address(data: dict[str, Any], name: str) -> str:
    text = _str(data, name)
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", text):
        raise WireError(f"{name}: must be an address (0x + 40 hex digits), got {text[:80]!r}")
    return checksum_address(bytes.fromhex(text[2:]))


def _lane_field(lane: str | None) -> dict[str, str]:  # None: a broker before lanes
    return {} if lane is None else {"lane": lane}


def _optional_lane(data: dict[str, Any]) -> str | None:
    return _address(data, "lane") if "lane" in data else None


def _dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, **data})


# --------------------------------------------------------------------------- vouchers


def encode_voucher(voucher: Voucher) -> bytes:
    """The payload a subscriber publishes on ``blendsm/ctl/<address>/voucher``."""
    return _dumps(
        {
            "channel": "0x" + voucher.channel_id.hex(),
            "lane": voucher.lane,
            "amount": str(voucher.cumulative_amount),
            "signature": "0x" + voucher.signature.hex(),
        }
    )


def decode_voucher(payload: bytes | bytearray | memoryview) -> Voucher:
    """Parse a voucher payload (WireError if malformed; the signature is not checked)."""
    data = _load(payload)
    signature = _str(data, "signature")
    if not _HEX_SIG.fullmatch(signature):
        raise WireError(f"signature: must be 0x + 130 hex digits, got {signature[:80]!r}")
    return Voucher(
        _bytes32(data, "channel"),
        _address(data, "lane"),
        _amount(data, "amount"),
        bytes.fromhex(signature[2:]),
    )


# --------------------------------------------------------------------------- notices


@dataclass(frozen=True, slots=True)
class Quote:
    """A paid subscription was granted: what each message on ``topic`` costs and which
    channel the broker meters it on. Sent right after the SUBACK and on price changes."""

    topic: str
    seller: str
    channel_id: bytes
    price: int
    credit: int
    """Most the broker lets the channel owe, in base units."""
    charged: int
    paid: int
    lane: str | None = None  # the broker's lane (its key); charged/paid are that lane's


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """Delivery on ``channel_id`` paused: the credit on ``lane`` is used up; pay ``charged``."""

    channel_id: bytes
    charged: int
    paid: int
    credit: int
    topic: str
    lane: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """A voucher was verified and stored durably; ``amount`` now counts as paid on ``lane``."""

    channel_id: bytes
    amount: int
    lane: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A voucher (or another control message) was refused, with the reason."""

    code: RefusalCode
    detail: str
    channel_id: bytes | None = None
    amount: int | None = None
    request_id: str | None = None
    """The refused :class:`ProofRequest`'s id (``proof_unavailable``), else None."""


@dataclass(frozen=True, slots=True)
class Proof:
    """The answer to a :class:`ProofRequest`: the message's leaf, its Merkle proof and the
    anchored batch it is in. Check it with ``verify_proof(leaf, proof, root)`` and the root
    on chain (``DataAnchors.anchorOf(broker, batch_id)``, or ``verify`` in one call)."""

    request_id: str
    topic: str
    sequence: int
    device: str
    """Checksum address of the device that signed the message."""
    leaf: bytes
    proof: tuple[bytes, ...]
    """Sibling hashes from the leaf up to the root (OpenZeppelin ``MerkleProof`` order)."""
    batch_id: int
    root: bytes
    tx_hash: bytes | None
    """The anchor transaction, None if the broker does not know it (found by reconciling)."""
    index: int
    """The leaf's position in the batch."""


Notice = Quote | PaymentRequest | Receipt | Refusal
AnyNotice = Notice | Proof
"""Everything the broker sends on the notice topic. :func:`decode_notice` keeps returning
:data:`Notice` (a :class:`Proof` only goes to a client that asked for one);
:func:`decode_any_notice` also parses proofs."""


@dataclass(frozen=True, slots=True)
class AnchorNotice:
    """Broadcast on :data:`ANCHORS_TOPIC` when a batch root is anchored on chain."""

    batch_id: int
    root: bytes
    leaf_count: int
    tx_hash: bytes | None
    """The anchor transaction, None if the broker does not know it (found by reconciling)."""


@dataclass(frozen=True, slots=True)
class ProofRequest:
    """A client asks for the proof of one message, by ``topic`` and ``sequence`` (and the
    signing ``device`` when several devices publish on the topic) or by its ``leaf`` hash.
    Published on ``blendsm/ctl/<address>/proof``; the answer (a :class:`Proof` or a
    :class:`Refusal` ``proof_unavailable``) carries the same ``request_id``."""

    request_id: str
    topic: str | None = None
    sequence: int | None = None
    device: str | None = None
    leaf: bytes | None = None


_REFUSAL_CODES: Final = frozenset(RefusalCode.__args__)  # type: ignore[attr-defined]


def encode_notice(notice: AnyNotice) -> bytes:
    """The payload the broker sends on ``blendsm/ctl/<address>/notice``."""
    if isinstance(notice, Proof):
        return _encode_proof(notice)
    if isinstance(notice, Quote):
        return _dumps(
            {
                "type": "quote",
                "topic": notice.topic,
                "seller": notice.seller,
                "channel": "0x" + notice.channel_id.hex(),
                "price": str(notice.price),
                "credit": str(notice.credit),
                "charged": str(notice.charged),
                "paid": str(notice.paid),
                **_lane_field(notice.lane),
            }
        )
    if isinstance(notice, PaymentRequest):
        return _dumps(
            {
                "type": "payment_request",
                "channel": "0x" + notice.channel_id.hex(),
                "charged": str(notice.charged),
                "paid": str(notice.paid),
                "credit": str(notice.credit),
                "topic": notice.topic,
                **_lane_field(notice.lane),
            }
        )
    if isinstance(notice, Receipt):
        return _dumps(
            {
                "type": "receipt",
                "channel": "0x" + notice.channel_id.hex(),
                "amount": str(notice.amount),
                **_lane_field(notice.lane),
            }
        )
    body: dict[str, Any] = {"type": "refused", "code": notice.code, "detail": notice.detail}
    if notice.channel_id is not None:
        body["channel"] = "0x" + notice.channel_id.hex()
    if notice.amount is not None:
        body["amount"] = str(notice.amount)
    if notice.request_id is not None:
        body["request_id"] = notice.request_id
    return _dumps(body)


def decode_notice(payload: bytes | bytearray | memoryview) -> Notice:
    """Parse a notice payload (WireError if malformed or of an unknown type; a
    :class:`Proof` too, see :func:`decode_any_notice`)."""
    return _notice_from(_load(payload))


def _notice_from(data: dict[str, Any]) -> Notice:
    kind = _str(data, "type")
    if kind == "quote":
        return Quote(
            topic=_str(data, "topic"),
            seller=_address(data, "seller"),
            channel_id=_bytes32(data, "channel"),
            price=_amount(data, "price"),
            credit=_amount(data, "credit"),
            charged=_amount(data, "charged"),
            paid=_amount(data, "paid"),
            lane=_optional_lane(data),
        )
    if kind == "payment_request":
        return PaymentRequest(
            channel_id=_bytes32(data, "channel"),
            charged=_amount(data, "charged"),
            paid=_amount(data, "paid"),
            credit=_amount(data, "credit"),
            topic=_str(data, "topic"),
            lane=_optional_lane(data),
        )
    if kind == "receipt":
        return Receipt(
            channel_id=_bytes32(data, "channel"),
            amount=_amount(data, "amount"),
            lane=_optional_lane(data),
        )
    if kind == "refused":
        code = _str(data, "code")
        if code not in _REFUSAL_CODES:
            raise WireError(f"code: unknown refusal code {code[:80]!r}")
        return Refusal(
            code=code,  # type: ignore[arg-type]
            detail=_str(data, "detail"),
            channel_id=_bytes32(data, "channel") if "channel" in data else None,
            amount=_amount(data, "amount") if "amount" in data else None,
            request_id=_request_id(data) if "request_id" in data else None,
        )
    raise WireError(f"type: unknown notice type {kind[:80]!r}")


def decode_any_notice(payload: bytes | bytearray | memoryview) -> AnyNotice:
    """Parse a notice payload, proofs included (WireError if malformed or of unknown type)."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        data = _load(payload, MAX_PROOF_PAYLOAD)
        if data.get("type") != "proof":
            raise WireError(
                f"control payload too large: {len(payload)} > {MAX_CONTROL_PAYLOAD} bytes"
            )
        return _decode_proof(data)
    data = _load(payload)
    if data.get("type") == "proof":
        return _decode_proof(data)
    return _notice_from(data)


# --------------------------------------------------------------------------- integrity


def _uint(data: dict[str, Any], name: str, maximum: int) -> int:
    value = _amount(data, name)
    if value > maximum:
        raise WireError(f"{name}: {value} is above {maximum}")
    return value


def _request_id(data: dict[str, Any]) -> str:
    text = _str(data, "request_id")
    if not 1 <= len(text) <= _MAX_REQUEST_ID or not text.isprintable():
        raise WireError(f"request_id: must be 1 to {_MAX_REQUEST_ID} printable characters")
    return text


def _topic(data: dict[str, Any]) -> str:
    text = _str(data, "topic")
    if not 1 <= len(text) <= _MAX_TOPIC or "+" in text or "#" in text or "\x00" in text:
        raise WireError(
            f"topic: must be a topic name of 1 to {_MAX_TOPIC} characters without wildcards"
        )
    return text


def _tx_hash(data: dict[str, Any]) -> bytes | None:
    if data.get("tx") is None:
        return None
    return _bytes32(data, "tx")


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


def encode_anchor_notice(notice: AnchorNotice) -> bytes:
    """The payload the broker publishes on :data:`ANCHORS_TOPIC`."""
    return _dumps(
        {
            "type": "anchor",
            "batch": str(notice.batch_id),
            "root": "0x" + notice.root.hex(),
            "leaves": str(notice.leaf_count),
            "tx": _hex(notice.tx_hash),
        }
    )


def decode_anchor_notice(payload: bytes | bytearray | memoryview) -> AnchorNotice:
    """Parse an anchor notice (WireError if malformed)."""
    data = _load(payload)
    kind = _str(data, "type")
    if kind != "anchor":
        raise WireError(f"type: expected 'anchor', got {kind[:80]!r}")
    return AnchorNotice(
        batch_id=_amount(data, "batch"),
        root=_bytes32(data, "root"),
        leaf_count=_uint(data, "leaves", _UINT64_MAX),
        tx_hash=_tx_hash(data),
    )


def encode_proof_request(request: ProofRequest) -> bytes:
    """The payload a client publishes on ``blendsm/ctl/<address>/proof``.

    Raises WireError unless the request names a leaf, or a topic and a sequence."""
    body: dict[str, Any] = {"type": "proof_request", "request_id": request.request_id}
    if request.topic is not None:
        body["topic"] = request.topic
    if request.sequence is not None:
        body["sequence"] = str(request.sequence)
    if request.device is not None:
        body["device"] = request.device
    if request.leaf is not None:
        body["leaf"] = _hex(request.leaf)
    payload = _dumps(body)
    decode_proof_request(payload)  # the same rules as the broker's, before it goes out
    return payload


def decode_proof_request(payload: bytes | bytearray | memoryview) -> ProofRequest:
    """Parse a proof request (WireError if malformed, or naming neither a leaf nor a topic
    and a sequence)."""
    data = _load(payload)
    kind = _str(data, "type")
    if kind != "proof_request":
        raise WireError(f"type: expected 'proof_request', got {kind[:80]!r}")
    request = ProofRequest(
        request_id=_request_id(data),
        topic=_topic(data) if "topic" in data else None,
        sequence=_uint(data, "sequence", _UINT64_MAX) if "sequence" in data else None,
        device=_address(data, "device") if "device" in data else None,
        leaf=_bytes32(data, "leaf") if "leaf" in data else None,
    )
    if request.leaf is None and (request.topic is None or request.sequence is None):
        raise WireError("a proof request needs a leaf, or a topic and a sequence")
    return request


def _encode_proof(proof: Proof) -> bytes:
    if len(proof.proof) > MAX_PROOF_DEPTH:
        raise WireError(f"proof: more than {MAX_PROOF_DEPTH} elements")
    return _dumps(
        {
            "type": "proof",
            "request_id": proof.request_id,
            "topic": proof.topic,
            "sequence": str(proof.sequence),
            "device": proof.device,
            "leaf": "0x" + proof.leaf.hex(),
            "proof": ["0x" + p.hex() for p in proof.proof],
            "batch": str(proof.batch_id),
            "root": "0x" + proof.root.hex(),
            "tx": _hex(proof.tx_hash),
            "index": str(proof.index),
        }
    )


def _decode_proof(data: dict[str, Any]) -> Proof:
    items = data.get("proof")
    if not isinstance(items, list):
        raise WireError(f"proof: must be a list, got {type(items).__name__}")
    if len(items) > MAX_PROOF_DEPTH:
        raise WireError(f"proof: {len(items)} elements, at most {MAX_PROOF_DEPTH}")
    siblings = tuple(_bytes32({"proof item": item}, "proof item") for item in items)
    return Proof(
        request_id=_request_id(data),
        topic=_topic(data),
        sequence=_uint(data, "sequence", _UINT64_MAX),
        device=_address(data, "device"),
        leaf=_bytes32(data, "leaf"),
        proof=siblings,
        batch_id=_amount(data, "batch"),
        root=_bytes32(data, "root"),
        tx_hash=_tx_hash(data),
        index=_uint(data, "index", _UINT64_MAX),
    )
