"""The resume request and its answer: a subscriber that moved to another broker asks it for
what it missed.

Why: a live subscription only sees what is published after it, so a buyer that fails over from
broker A to broker B misses what B received during the move. B keeps each market topic's
recent envelopes in a bounded ring (:mod:`blendsm.broker._replay`); the buyer publishes a
:class:`ResumeRequest` on ``blendsm/ctl/<address>/resume`` naming, per device of one topic, the
last sequence it saw, and B delivers the newer envelopes it still holds to that session only,
as ordinary (gated, metered, paid) deliveries, then answers with a :class:`Resumed` notice on
the notice topic saying how many it delivered and which ranges it could not serve.

Both are JSON objects like every control payload (:mod:`._control`): ``v``, ``type``, amounts
and sequences as decimal strings, at most :data:`MAX_RESUME_DEVICES` devices per request and
:data:`MAX_UNSERVED` ranges per answer, so either fits :data:`MAX_CONTROL_PAYLOAD`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from blendsm.errors import WireError

from ._control import (
    _UINT64_MAX,
    _address,
    _dumps,
    _load,
    _request_id,
    _str,
    _topic,
    _uint,
)

__all__ = [
    "MAX_RESUME_DEVICES",
    "MAX_UNSERVED",
    "ResumeRequest",
    "Resumed",
    "Unserved",
    "decode_resume_request",
    "decode_resumed",
    "encode_resume_request",
    "encode_resumed",
    "is_resumed_payload",
]

MAX_RESUME_DEVICES: Final = 16
"""Most devices one resume request may name (a topic with more devices takes several)."""
MAX_UNSERVED: Final = 16
"""Most unserved ranges one answer lists (one per device at most, so it always fits)."""
_RESUMED_MARK: Final = b'"resumed"'


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """Deliver the envelopes of ``topic`` newer than ``after[device]`` (per device, checksum
    address -> last sequence seen; a device never seen: -1 asks for all the broker holds)."""

    request_id: str
    topic: str
    after: dict[str, int]


@dataclass(frozen=True, slots=True)
class Unserved:
    """Sequences ``first``..``last`` (inclusive) of ``device`` that the broker could not
    deliver: older than its ring (evicted or never held), or past the session's bound."""

    device: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Resumed:
    """The broker's answer to a :class:`ResumeRequest` (same ``request_id``): ``served``
    envelopes were handed to the delivery gate (each delivered, charged and paid like a live
    one, or held for credit like one), ``unserved`` the ranges it could not serve;
    ``refused`` names why nothing was served (``disabled``, ``not_subscribed``,
    ``not_market``, ``unsupported_transport``, ``rate_limited``, ``internal_error``), else
    None."""

    request_id: str
    topic: str
    served: int
    unserved: tuple[Unserved, ...] = ()
    refused: str | None = None


def encode_resume_request(request: ResumeRequest) -> bytes:
    """The payload a subscriber publishes on ``blendsm/ctl/<address>/resume`` (checked with
    the broker's rules before it goes out)."""
    payload = _dumps(
        {
            "type": "resume",
            "request_id": request.request_id,
            "topic": request.topic,
            "from": {device.lower(): str(seq + 1) for device, seq in request.after.items()},
        }
    )
    decode_resume_request(payload)
    return payload


def decode_resume_request(payload: bytes | bytearray | memoryview) -> ResumeRequest:
    """Parse a resume request (WireError if malformed, empty or naming too many devices).

    On the wire ``from`` holds ``last seen + 1`` per device (the first sequence wanted), so
    that it stays a non-negative decimal string for a device never seen."""
    data = _load(payload)
    kind = _str(data, "type")
    if kind != "resume":
        raise WireError(f"type: expected 'resume', got {kind[:80]!r}")
    after = data.get("from")
    if not isinstance(after, dict) or not after:
        raise WireError("from: must be a non-empty object of device -> first wanted sequence")
    if len(after) > MAX_RESUME_DEVICES:
        raise WireError(f"from: {len(after)} devices, at most {MAX_RESUME_DEVICES}")
    parsed: dict[str, int] = {}
    for device, first in after.items():
        address = _address({"device": device}, "device")
        parsed[address] = _uint({"first": first}, "first", _UINT64_MAX) - 1
    return ResumeRequest(request_id=_request_id(data), topic=_topic(data), after=parsed)


def encode_resumed(notice: Resumed) -> bytes:
    """The payload of the answer on the notice topic."""
    body: dict[str, Any] = {
        "type": "resumed",
        "request_id": notice.request_id,
        "topic": notice.topic,
        "served": str(notice.served),
        "unserved": [
            {"device": u.device.lower(), "first": str(u.first), "last": str(u.last)}
            for u in notice.unserved[:MAX_UNSERVED]
        ],
    }
    if notice.refused is not None:
        body["refused"] = notice.refused[:64]
    return _dumps(body)


def is_resumed_payload(payload: bytes) -> bool:
    """Cheap pre-check on a notice payload: may it be a :class:`Resumed` (then decode it)?"""
    return _RESUMED_MARK in payload


def decode_resumed(payload: bytes | bytearray | memoryview) -> Resumed:
    """Parse a :class:`Resumed` notice (WireError if malformed or of another type)."""
    data = _load(payload)
    kind = _str(data, "type")
    if kind != "resumed":
        raise WireError(f"type: expected 'resumed', got {kind[:80]!r}")
    items = data.get("unserved", [])
    if not isinstance(items, list) or len(items) > MAX_UNSERVED:
        raise WireError(f"unserved: must be a list of at most {MAX_UNSERVED} ranges")
    unserved: list[Unserved] = []
    for item in items:
        if not isinstance(item, dict):
            raise WireError("unserved: each range must be an object")
        first = _uint(item, "first", _UINT64_MAX)
        last = _uint(item, "last", _UINT64_MAX)
        if last < first:
            raise WireError(f"unserved: last {last} below first {first}")
        unserved.append(Unserved(_address(item, "device"), first, last))
    refused = data.get("refused")
    if refused is not None and (not isinstance(refused, str) or len(refused) > 64):
        raise WireError("refused: must be a short string")
    return Resumed(
        request_id=_request_id(data),
        topic=_topic(data),
        served=_uint(data, "served", _UINT64_MAX),
        unserved=tuple(unserved),
        refused=refused,
    )
