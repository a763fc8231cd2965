"""Checking market messages without trusting the broker.

For every message on a market topic a subscriber checks, from the chain and its own
computations only:

- the envelope parses and its signature is the device's, over this topic (``BAD_ENVELOPE``,
  ``BAD_SIGNATURE`` otherwise);
- the device is an active device of the topic's seller, both read from the chain
  (``UNKNOWN_DEVICE`` otherwise);
- per (device, topic), sequence numbers follow each other: a jump is a ``GAP`` (with the
  missing range), an old number never seen is a late ``REORDER`` that fills part of a gap,
  and a number already seen is a ``REPLAY``;
- on request, that the broker anchored the message: the leaf is recomputed from the
  received envelope (the broker's leaf is never used) and its Merkle proof must lead to the
  root *read from the chain* for that batch (``PROOF_VERIFIED``, ``PROOF_FAILED``,
  ``PROOF_UNAVAILABLE``).

Only authentic messages (good signature, the seller's device) advance the sequence
tracker, so a forged message can neither hide a gap nor cause a false replay report.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from blendsm.errors import ChainError, EnvelopeError, WireError

from ._chain_reader import ChainReader
from ._control import Proof
from ._envelope import Envelope, MessageDomain, decode_envelope, message_leaf, verify_envelope
from ._merkle import verify_proof

__all__ = [
    "IntegrityEvent",
    "IntegrityKind",
    "MessageVerifier",
    "RecordVerdict",
    "SequenceTracker",
    "Verification",
    "check_proof",
    "read_record",
    "verify_record",
]

_MAX_RANGES: Final = 64


class IntegrityKind(enum.StrEnum):
    """What an :class:`IntegrityEvent` reports."""

    BAD_ENVELOPE = "bad_envelope"
    """Data on a market topic that is not a well-formed envelope."""
    BAD_SIGNATURE = "bad_signature"
    """The signature is malformed or not the device's over this topic and these bytes
    (altered payload, sequence, timestamp or topic, or another key)."""
    UNKNOWN_DEVICE = "unknown_device"
    """Signed by a device that is not an active device of the topic's seller on chain."""
    GAP = "gap"
    """Sequence numbers ``missing[0]..missing[1]`` of this device on this topic never arrived
    (so far: a late one is reported as :attr:`REORDER`)."""
    REPLAY = "replay"
    """A sequence number already received (or older than any gap) arrived again."""
    REORDER = "reorder"
    """A sequence number reported missing arrived late (delivered out of order)."""
    PROOF_VERIFIED = "proof_verified"
    """The message's inclusion proof leads to the root anchored on chain."""
    PROOF_FAILED = "proof_failed"
    """The broker's proof does not prove this message against the on-chain root."""
    PROOF_UNAVAILABLE = "proof_unavailable"
    """No proof could be had (not anchored yet, unknown to the broker, no answer)."""


@dataclass(frozen=True, slots=True)
class IntegrityEvent:
    """An integrity finding about one message, reported to ``on_integrity``."""

    kind: IntegrityKind
    topic: str
    device: str | None
    """Checksum address of the signing device, None if the envelope did not parse."""
    sequence: int | None
    detail: str = ""
    missing: tuple[int, int] | None = None
    """For :attr:`IntegrityKind.GAP`: the first and last missing sequence numbers."""
    batch_id: int | None = None
    """For proof events: the anchored batch the proof named."""

    @property
    def ok(self) -> bool:
        """Whether this event reports good news (only :attr:`~IntegrityKind.PROOF_VERIFIED`)."""
        return self.kind is IntegrityKind.PROOF_VERIFIED


@dataclass(slots=True)
class _Stream:
    last: int
    missing: list[list[int]] = field(default_factory=list)  # [first, last] ranges, oldest first


class SequenceTracker:
    """Per (device, topic) sequence bookkeeping: gaps, replays and late arrivals.

    The first message of a stream sets its baseline (a subscriber joining mid-stream sees no
    gap). Missing ranges are remembered, at most 64 per stream, so a late message is told
    apart from a replay; at most ``max_streams`` streams are kept (least recently seen go
    first). Not thread-safe: one caller at a time.
    """

    def __init__(self, max_streams: int = 65536) -> None:
        self.max_streams = max_streams
        self._streams: OrderedDict[tuple[str, str], _Stream] = OrderedDict()

    def last(self, device: str, topic: str) -> int | None:
        stream = self._streams.get((device, topic))
        return None if stream is None else stream.last

    def observe(self, device: str, topic: str, sequence: int) -> IntegrityEvent | None:
        """Record ``sequence``; the event it causes (GAP, REPLAY, REORDER), None if in order."""
        key = (device, topic)
        stream = self._streams.get(key)
        if stream is None:
            self._streams[key] = _Stream(sequence)
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
            return None
        self._streams.move_to_end(key)
        if sequence == stream.last + 1:
            stream.last = sequence
            return None
        if sequence > stream.last:
            first, last = stream.last + 1, sequence - 1
            stream.missing.append([first, last])
            del stream.missing[:-_MAX_RANGES]
            stream.last = sequence
            count = last - first + 1
            return IntegrityEvent(
                IntegrityKind.GAP,
                topic,
                device,
                sequence,
                f"{count} message{'s' if count > 1 else ''} missing: sequence {first}"
                + (f" to {last}" if last > first else ""),
                missing=(first, last),
            )
        for i, (lo, hi) in enumerate(stream.missing):
            if lo <= sequence <= hi:
                pieces = [r for r in ([lo, sequence - 1], [sequence + 1, hi]) if r[0] <= r[1]]
                stream.missing[i : i + 1] = pieces
                return IntegrityEvent(
                    IntegrityKind.REORDER,
                    topic,
                    device,
                    sequence,
                    f"sequence {sequence} arrived late, after {stream.last}",
                )
        what = "a duplicate of the latest" if sequence == stream.last else "already received"
        return IntegrityEvent(
            IntegrityKind.REPLAY,
            topic,
            device,
            sequence,
            f"sequence {sequence} is {what} (latest {stream.last})",
        )


@dataclass(frozen=True, slots=True)
class Verification:
    """What :meth:`MessageVerifier.check` found about one received message."""

    topic: str
    market: bool | None
    """Whether ``topic`` is a market topic (None: the chain could not say)."""
    payload: bytes
    """The envelope's payload, or the data as received when it is not an envelope."""
    envelope: Envelope | None = None
    device: str | None = None
    sequence: int | None = None
    verified: bool | None = None
    """True: signed by an active device of the topic's seller; False: a check failed;
    None: not a market message, or the chain could not be read."""
    leaf: bytes | None = None
    """The Merkle leaf recomputed from the envelope, when the signature is good."""
    events: tuple[IntegrityEvent, ...] = ()
    error: ChainError | None = None
    """Why the chain part could not be checked, if it could not."""


class MessageVerifier:
    """Checks received messages against ``domain`` (the deployment's message domain) and
    the chain seen through ``chain_reader``. Not thread-safe (the sequence tracker):
    call it from one thread, as the Subscriber's worker does."""

    def __init__(
        self,
        domain: MessageDomain,
        chain_reader: ChainReader,
        *,
        tracker: SequenceTracker | None = None,
    ) -> None:
        self.domain = domain
        self.chain = chain_reader
        self.tracker = tracker if tracker is not None else SequenceTracker()

    def check(self, topic: str, data: bytes, signed: Envelope | None = None) -> Verification:
        """Every check but the proof (see :meth:`check_proof`); never raises for bad data
        or an unreachable chain: findings are in the result. ``signed``: the envelope of
        ``data``, already decoded and its signature verified for ``topic`` under this
        verifier's domain by the caller (the Subscriber does so before paying): the signer is
        then not recovered a second time; every chain check still runs."""
        error: ChainError | None = None
        try:
            seller = self.chain.seller_of_topic(topic)
            market: bool | None = seller is not None
        except ChainError as exc:
            seller, market, error = None, None, exc
        if market is False:
            return Verification(topic, False, data)
        try:
            envelope = decode_envelope(data) if signed is None else signed
        except EnvelopeError as exc:
            if market is None:  # maybe not a market topic at all: do not accuse anybody
                return Verification(topic, None, data, error=error)
            event = IntegrityEvent(IntegrityKind.BAD_ENVELOPE, topic, None, None, str(exc))
            return Verification(topic, True, data, verified=False, events=(event,))
        device, sequence = envelope.device_address, envelope.sequence

        def of_envelope(
            verified: bool | None, leaf: bytes | None, events: tuple[IntegrityEvent, ...]
        ) -> Verification:
            return Verification(
                topic,
                market,
                envelope.payload,
                envelope,
                device,
                sequence,
                verified,
                leaf,
                events,
                error,
            )

        def failed(kind: IntegrityKind, detail: str) -> Verification:
            return of_envelope(
                False, None, (IntegrityEvent(kind, topic, device, sequence, detail),)
            )

        try:
            if signed is None:
                verify_envelope(self.domain, topic, envelope)
        except EnvelopeError as exc:
            return failed(IntegrityKind.BAD_SIGNATURE, str(exc))
        verified: bool | None = None
        if seller is not None:
            try:
                owner = self.chain.active_seller_of(device)
            except ChainError as exc:
                error = exc
            else:
                if owner is None:
                    return failed(
                        IntegrityKind.UNKNOWN_DEVICE,
                        f"device {device} is not registered to an active seller;"
                        f" topic {topic!r} is sold by {seller}",
                    )
                if owner.lower() != seller.lower():
                    return failed(
                        IntegrityKind.UNKNOWN_DEVICE,
                        f"device {device} publishes for {owner}, but topic {topic!r}"
                        f" is sold by {seller}",
                    )
                verified = True
        events: tuple[IntegrityEvent, ...] = ()
        found = self.tracker.observe(device, topic, sequence)
        if found is not None:
            events = (found,)
        return of_envelope(verified, message_leaf(self.domain, topic, envelope), events)

    def leaf(self, topic: str, envelope: Envelope) -> bytes:
        """The Merkle leaf of ``envelope`` on ``topic``, computed here."""
        return message_leaf(self.domain, topic, envelope)

    def check_proof(
        self,
        broker: str,
        topic: str,
        envelope: Envelope,
        proof: Proof,
    ) -> IntegrityEvent:
        """Whether ``proof`` shows that ``broker`` anchored this very message (see
        :func:`check_proof`); the root is read from the chain."""
        leaf = self.leaf(topic, envelope)
        try:
            root = self.chain.anchor_root(broker, proof.batch_id)
        except ChainError as exc:
            return IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE,
                topic,
                envelope.device_address,
                envelope.sequence,
                f"cannot read the root of batch {proof.batch_id} from the chain: {exc}",
                batch_id=proof.batch_id,
            )
        return check_proof(topic, envelope.device_address, envelope.sequence, leaf, proof, root)


def check_proof(
    topic: str,
    device: str,
    sequence: int,
    leaf: bytes,
    proof: Proof,
    chain_root: bytes | None,
) -> IntegrityEvent:
    """The verdict on ``proof`` for the message whose leaf, computed by the caller from the
    envelope it received, is ``leaf``; ``chain_root`` is the root the chain holds for
    ``proof.batch_id`` (None: not anchored there). The broker's leaf and root only serve
    to explain a failure."""

    def event(kind: IntegrityKind, detail: str) -> IntegrityEvent:
        return IntegrityEvent(kind, topic, device, sequence, detail, batch_id=proof.batch_id)

    if chain_root is None:
        return event(
            IntegrityKind.PROOF_UNAVAILABLE,
            f"batch {proof.batch_id} is not anchored on chain (yet)",
        )
    if (proof.topic, proof.sequence, proof.device.lower()) != (topic, sequence, device.lower()):
        return event(
            IntegrityKind.PROOF_FAILED,
            f"the proof is for another message ({proof.topic!r}, {proof.device},"
            f" sequence {proof.sequence})",
        )
    try:
        included = verify_proof(leaf, proof.proof, chain_root)
    except WireError as exc:
        return event(IntegrityKind.PROOF_FAILED, f"malformed proof: {exc}")
    if included:
        return event(
            IntegrityKind.PROOF_VERIFIED,
            f"in batch {proof.batch_id} at index {proof.index}, root 0x{chain_root.hex()} on chain",
        )
    reasons = []
    if proof.leaf != leaf:
        reasons.append("the broker's leaf differs from the received message's")
    if proof.root != chain_root:
        reasons.append(
            f"the broker's root 0x{proof.root.hex()} is not the on-chain root 0x{chain_root.hex()}"
        )
    reasons.append("the proof does not lead to the on-chain root")
    return event(IntegrityKind.PROOF_FAILED, "; ".join(reasons))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class RecordVerdict:
    """The verdict on one recorded message (see :func:`verify_record`)."""

    line: int
    """1-based line of the message in the record file."""
    topic: str
    device: str | None
    sequence: int | None
    received_at: float | None
    verified: bool | None
    """As in :class:`Verification`: signature and device checked out (None: unchecked)."""
    proof: IntegrityEvent | None
    """The recorded proof re-checked against the on-chain root; None if none was recorded."""
    events: tuple[IntegrityEvent, ...]
    """Findings other than the proof's (bad signature, unknown device, gap, replay, ...)."""
    unchecked: str = ""
    """Why the chain part could not be checked, if it could not."""

    @property
    def ok(self) -> bool:
        """Authentic, in sequence, and proven (or no proof recorded)."""
        return (
            self.verified is True
            and not self.events
            and (self.proof is None or self.proof.kind is IntegrityKind.PROOF_VERIFIED)
        )

    def to_json(self) -> dict[str, Any]:
        def event(e: IntegrityEvent) -> dict[str, Any]:
            out: dict[str, Any] = {"kind": str(e.kind), "detail": e.detail}
            if e.missing is not None:
                out["missing"] = list(e.missing)
            if e.batch_id is not None:
                out["batch"] = e.batch_id
            return out

        return {
            "line": self.line,
            "ok": self.ok,
            "topic": self.topic,
            "device": self.device,
            "sequence": self.sequence,
            "received_at": self.received_at,
            "verified": self.verified,
            "proof": None if self.proof is None else event(self.proof),
            "events": [event(e) for e in self.events],
            "unchecked": self.unchecked or None,
        }


def read_record(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line of a Subscriber's record file (WireError if
    a line is not a JSON object)."""
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise WireError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(item, dict):
                raise WireError(f"{path}:{number}: not a JSON object")
            yield number, item


def _hex(item: dict[str, Any], name: str, where: str) -> bytes:
    value = item.get(name)
    if not isinstance(value, str) or not value.startswith("0x"):
        raise WireError(f"{where}: {name} must be 0x-hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise WireError(f"{where}: {name} must be 0x-hex") from None


def _int(item: dict[str, Any], name: str, where: str) -> int:
    value = item.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"{where}: {name} must be a non-negative integer")
    return value


def _str(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise WireError(f"{where}: {name} must be a string")
    return value


def _recorded_proof(item: dict[str, Any], where: str) -> Proof:
    items = item.get("proof")
    if not isinstance(items, list):
        raise WireError(f"{where}: proof must be a list")
    return Proof(
        request_id="record",
        topic=_str(item, "topic", where),
        sequence=_int(item, "sequence", where),
        device=_str(item, "device", where),
        leaf=_hex(item, "leaf", where),
        proof=tuple(_hex({"p": p}, "p", where) for p in items),
        batch_id=_int(item, "batch", where),
        root=_hex(item, "root", where),
        tx_hash=None,
        index=_int(item, "index", where),
    )


def verify_record(
    records: Iterable[tuple[int, dict[str, Any]]], verifier: MessageVerifier, broker: str
) -> list[RecordVerdict]:
    """Check a Subscriber's record from scratch, trusting only the chain: every message's
    signature, device and sequence (in record order, with a fresh tracker of the
    verifier's), and every recorded proof against the root ``broker`` anchored on chain
    (the recorded verdicts are ignored). WireError if the record is malformed."""
    messages: list[tuple[int, dict[str, Any]]] = []
    proofs: dict[tuple[str, str, int], Proof] = {}
    for number, item in records:
        where = f"line {number}"
        kind = item.get("type")
        if kind == "message":
            messages.append((number, item))
        elif kind == "proof":
            proof = _recorded_proof(item, where)
            proofs[(proof.topic, proof.device.lower(), proof.sequence)] = proof
        else:
            raise WireError(f"{where}: unknown record type {kind!r}")
    verdicts: list[RecordVerdict] = []
    for number, item in messages:
        where = f"line {number}"
        topic = _str(item, "topic", where)
        data = _hex(item, "envelope", where)
        received_at = item.get("received_at")
        checked = verifier.check(topic, data)
        unchecked = ""
        if checked.error is not None:
            unchecked = str(checked.error)
        elif checked.market is False:
            unchecked = f"{topic!r} is not a market topic on chain"
        proof_event: IntegrityEvent | None = None
        envelope = checked.envelope
        if envelope is not None and checked.device is not None and checked.leaf is not None:
            recorded = proofs.get((topic, checked.device.lower(), envelope.sequence))
            if recorded is not None:
                proof_event = verifier.check_proof(broker, topic, envelope, recorded)
        verdicts.append(
            RecordVerdict(
                number,
                topic,
                checked.device,
                checked.sequence,
                received_at if isinstance(received_at, int | float) else None,
                checked.verified,
                proof_event,
                checked.events,
                unchecked,
            )
        )
    return verdicts
