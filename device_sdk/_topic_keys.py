"""Topic keys of encrypted paid topics: the key messages and the participants' keyrings.

Who does what:

- :class:`TopicKeyService` runs at the seller. It holds, for each encrypted topic (listed in
  its configuration, and served only while the seller marked it encrypted on chain with
  ``Market.setEncrypted``: the mark is what buyers and brokers see), the current ``(epoch, key)``
  persisted in ``state_dir`` (mode 0600), and hands the key, ECIES-wrapped to each recipient's
  public key and signed by the seller, as a RETAINED message on
  ``blendsm/keys/<topic id>/<address>`` (the broker lets only the topic's seller publish
  there and only ``<address>`` receive it). It grants only to subscribers the chain entitles:
  ``Market.canSubscribe`` and an open, not-closing channel from the subscriber to the seller.
  :meth:`TopicKeyService.sync` re-checks every known subscriber; when one lost its right
  (revoked, denylisted, channel closing or closed) the topic key rotates: a new epoch goes to
  the still-entitled subscribers first, then to the seller's devices, and the retained key
  of those no longer entitled is cleared (empty retained payload).
- :class:`TopicKeyring` runs at a subscriber or a device: it subscribes to its own key topics,
  checks the seller's signature, unwraps keys with its private key and keeps every epoch it
  got, so :meth:`TopicKeyring.decrypt` opens old and new messages and
  :meth:`TopicKeyring.encryptor` (the Publisher's ``encryptor``) seals with the latest epoch.

The service lives in :mod:`._topic_key_service` (seller side, chain reads, state file); this
module holds what both sides share: the key message codec and the participant's keyring.
The keyring is thread-safe (one lock; paho's thread feeds it, any thread reads it).

Key message on the wire (payload of a key topic)::

    1 byte version (1) || ECIES blob (see _crypto.wrap_topic_key) || 65-byte seller signature

The signature (secp256k1, low s, v 27/28) is over
``keccak256(b"BlendSM topic key v1" || topic id || recipient address (20) || keccak256(blob))``,
so a broker cannot hand a device a key of its own making. An empty payload clears the key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Final, Unpack

import paho.mqtt.client as mqtt
from coincurve import PrivateKey
from eth_account.signers.local import LocalAccount

from blendsm.errors import BlendsmError, ConfigError, VoucherSignatureError

from ._control import key_topic, parse_key_topic
from ._crypto import (
    AAD_LABEL,
    DecryptionError,
    check_public_key,
    open_sealed,
    seal,
    unwrap_topic_key,
    wrap_topic_key,
)
from ._ecdsa import recover_address, sign_digest
from ._endpoint import BrokerEndpoint, EndpointArgs, resolve_endpoint
from ._keccak import checksum_address, keccak256
from ._mqtt import _MqttClient

__all__ = [
    "NoTopicKeyError",
    "TopicKeyring",
    "checked_address",
    "decode_key_message",
    "encode_key_message",
    "topic_id_of",
]

_log = logging.getLogger("blendsm.device_sdk")

_KEY_MESSAGE_VERSION: Final = 1


class NoTopicKeyError(BlendsmError, LookupError):
    """No key is known (yet, or any more) for an encrypted topic: nothing is sent in clear."""


def topic_id_of(topic: str) -> bytes:
    """The on-chain id of a topic name: keccak256 of its UTF-8 bytes (as ``Market``)."""
    return keccak256(topic.encode())


def _key_message_digest(topic_id: bytes, recipient: bytes, blob: bytes) -> bytes:
    return keccak256(AAD_LABEL + topic_id + recipient + keccak256(blob))


def encode_key_message(
    seller_key: bytes, topic_id: bytes, recipient: str, public_key: bytes, epoch: int, key: bytes
) -> bytes:
    """The signed, wrapped key message for ``recipient`` (its ``public_key`` is checked)."""
    uncompressed = check_public_key(public_key, recipient)
    blob = wrap_topic_key(uncompressed, topic_id, epoch, key)
    digest = _key_message_digest(topic_id, bytes.fromhex(recipient[2:]), blob)
    return bytes((_KEY_MESSAGE_VERSION,)) + blob + sign_digest(PrivateKey(seller_key), digest)


def decode_key_message(
    private_key: bytes, recipient: str, seller: str, topic_id: bytes, payload: bytes
) -> tuple[int, bytes]:
    """``(epoch, key)`` from a key message for ``recipient`` on ``topic_id``; DecryptionError
    unless it is signed by ``seller``, wrapped to ``private_key`` and bound to that topic."""
    raw = bytes(payload)
    if len(raw) < 1 + 65 + 1 or raw[0] != _KEY_MESSAGE_VERSION:
        raise DecryptionError("key message malformed or of an unknown version")
    blob, signature = raw[1:-65], raw[-65:]
    digest = _key_message_digest(topic_id, bytes.fromhex(recipient[2:]), blob)
    try:
        signer = recover_address(digest, signature)
    except VoucherSignatureError as exc:
        raise DecryptionError(f"key message signature malformed: {exc}") from None
    if signer != bytes.fromhex(seller[2:]):
        raise DecryptionError(
            f"key message signed by {checksum_address(signer)}, not by the seller {seller}"
        )
    wrapped_topic, epoch, key = unwrap_topic_key(private_key, blob)
    if wrapped_topic != topic_id:
        raise DecryptionError("key message wraps the key of another topic")
    return epoch, key


def checked_address(value: str, what: str) -> str:
    """The checksum form of a 0x-prefixed 40-hex-digit address, else ConfigError naming
    ``what`` (no EIP-55 check: configuration may spell addresses in any case)."""
    text = str(value)
    if len(text) != 42 or not text.startswith("0x"):
        raise ConfigError(f"{what}: not an address: {value!r}")
    try:
        return checksum_address(bytes.fromhex(text[2:]))
    except ValueError:
        raise ConfigError(f"{what}: not an address: {value!r}") from None


# --------------------------------------------------------------------------- keyring


class TopicKeyring(_MqttClient):
    """The topic keys one participant (subscriber or device) was granted.

    ``topics`` maps each encrypted topic name to its seller's address (key messages must be
    signed by it). Connect it (its own MQTT session, with the participant's key) and it
    subscribes to ``blendsm/keys/<topic id>/<own address>`` and keeps every epoch it gets;
    or feed it messages received elsewhere with :meth:`accept`.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        topics: Mapping[str, str],
        endpoint: BrokerEndpoint | None = None,
        **connection: Unpack[EndpointArgs],
    ) -> None:
        super().__init__(account, resolve_endpoint(endpoint, connection, "TopicKeyring"))
        if not topics:
            raise ConfigError("topics: name at least one encrypted topic")
        self._names: dict[bytes, str] = {}
        self._sellers: dict[bytes, str] = {}
        for name, seller in topics.items():
            topic_id = topic_id_of(name)
            self._names[topic_id] = name
            self._sellers[topic_id] = checked_address(seller, f"topics[{name!r}]")
        self._keys: dict[bytes, dict[int, bytes]] = {t: {} for t in self._names}
        self._current: dict[bytes, int | None] = dict.fromkeys(self._names)
        self._changed = threading.Condition()

    # --- reading -----------------------------------------------------------------------

    def epoch(self, topic: str) -> int | None:
        """The latest epoch granted for ``topic``; None before any grant or after a revocation."""
        with self._changed:
            return self._current.get(topic_id_of(topic))

    def epochs(self, topic: str) -> list[int]:
        """Every epoch whose key this keyring holds for ``topic`` (old ones included)."""
        with self._changed:
            return sorted(self._keys.get(topic_id_of(topic), {}))

    def wait_for_epoch(self, topic: str, epoch: int, timeout: float = 10.0) -> bool:
        """Wait until the latest epoch of ``topic`` is at least ``epoch``."""
        topic_id = topic_id_of(topic)
        with self._changed:
            return self._changed.wait_for(
                lambda: (self._current.get(topic_id) or 0) >= epoch, timeout
            )

    def wait_for_revocation(self, topic: str, timeout: float = 10.0) -> bool:
        """Wait until the seller cleared this participant's key of ``topic``."""
        topic_id = topic_id_of(topic)
        with self._changed:
            return self._changed.wait_for(
                lambda: self._current.get(topic_id) is None and bool(self._keys.get(topic_id)),
                timeout,
            )

    def decrypt(self, topic: str, payload: bytes) -> bytes:
        """The plaintext of an encrypted envelope payload of ``topic`` (any epoch held);
        DecryptionError when this keyring never got that epoch's key or the bytes are bad."""
        topic_id = topic_id_of(topic)
        with self._changed:
            keys = dict(self._keys.get(topic_id, {}))
        return open_sealed(keys.get, topic, payload)

    def encryptor(self, topic: str, plaintext: bytes) -> bytes:
        """Seal ``plaintext`` with the latest key of ``topic``: the Publisher's ``encryptor``.
        NoTopicKeyError (nothing is published) when no current key is held."""
        topic_id = topic_id_of(topic)
        with self._changed:
            epoch = self._current.get(topic_id)
            key = None if epoch is None else self._keys[topic_id][epoch]
        if epoch is None or key is None:
            raise NoTopicKeyError(f"no current key for encrypted topic {topic!r}")
        return seal(key, epoch, topic, plaintext)

    # --- feeding -----------------------------------------------------------------------

    def accept(self, topic_name: str, payload: bytes | bytearray) -> int | None:
        """Take one key message (``topic_name`` is its key topic); the epoch learned, or None
        for a clearing (empty) message. DecryptionError/ConfigError for foreign messages."""
        parsed = parse_key_topic(topic_name)
        if parsed is None or parsed[1] != self.address.lower():
            raise ConfigError(f"{topic_name!r} is not a key topic of {self.address}")
        topic_id = parsed[0]
        if topic_id not in self._names:
            raise ConfigError(f"{topic_name!r} is the key topic of a topic not configured here")
        if not payload:
            with self._changed:
                self._current[topic_id] = None
                self._changed.notify_all()
            _log.info("%s: key of %r cleared by the seller", self.address, self._names[topic_id])
            return None
        epoch, key = decode_key_message(
            self._key, self.address, self._sellers[topic_id], topic_id, bytes(payload)
        )
        with self._changed:
            self._keys[topic_id][epoch] = key
            current = self._current[topic_id]
            if current is None or epoch >= current:
                self._current[topic_id] = epoch
            self._changed.notify_all()
        return epoch

    # --- MQTT --------------------------------------------------------------------------

    def _key_topics(self) -> list[str]:
        return [key_topic(t, self.address) for t in self._names]

    def _after_connect(self, timeout: float) -> None:
        for name in self._key_topics():
            self._subscribe(name, 1, timeout)

    def _on_reconnected(self, session_present: bool) -> None:
        if not session_present:
            for name in self._key_topics():
                self._subscribe(name, 1, None)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        try:
            self.accept(message.topic, message.payload)
        except (DecryptionError, ConfigError) as exc:
            _log.warning("%s: key message on %r refused: %s", self.address, message.topic, exc)
