"""End-to-end encryption of paid topics: AEAD payloads and ECIES-wrapped topic keys.

Why: the broker meters, anchors and forwards messages, but it should not read them, nor
should anyone whose right to a topic ended. The device encrypts each payload with the
topic's current key before signing (the envelope signature covers the ciphertext and sets
``FLAG_ENCRYPTED``); the seller hands the key, wrapped to each entitled subscriber's public
key, through ``blendsm/keys/<topic id>/<address>`` (see :mod:`._topic_keys`).

Payload format (``seal``)::

    offset  size  field
    0       4     key epoch, uint32 big-endian
    4       12    random nonce
    16      ...   AES-256-GCM ciphertext || 16-byte tag

with associated data ``b"BlendSM topic key v1" || topic (UTF-8) || epoch (uint32 BE)``, so a
ciphertext moved to another topic or relabelled with another epoch fails to open. Nonces are
random: 2**32 messages per key keep the collision risk below 2**-32 (NIST SP 800-38D); keys
rotate much sooner in practice (every loss of a subscriber's right).

Key wrap (``wrap_topic_key``): ECIES on secp256k1 (``eciespy``: ephemeral key, HKDF-SHA256,
AES-256-GCM) of ``b"BSMK" || version 1 || topic id (32) || epoch (uint32 BE) || key (32)``
to the recipient's public key. Before wrapping, :func:`check_public_key` checks that the
public key belongs to the expected address (``address == keccak(pubkey)[12:]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from coincurve import PublicKey
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from ecies import decrypt as _ecies_decrypt
from ecies import encrypt as _ecies_encrypt
from ecies.config import Config as _EciesConfig

from blendsm.errors import ConfigError, DecryptionError

from ._keccak import checksum_address, keccak256

__all__ = [
    "AAD_LABEL",
    "KEY_SIZE",
    "NONCE_SIZE",
    "SEALED_OVERHEAD",
    "DecryptionError",
    "KeyLookup",
    "check_public_key",
    "new_topic_key",
    "open_sealed",
    "public_key_address",
    "seal",
    "sealed_epoch",
    "unwrap_topic_key",
    "wrap_topic_key",
]

AAD_LABEL: Final = b"BlendSM topic key v1"
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
SEALED_OVERHEAD: Final = 4 + NONCE_SIZE + _TAG_SIZE
"""Bytes ``seal`` adds to a plaintext (epoch, nonce, tag)."""
_UINT32_MAX: Final = 2**32 - 1
_WRAP_MAGIC: Final = b"BSMK\x01"
_WRAPPED_PLAIN_SIZE: Final = len(_WRAP_MAGIC) + 32 + 4 + KEY_SIZE
# Pinned, not the module-global ECIES_CONFIG another library could change.
_ECIES: Final = _EciesConfig(
    elliptic_curve="secp256k1",
    is_ephemeral_key_compressed=False,
    is_hkdf_key_compressed=False,
    symmetric_algorithm="aes-256-gcm",
    symmetric_nonce_length=16,
)

KeyLookup = Callable[[int], bytes | None]
"""``epoch -> key`` (None when the epoch is unknown), e.g. a keyring's lookup for one topic."""


def new_topic_key() -> bytes:
    """A fresh random 256-bit topic key."""
    return AESGCM.generate_key(bit_length=256)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ConfigError("key: a topic key is 32 bytes")


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= _UINT32_MAX:
        raise ConfigError(f"epoch: must be an int in [0, 2**32), got {epoch!r}")


def _aad(topic: str, epoch: int) -> bytes:
    return AAD_LABEL + topic.encode() + epoch.to_bytes(4, "big")


def seal(key: bytes, epoch: int, topic: str, plaintext: bytes) -> bytes:
    """``epoch || nonce || AES-256-GCM(key, nonce, plaintext, aad(topic, epoch))``."""
    _check_key(key)
    _check_epoch(epoch)
    if not isinstance(topic, str):
        raise ConfigError("topic: must be a str")
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), _aad(topic, epoch))
    return epoch.to_bytes(4, "big") + nonce + sealed


def sealed_epoch(blob: bytes) -> int:
    """The key epoch a sealed payload names (DecryptionError if too short)."""
    if len(blob) < SEALED_OVERHEAD:
        raise DecryptionError(
            f"encrypted payload too short: {len(blob)} bytes, at least {SEALED_OVERHEAD}"
        )
    return int.from_bytes(blob[:4], "big")


def open_sealed(key: bytes | KeyLookup, topic: str, blob: bytes) -> bytes:
    """The plaintext of a :func:`seal` payload; ``key`` is the key itself or a lookup
    ``epoch -> key | None``. DecryptionError on an unknown epoch or a failed tag check
    (wrong key, altered bytes, another topic or epoch)."""
    raw = bytes(blob)
    epoch = sealed_epoch(raw)
    found = key(epoch) if callable(key) else key
    if found is None:
        raise DecryptionError(f"no key for epoch {epoch} of topic {topic!r}")
    _check_key(found)
    try:
        return AESGCM(bytes(found)).decrypt(raw[4:16], raw[16:], _aad(topic, epoch))
    except InvalidTag:
        raise DecryptionError(
            f"cannot decrypt a message of topic {topic!r}, epoch {epoch}: wrong key,"
            " altered ciphertext, or made for another topic or epoch"
        ) from None


# --------------------------------------------------------------------------- key wrap


def _public_key(public_key: bytes) -> PublicKey:
    raw = bytes(public_key)
    if len(raw) == 64:  # r || s form (eth_keys, web3): add the uncompressed prefix
        raw = b"\x04" + raw
    try:
        return PublicKey(raw)
    except (ValueError, TypeError):
        raise ConfigError("public_key: not a valid secp256k1 public key") from None


def public_key_address(public_key: bytes) -> str:
    """The checksum address of a secp256k1 public key (33, 64 or 65 bytes)."""
    uncompressed = _public_key(public_key).format(compressed=False)
    return checksum_address(keccak256(uncompressed[1:])[12:])


def check_public_key(public_key: bytes, address: str) -> bytes:
    """The 65-byte uncompressed form of ``public_key`` if it is ``address``'s key
    (``keccak(pubkey)[12:] == address``), else ConfigError: a key is only ever wrapped
    to the participant the chain knows by that address."""
    derived = public_key_address(public_key)
    if derived.lower() != address.lower():
        raise ConfigError(
            f"public_key: belongs to {derived}, not to {address}; refusing to wrap a key to it"
        )
    return _public_key(public_key).format(compressed=False)


def _check_topic_id(topic_id: bytes) -> None:
    if not isinstance(topic_id, bytes | bytearray) or len(topic_id) != 32:
        raise ConfigError("topic_id: must be 32 bytes")


def wrap_topic_key(public_key: bytes, topic_id: bytes, epoch: int, key: bytes) -> bytes:
    """ECIES-encrypt ``(topic id, epoch, key)`` to ``public_key`` (check the key's address
    with :func:`check_public_key` first)."""
    _check_topic_id(topic_id)
    _check_epoch(epoch)
    _check_key(key)
    plain = _WRAP_MAGIC + bytes(topic_id) + epoch.to_bytes(4, "big") + bytes(key)
    return _ecies_encrypt(_public_key(public_key).format(compressed=False), plain, _ECIES)


def unwrap_topic_key(private_key: bytes, blob: bytes) -> tuple[bytes, int, bytes]:
    """``(topic id, epoch, key)`` from a :func:`wrap_topic_key` blob; DecryptionError if it
    was not wrapped to this private key, was altered or is malformed."""
    if not isinstance(private_key, bytes | bytearray) or len(private_key) != 32:
        raise ConfigError("private_key: must be 32 bytes")
    try:
        plain = _ecies_decrypt(bytes(private_key), bytes(blob), _ECIES)
    except Exception as exc:  # eciespy raises ValueError, TypeError or library errors
        raise DecryptionError(f"cannot unwrap the topic key: {type(exc).__name__}") from None
    if len(plain) != _WRAPPED_PLAIN_SIZE or not plain.startswith(_WRAP_MAGIC):
        raise DecryptionError("unwrapped topic key has an unknown format")
    body = plain[len(_WRAP_MAGIC) :]
    return body[:32], int.from_bytes(body[32:36], "big"), body[36:]
