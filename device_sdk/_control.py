"""Control-topic wire protocol between the broker and paying subscribers.

Why a separate channel: MQTT 3.1.1 has no message properties, so payment traffic travels as
ordinary PUBLISH packets on a reserved topic tree that the broker intercepts and never
broadcasts::

    blendsm/ctl/<address>/voucher   client -> broker   a signed voucher (JSON)
    blendsm/ctl/<address>/notice    broker -> client   quote, payment request, receipt, refusal

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
from ._voucher import UINT256_MAX, Voucher

__all__ = [
    "CONTROL_ROOT",
    "MAX_CONTROL_PAYLOAD",
    "NOTICE",
    "VOUCHER",
    "Notice",
    "PaymentRequest",
    "Quote",
    "Receipt",
    "Refusal",
    "RefusalCode",
    "control_topic",
    "decode_notice",
    "decode_voucher",
    "encode_notice",
    "encode_voucher",
    "is_control_topic",
    "parse_control_topic",
]

CONTROL_ROOT: Final = "blendsm/ctl"
"""Root of the reserved topic tree; never broadcast, never usable for market data."""
VOUCHER: Final = "voucher"
"""Leaf a subscriber publishes its vouchers to."""
NOTICE: Final = "notice"
"""Leaf the broker sends quotes, payment requests, receipts and refusals to."""
MAX_CONTROL_PAYLOAD: Final = 2048
"""Largest control payload accepted, in bytes (a voucher is about 260)."""
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
    "over_deposit",
    "channel_closing",
    "store_unavailable",
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
    if not _ADDRESS.fullmatch(parts[2]) or parts[3] not in (VOUCHER, NOTICE):
        return None
    return parts[2], parts[3]


# --------------------------------------------------------------------------- fields


def _load(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise WireError(f"control payload too large: {len(payload)} > {MAX_CONTROL_PAYLOAD} bytes")
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


def _dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, **data})


# --------------------------------------------------------------------------- vouchers


def encode_voucher(voucher: Voucher) -> bytes:
    """The payload a subscriber publishes on ``blendsm/ctl/<address>/voucher``."""
    return _dumps(
        {
            "channel": "0x" + voucher.channel_id.hex(),
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
    return Voucher(_bytes32(data, "channel"), _amount(data, "amount"), bytes.fromhex(signature[2:]))


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


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """Delivery on ``channel_id`` paused: the credit is used up; pay ``charged`` to resume."""

    channel_id: bytes
    charged: int
    paid: int
    credit: int
    topic: str


@dataclass(frozen=True, slots=True)
class Receipt:
    """A voucher was verified and stored durably; ``amount`` now counts as paid."""

    channel_id: bytes
    amount: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A voucher (or another control message) was refused, with the reason."""

    code: RefusalCode
    detail: str
    channel_id: bytes | None = None
    amount: int | None = None


Notice = Quote | PaymentRequest | Receipt | Refusal

_REFUSAL_CODES: Final = frozenset(RefusalCode.__args__)  # type: ignore[attr-defined]


def encode_notice(notice: Notice) -> bytes:
    """The payload the broker sends on ``blendsm/ctl/<address>/notice``."""
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
            }
        )
    if isinstance(notice, Receipt):
        return _dumps(
            {
                "type": "receipt",
                "channel": "0x" + notice.channel_id.hex(),
                "amount": str(notice.amount),
            }
        )
    body: dict[str, Any] = {"type": "refused", "code": notice.code, "detail": notice.detail}
    if notice.channel_id is not None:
        body["channel"] = "0x" + notice.channel_id.hex()
    if notice.amount is not None:
        body["amount"] = str(notice.amount)
    return _dumps(body)


def decode_notice(payload: bytes | bytearray | memoryview) -> Notice:
    """Parse a notice payload (WireError if malformed or of an unknown type)."""
    data = _load(payload)
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
        )
    if kind == "payment_request":
        return PaymentRequest(
            channel_id=_bytes32(data, "channel"),
            charged=_amount(data, "charged"),
            paid=_amount(data, "paid"),
            credit=_amount(data, "credit"),
            topic=_str(data, "topic"),
        )
    if kind == "receipt":
        return Receipt(channel_id=_bytes32(data, "channel"), amount=_amount(data, "amount"))
    if kind == "refused":
        code = _str(data, "code")
        if code not in _REFUSAL_CODES:
            raise WireError(f"code: unknown refusal code {code[:80]!r}")
        return Refusal(
            code=code,  # type: ignore[arg-type]
            detail=_str(data, "detail"),
            channel_id=_bytes32(data, "channel") if "channel" in data else None,
            amount=_amount(data, "amount") if "amount" in data else None,
        )
    raise WireError(f"type: unknown notice type {kind[:80]!r}")
