"""Topic keys of encrypted paid topics: the seller's key service and the participants' keyrings.

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

Public keys of subscribers: recovered from the signature of the subscriber's own
``PaymentChannels.open`` transaction (the ``ChannelOpened`` log names it). A subscriber must
open a channel to the seller anyway, so this needs no new protocol, no extra message and no
trust in the broker; the recovered key is checked against the transaction's sender. A
subscriber whose channel was opened by a relayer (meta-transaction) can be granted with an
explicit ``public_key`` (still checked against its address).

Threading model: the service is async-first. Chain reads go through the async web3
:class:`~blendsm.contracts.Marketplace` on the caller's event loop; MQTT runs on paho's network
thread (as for every SDK client) and the service waits for PUBACKs in a worker thread
(``asyncio.to_thread``), so the loop is never blocked. ``connect()`` blocks: call it through
``asyncio.to_thread`` when the broker runs on the same loop. The keyring is thread-safe
(one lock; paho's thread feeds it, any thread reads it).

Key message on the wire (payload of a key topic)::

    1 byte version (1) || ECIES blob (see _crypto.wrap_topic_key) || 65-byte seller signature

The signature (secp256k1, low s, v 27/28) is over
``keccak256(b"BlendSM topic key v1" || topic id || recipient address (20) || keccak256(blob))``,
so a broker cannot hand a device a key of its own making. An empty payload clears the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as mqtt
from coincurve import PrivateKey, PublicKey
from eth_account.signers.local import LocalAccount

from blendsm.errors import BlendsmError, ConfigError, StoreError, VoucherSignatureError

from ._control import key_topic, parse_key_topic
from ._crypto import (
    AAD_LABEL,
    DecryptionError,
    check_public_key,
    new_topic_key,
    open_sealed,
    seal,
    unwrap_topic_key,
    wrap_topic_key,
)
from ._ecdsa import recover_address, sign_digest
from ._keccak import checksum_address, keccak256
from ._mqtt import _MqttClient

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace

__all__ = [
    "STATE_FILE",
    "NoTopicKeyError",
    "TopicKeyService",
    "TopicKeyring",
    "decode_key_message",
    "encode_key_message",
    "sender_public_key",
    "topic_id_of",
]

_log = logging.getLogger("blendsm.device_sdk")

STATE_FILE: Final = "topic_keys.json"
_KEY_MESSAGE_VERSION: Final = 1
_CHANNEL_OPENED: Final = keccak256(
    b"ChannelOpened(bytes32,address,address,address,address,uint256,uint16)"
)


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


def _address(value: str, what: str) -> str:
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
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        client_id: str | None = None,
        keepalive: int = 60,
    ) -> None:
        super().__init__(
            account,
            host=host,
            port=port,
            broker=broker,
            chain_id=chain_id,
            client_id=client_id,
            clean_session=True,
            keepalive=keepalive,
        )
        if not topics:
            raise ConfigError("topics: name at least one encrypted topic")
        self._names: dict[bytes, str] = {}
        self._sellers: dict[bytes, str] = {}
        for name, seller in topics.items():
            topic_id = topic_id_of(name)
            self._names[topic_id] = name
            self._sellers[topic_id] = _address(seller, f"topics[{name!r}]")
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


# --------------------------------------------------------------------------- service


class _TopicState:
    __slots__ = ("epoch", "key", "name", "subscribers", "topic_id")

    def __init__(
        self, name: str, epoch: int, key: bytes, subscribers: dict[str, bytes] | None = None
    ) -> None:
        self.name = name
        self.topic_id = topic_id_of(name)
        self.epoch = epoch
        self.key = key
        self.subscribers: dict[str, bytes] = subscribers or {}
        """Granted subscribers: checksum address -> uncompressed public key."""


class TopicKeyService(_MqttClient):
    """The seller's topic-key service (see the module doc): grants, rotates and persists keys.

    ``marketplace`` reads the chain (read-only is enough); ``topics`` are the seller's
    encrypted topics; ``devices`` maps each device address to its public key (checked).
    No key of a topic goes out (grant, devices, republish) unless ``Market.isEncrypted`` says
    the seller marked it encrypted on chain, so the configuration cannot disagree with what
    buyers and brokers read there.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        marketplace: Marketplace,
        topics: Iterable[str],
        state_dir: str | os.PathLike[str],
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        devices: Mapping[str, bytes] | None = None,
        client_id: str | None = None,
        keepalive: int = 60,
        publish_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            account,
            host=host,
            port=port,
            broker=broker,
            chain_id=chain_id,
            client_id=client_id,
            clean_session=True,
            keepalive=keepalive,
        )
        self.marketplace = marketplace
        self.publish_timeout = publish_timeout
        self.devices: dict[str, bytes] = {
            _address(a, "devices"): check_public_key(pk, a) for a, pk in (devices or {}).items()
        }
        names = list(dict.fromkeys(topics))
        if not names:
            raise ConfigError("topics: list at least one encrypted topic")
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.state_dir}: {exc}") from exc
        self._path = self.state_dir / STATE_FILE
        self._topics: dict[str, _TopicState] = self._load(names)
        self._save()

    # --- state -------------------------------------------------------------------------

    def _load(self, names: list[str]) -> dict[str, _TopicState]:
        stored: dict[str, Any] = {}
        if self._path.exists():
            try:
                data = json.loads(self._path.read_text())
                if data.get("v") != 1 or data.get("seller", "").lower() != self.address.lower():
                    raise StoreError(f"{self._path}: another seller's or an unknown state file")
                stored = data["topics"]
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise StoreError(f"{self._path}: unreadable topic key state: {exc}") from exc
        out: dict[str, _TopicState] = {}
        for name in names:
            entry = stored.get(name)
            if entry is None:
                out[name] = _TopicState(name, 1, new_topic_key())
            else:
                out[name] = _TopicState(
                    name,
                    int(entry["epoch"]),
                    bytes.fromhex(entry["key"]),
                    {a: bytes.fromhex(pk) for a, pk in entry["subscribers"].items()},
                )
        return out

    def _save(self) -> None:
        """Atomically replace the state file (0600, fsync) before any key leaves."""
        data = {
            "v": 1,
            "seller": self.address,
            "topics": {
                t.name: {
                    "epoch": t.epoch,
                    "key": t.key.hex(),
                    "subscribers": {a: pk.hex() for a, pk in sorted(t.subscribers.items())},
                }
                for t in self._topics.values()
            },
        }
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(data, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)

    def epoch(self, topic: str) -> int:
        """The current key epoch of an encrypted ``topic``."""
        return self._state(topic).epoch

    def subscribers(self, topic: str) -> list[str]:
        """The subscribers currently granted ``topic``'s key."""
        return sorted(self._state(topic).subscribers)

    def _state(self, topic: str) -> _TopicState:
        state = self._topics.get(topic)
        if state is None:
            raise ConfigError(f"topic: {topic!r} is not an encrypted topic of this service")
        return state

    # --- chain -------------------------------------------------------------------------

    async def _open_channels(self, subscriber: str) -> list[tuple[bytes, bytes]]:
        """``(channel id, opening tx hash)`` of the subscriber's usable channels to us."""
        from eth_utils import to_checksum_address  # web3's dependency: chain side only

        mp = self.marketplace
        logs = await mp.w3.eth.get_logs(
            {
                "address": to_checksum_address(mp.channels.address),
                "fromBlock": mp.deployment.block,
                "toBlock": "latest",
                "topics": [
                    "0x" + _CHANNEL_OPENED.hex(),
                    None,
                    "0x" + bytes(12).hex() + subscriber[2:].lower(),
                    "0x" + bytes(12).hex() + self.address[2:].lower(),
                ],
            }
        )
        usable: list[tuple[bytes, bytes]] = []
        for entry in reversed(logs):
            channel_id = bytes(entry["topics"][1])
            info = await mp.channels.channel(channel_id)
            if info is not None and not info.settled and not info.closing:
                usable.append((channel_id, bytes(entry["transactionHash"])))
        return usable

    async def marked_encrypted(self, topic: str) -> bool:
        """Whether ``Market.isEncrypted`` holds for ``topic`` (one of this service's topics)."""
        return await self.marketplace.market.is_encrypted(self._state(topic).topic_id)

    async def _servable(self, topic: str) -> bool:
        if await self.marked_encrypted(topic):
            return True
        _log.warning(
            "%s: %r is not marked encrypted on chain (Market.setEncrypted): no key is sent",
            self.address,
            topic,
        )
        return False

    async def entitled(self, subscriber: str, topic: str) -> bool:
        """Whether the chain entitles ``subscriber`` to ``topic``: ``Market.canSubscribe``
        and an open, not-closing channel from the subscriber to this seller."""
        state = self._state(topic)
        address = _address(subscriber, "subscriber")
        if not await self.marketplace.market.can_subscribe(address, state.topic_id):
            return False
        return bool(await self._open_channels(address))

    async def public_key_of(self, subscriber: str) -> bytes:
        """The subscriber's public key, recovered from its channel-opening transaction."""
        address = _address(subscriber, "subscriber")
        channels = await self._open_channels(address)
        if not channels:
            raise ConfigError(f"{address} has no open channel to {self.address}")
        return await sender_public_key(self.marketplace.w3, channels[0][1], address)

    # --- granting ------------------------------------------------------------------------

    async def _send(self, topic: str, payload: bytes) -> None:
        info = self._publish(topic, payload, 1, True)
        await asyncio.to_thread(info.wait_for_publish, self.publish_timeout)

    async def _send_key(self, state: _TopicState, recipient: str, public_key: bytes) -> None:
        payload = encode_key_message(
            self._key, state.topic_id, recipient, public_key, state.epoch, state.key
        )
        await self._send(key_topic(state.topic_id, recipient), payload)

    async def grant(
        self,
        subscriber: str,
        public_key: bytes | None = None,
        *,
        topics: Iterable[str] | None = None,
    ) -> list[str]:
        """Publish the current key of each topic (all encrypted topics by default) to
        ``subscriber`` if the chain marks the topic encrypted and entitles the subscriber; the
        topics granted. ``public_key`` defaults to the one recovered from its channel-opening
        transaction; it must match the address."""
        address = _address(subscriber, "subscriber")
        granted: list[str] = []
        for name in list(topics) if topics is not None else list(self._topics):
            state = self._state(name)
            if not await self._servable(name):
                continue
            if not await self.entitled(address, name):
                _log.info("%s: %s is not entitled to %r: no key", self.address, address, name)
                continue
            if public_key is None:
                public_key = await self.public_key_of(address)
            state.subscribers[address] = check_public_key(public_key, address)
            self._save()
            await self._send_key(state, address, state.subscribers[address])
            granted.append(name)
        return granted

    async def grant_devices(self, topics: Iterable[str] | None = None) -> list[str]:
        """Publish the current key of each topic (all by default) that the chain marks
        encrypted to every configured device; the topics served."""
        served: list[str] = []
        for name in list(topics) if topics is not None else list(self._topics):
            state = self._state(name)
            if not await self._servable(name):
                continue
            for device, public_key in self.devices.items():
                await self._send_key(state, device, public_key)
            served.append(name)
        return served

    async def rotate(self, reason: str, *, topics: Iterable[str] | None = None) -> dict[str, int]:
        """Start a new epoch with a fresh key for each topic (all by default): persisted
        first, then wrapped to every still-entitled subscriber, then to the devices (so
        subscribers hold the key before any message uses it); subscribers no longer
        entitled are dropped and their retained key cleared. The new epochs by topic."""
        out: dict[str, int] = {}
        for name in list(topics) if topics is not None else list(self._topics):
            state = self._state(name)
            keep: dict[str, bytes] = {}
            dropped: list[str] = []
            for address, public_key in state.subscribers.items():
                if await self.entitled(address, name):
                    keep[address] = public_key
                else:
                    dropped.append(address)
            state.epoch += 1
            state.key = new_topic_key()
            state.subscribers = keep
            self._save()
            _log.info(
                "%s: key of %r rotated to epoch %d (%s); dropped %s",
                self.address,
                name,
                state.epoch,
                reason,
                dropped or "nobody",
            )
            for address in dropped:
                await self._send(key_topic(state.topic_id, address), b"")
            for address, public_key in keep.items():
                await self._send_key(state, address, public_key)
            for device, public_key in self.devices.items():
                await self._send_key(state, device, public_key)
            out[name] = state.epoch
        return out

    async def watch(self, interval: float = 5.0) -> None:
        """Run :meth:`sync` every ``interval`` seconds until :meth:`stop_watching` (or the task
        is cancelled): a right that ends on chain (revoked, denylisted, channel closing) makes
        the key rotate within one interval. Chain or MQTT errors are logged and retried."""
        if not interval > 0:
            raise ConfigError(f"interval: must be > 0, got {interval!r}")
        self._watching = asyncio.Event()
        while not self._watching.is_set():
            try:
                rotated = await self.sync()
                if rotated:
                    _log.info("topic keys rotated: %s", rotated)
            except Exception as exc:  # the chain or the broker is away: try again later
                _log.warning("topic key sync failed, retrying in %.1fs: %s", interval, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watching.wait(), timeout=interval)

    def stop_watching(self) -> None:
        """End :meth:`watch`."""
        watching = getattr(self, "_watching", None)
        if watching is not None:
            watching.set()

    async def sync(self, *, republish: bool = False) -> dict[str, int]:
        """Re-check every granted subscriber against the chain and rotate each topic where
        one lost its right; with ``republish``, (re)send the current keys of the others and
        of the devices (after a restart). Run it periodically or on chain events (Registry
        revocations, Market access changes, CloseRequested). The rotated topics' epochs."""
        rotated: dict[str, int] = {}
        for name, state in self._topics.items():
            lost = [a for a in state.subscribers if not await self.entitled(a, name)]
            if lost:
                rotated.update(await self.rotate(f"right ended: {', '.join(lost)}", topics=[name]))
            elif republish and await self._servable(name):
                for address, public_key in state.subscribers.items():
                    await self._send_key(state, address, public_key)
                await self.grant_devices([name])
        return rotated


# --------------------------------------------------------------------------- chain helper


def _access_list(value: Any) -> list[dict[str, Any]]:
    return [
        {
            "address": checksum_address(bytes.fromhex(str(item["address"])[2:])),
            "storageKeys": [
                "0x" + bytes(k).hex() if isinstance(k, bytes) else k for k in item["storageKeys"]
            ],
        }
        for item in value or []
    ]


async def sender_public_key(w3: Any, tx_hash: bytes, sender: str) -> bytes:
    """The uncompressed public key that signed transaction ``tx_hash``, checked to be
    ``sender``'s (ConfigError otherwise, e.g. an unsupported transaction type)."""
    from eth_account._utils.legacy_transactions import (
        serializable_unsigned_transaction_from_dict,
    )

    tx = await w3.eth.get_transaction(tx_hash)
    raw_type = tx.get("type", 0) or 0
    kind = int(raw_type, 16) if isinstance(raw_type, str) else int(raw_type)
    data = bytes(tx["input"])
    fields: dict[str, Any] = {
        "nonce": int(tx["nonce"]),
        "gas": int(tx["gas"]),
        "to": tx["to"],
        "value": int(tx["value"]),
        "data": data,
    }
    v = int(tx["v"])
    if kind == 0:
        fields["gasPrice"] = int(tx["gasPrice"])
        if v >= 35:
            fields["chainId"] = (v - 35) // 2
            recid = v - 35 - 2 * fields["chainId"]
        else:
            recid = v - 27
    elif kind in (1, 2):
        fields["type"] = kind
        fields["chainId"] = int(tx["chainId"])
        fields["accessList"] = _access_list(tx.get("accessList"))
        if kind == 1:
            fields["gasPrice"] = int(tx["gasPrice"])
        else:
            fields["maxFeePerGas"] = int(tx["maxFeePerGas"])
            fields["maxPriorityFeePerGas"] = int(tx["maxPriorityFeePerGas"])
        recid = int(tx.get("yParity", v))
    else:
        raise ConfigError(f"transaction type {kind} not supported for public key recovery")
    digest = serializable_unsigned_transaction_from_dict(fields).hash()
    r = int.from_bytes(bytes(tx["r"]), "big") if not isinstance(tx["r"], int) else tx["r"]
    s = int.from_bytes(bytes(tx["s"]), "big") if not isinstance(tx["s"], int) else tx["s"]
    try:
        public = PublicKey.from_signature_and_message(
            r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((recid,)), digest, hasher=None
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot recover the signer of {tx_hash.hex()}: {exc}") from None
    uncompressed = public.format(compressed=False)
    recovered = checksum_address(keccak256(uncompressed[1:])[12:])
    if recovered.lower() != sender.lower() or recovered.lower() != str(tx["from"]).lower():
        raise ConfigError(f"transaction {tx_hash.hex()}: recovered {recovered}, expected {sender}")
    return uncompressed
