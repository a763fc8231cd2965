"""Signed message envelopes: what a device publishes on a market topic.

Why: a subscriber must be able to trust a reading without trusting the broker. The device
signs each message with its registered key; anyone can check the signature and, through the
Registry, that the device belongs to the topic's seller.

What is signed is the EIP-712 struct::

    Message(bytes32 topicHash, address device, uint64 sequence, uint64 timestamp,
            bytes32 payloadHash, uint8 flags)

in the domain ``{name: "BlendSM Message", version: "1", chainId, verifyingContract: Registry}``.
Every field has a fixed width and the topic and payload enter as hashes, so the encoding is
unambiguous and length-safe; wallets can sign it with ``eth_signTypedData_v4``.

On the wire the envelope is binary (no base64): a 103-byte header followed by the payload
bytes as they are (plaintext, or AEAD ciphertext when ``flags`` bit 0 is set)::

    offset  size  field
    0       1     version (1)
    1       1     flags (bit 0: payload encrypted; other bits must be 0)
    2       20    device address
    22      8     sequence number, uint64 big-endian
    30      8     timestamp, milliseconds since the Unix epoch, uint64 big-endian
    38      65    signature r || s || v (low s, v 27/28)
    103     ...   payload

The Merkle leaf of a message is ``leaf_hash(digest || signature)``: double-hashed like
OpenZeppelin's ``MerkleProof`` expects, binding the signed digest and the signature itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from blendsm.errors import ConfigError, EnvelopeError, VoucherSignatureError

from ._ecdsa import key_address, recover_address, sign_digest, signing_key
from ._eip712 import init_domain, typed_data
from ._keccak import checksum_address, keccak256
from ._merkle import leaf_hash

_device_checksum: Final = lru_cache(maxsize=4096)(checksum_address)
"""EIP-55 form of a device address, cached by its 20 bytes: a broker (or subscriber) checks
every message's envelope, and a keccak plus a 40-character join per message (~3 µs) was
spent on the same few devices over and over. Bounded: a stream of new addresses costs at
most 4,096 entries (about 1 MB)."""

__all__ = [
    "ENVELOPE_HEADER_SIZE",
    "ENVELOPE_VERSION",
    "FLAG_ENCRYPTED",
    "MESSAGE_DOMAIN_NAME",
    "MESSAGE_DOMAIN_VERSION",
    "MESSAGE_TYPEHASH",
    "Envelope",
    "EnvelopeSigner",
    "MessageDomain",
    "decode_envelope",
    "message_leaf",
    "message_typed_data",
    "verify_envelope",
    "verify_envelope_leaf",
]

MESSAGE_DOMAIN_NAME: Final = "BlendSM Message"
MESSAGE_DOMAIN_VERSION: Final = "1"
MESSAGE_TYPEHASH: Final = keccak256(
    b"Message(bytes32 topicHash,address device,uint64 sequence,uint64 timestamp,"
    b"bytes32 payloadHash,uint8 flags)"
)
ENVELOPE_VERSION: Final = 1
ENVELOPE_HEADER_SIZE: Final = 103
FLAG_ENCRYPTED: Final = 0x01
_KNOWN_FLAGS: Final = FLAG_ENCRYPTED
_UINT64_MAX: Final = 2**64 - 1
_MESSAGE_FIELDS: Final = (
    ("topicHash", "bytes32"),
    ("device", "address"),
    ("sequence", "uint64"),
    ("timestamp", "uint64"),
    ("payloadHash", "bytes32"),
    ("flags", "uint8"),
)


@dataclass(frozen=True, slots=True, init=False)
class MessageDomain:
    """The EIP-712 domain of one deployment's messages (``registry`` is its Registry)."""

    chain_id: int
    registry: str
    separator: bytes
    _prefix: bytes

    def __init__(self, chain_id: int, registry: str | bytes) -> None:
        raw = init_domain(
            self, MESSAGE_DOMAIN_NAME, MESSAGE_DOMAIN_VERSION, chain_id, registry, "registry"
        )
        object.__setattr__(self, "registry", checksum_address(raw))

    def digest(
        self,
        topic: str,
        device: bytes,
        sequence: int,
        timestamp_ms: int,
        payload: bytes,
        flags: int,
    ) -> bytes:
        """The digest the device signs (no range checks: see :class:`EnvelopeSigner`)."""
        struct_hash = keccak256(
            MESSAGE_TYPEHASH
            + keccak256(topic.encode())
            + bytes(12)
            + device
            + sequence.to_bytes(32, "big")
            + timestamp_ms.to_bytes(32, "big")
            + keccak256(payload)
            + flags.to_bytes(32, "big")
        )
        return keccak256(self._prefix + struct_hash)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One signed message as carried on the wire."""

    device: bytes
    """20 address bytes of the signing device."""
    sequence: int
    timestamp_ms: int
    flags: int
    signature: bytes
    payload: bytes

    @property
    def device_address(self) -> str:
        return _device_checksum(self.device)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    def encode(self) -> bytes:
        """The wire bytes (header + payload)."""
        return (
            bytes((ENVELOPE_VERSION, self.flags))
            + self.device
            + self.sequence.to_bytes(8, "big")
            + self.timestamp_ms.to_bytes(8, "big")
            + self.signature
            + self.payload
        )


def decode_envelope(data: bytes | bytearray | memoryview) -> Envelope:
    """Parse wire bytes; EnvelopeError if too short, of another version or with unknown flags.
    The signature is not checked here (see :func:`verify_envelope`)."""
    raw = bytes(data)
    if len(raw) < ENVELOPE_HEADER_SIZE:
        raise EnvelopeError(
            f"envelope too short: {len(raw)} bytes, the header alone is {ENVELOPE_HEADER_SIZE}"
        )
    if raw[0] != ENVELOPE_VERSION:
        raise EnvelopeError(f"envelope version {raw[0]} is not supported (expected 1)")
    flags = raw[1]
    if flags & ~_KNOWN_FLAGS:
        raise EnvelopeError(f"envelope flags 0x{flags:02x} has unknown bits")
    return Envelope(
        device=raw[2:22],
        sequence=int.from_bytes(raw[22:30], "big"),
        timestamp_ms=int.from_bytes(raw[30:38], "big"),
        flags=flags,
        signature=raw[38:103],
        payload=raw[103:],
    )


def _digest(domain: MessageDomain, topic: str, envelope: Envelope) -> bytes:
    return domain.digest(
        topic,
        envelope.device,
        envelope.sequence,
        envelope.timestamp_ms,
        envelope.payload,
        envelope.flags,
    )


def _check_signed(digest: bytes, topic: str, envelope: Envelope) -> None:
    """EnvelopeError unless ``envelope.device`` made the signature over ``digest``."""
    try:
        signer = recover_address(digest, envelope.signature)
    except VoucherSignatureError as exc:
        raise EnvelopeError(f"bad message signature: {exc}") from None
    if signer != envelope.device:
        raise EnvelopeError(
            f"message not signed by device {envelope.device_address} for topic {topic!r}"
            " (altered payload, topic, sequence or timestamp, or another key)"
        )


def verify_envelope(domain: MessageDomain, topic: str, envelope: Envelope) -> str:
    """The device's checksum address if it signed this message for ``topic``.

    Raises EnvelopeError when the signature is malformed (OpenZeppelin ``ECDSA.recover``
    rules) or was made by another key, for another topic, another deployment, or over other
    bytes. Whether the device belongs to the topic's seller is the caller's chain check."""
    _check_signed(_digest(domain, topic, envelope), topic, envelope)
    return envelope.device_address


def verify_envelope_leaf(
    domain: MessageDomain, topic: str, envelope: Envelope
) -> tuple[str, bytes]:
    """:func:`verify_envelope` and :func:`message_leaf` with one digest (the broker's path)."""
    digest = _digest(domain, topic, envelope)
    _check_signed(digest, topic, envelope)
    return envelope.device_address, leaf_hash(digest + envelope.signature)


def message_leaf(domain: MessageDomain, topic: str, envelope: Envelope) -> bytes:
    """The Merkle leaf anchored for this message: ``leaf_hash(digest || signature)``."""
    return leaf_hash(_digest(domain, topic, envelope) + envelope.signature)


class EnvelopeSigner:
    """Signs messages with one device key (keep one per device; key setup costs ~25 us)."""

    __slots__ = ("_key", "address", "device", "domain")

    def __init__(self, private_key: bytes, domain: MessageDomain) -> None:
        self._key = signing_key(private_key)
        self.domain = domain
        self.device: bytes = key_address(self._key)
        self.address: str = checksum_address(self.device)

    def sign(
        self, topic: str, payload: bytes, sequence: int, timestamp_ms: int, flags: int = 0
    ) -> Envelope:
        """The signed envelope of ``payload`` on ``topic`` (deterministic, low-s)."""
        if not 0 <= sequence <= _UINT64_MAX or not 0 <= timestamp_ms <= _UINT64_MAX:
            raise ConfigError("sequence and timestamp_ms must fit uint64")
        if flags & ~_KNOWN_FLAGS or not 0 <= flags <= 255:
            raise ConfigError(f"flags: unknown bits in 0x{flags:02x}")
        digest = self.domain.digest(topic, self.device, sequence, timestamp_ms, payload, flags)
        signature = sign_digest(self._key, digest)
        return Envelope(self.device, sequence, timestamp_ms, flags, signature, payload)


def message_typed_data(
    domain: MessageDomain,
    topic: str,
    device: str,
    sequence: int,
    timestamp_ms: int,
    payload: bytes,
    flags: int = 0,
) -> dict[str, Any]:
    """The message as EIP-712 JSON (``eth_signTypedData_v4``), for wallets and other languages."""
    return typed_data(
        MESSAGE_DOMAIN_NAME,
        MESSAGE_DOMAIN_VERSION,
        domain.chain_id,
        domain.registry,
        "Message",
        _MESSAGE_FIELDS,
        {
            "topicHash": "0x" + keccak256(topic.encode()).hex(),
            "device": device,
            "sequence": sequence,
            "timestamp": timestamp_ms,
            "payloadHash": "0x" + keccak256(payload).hex(),
            "flags": flags,
        },
    )
