"""The seller's topic-key service: grants, rotates and persists the keys of encrypted topics.

:class:`TopicKeyService` runs at the seller (see :mod:`._topic_keys` for the key messages and
the participants' keyrings). It holds, for each encrypted topic (listed in its configuration,
and served only while the seller marked it encrypted on chain with ``Market.setEncrypted``:
the mark is what buyers and brokers see), the current ``(epoch, key)`` persisted in
``state_dir`` (mode 0600), and hands the key, ECIES-wrapped to each recipient's public key
and signed by the seller, as a RETAINED message on ``blendsm/keys/<topic id>/<address>``.
It grants only to subscribers the chain entitles: ``Market.canSubscribe`` and an open,
not-closing channel from the subscriber to the seller. When one lost its right the topic key
rotates (see :meth:`TopicKeyService.sync`).

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
``asyncio.to_thread`` when the broker runs on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Unpack

from coincurve import PublicKey
from eth_account.signers.local import LocalAccount

from blendsm.errors import ConfigError, StoreError

from ._control import key_topic
from ._crypto import check_public_key, new_topic_key
from ._endpoint import BrokerEndpoint, EndpointArgs, resolve_endpoint
from ._keccak import checksum_address, keccak256
from ._mqtt import _MqttClient
from ._topic_keys import checked_address, encode_key_message, topic_id_of

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace

__all__ = ["STATE_FILE", "TOPIC_KEYS_STATE_FILE", "TopicKeyService", "sender_public_key"]

_log = logging.getLogger("blendsm.device_sdk")

TOPIC_KEYS_STATE_FILE: Final = "topic_keys.json"
"""Name of the service's state file in its ``state_dir`` (epochs, keys, granted subscribers)."""
STATE_FILE: Final = TOPIC_KEYS_STATE_FILE
"""The former name of :data:`TOPIC_KEYS_STATE_FILE`."""
_CHANNEL_OPENED: Final = keccak256(
    b"ChannelOpened(bytes32,address,address,address,address,uint256,uint16)"
)


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
        devices: Mapping[str, bytes] | None = None,
        publish_timeout: float = 10.0,
        endpoint: BrokerEndpoint | None = None,
        **connection: Unpack[EndpointArgs],
    ) -> None:
        super().__init__(account, resolve_endpoint(endpoint, connection, "TopicKeyService"))
        self.marketplace = marketplace
        self.publish_timeout = publish_timeout
        self.devices: dict[str, bytes] = {
            checked_address(a, "devices"): check_public_key(pk, a)
            for a, pk in (devices or {}).items()
        }
        names = list(dict.fromkeys(topics))
        if not names:
            raise ConfigError("topics: list at least one encrypted topic")
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.state_dir}: {exc}") from exc
        self._path = self.state_dir / TOPIC_KEYS_STATE_FILE
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
        address = checked_address(subscriber, "subscriber")
        if not await self.marketplace.market.can_subscribe(address, state.topic_id):
            return False
        return bool(await self._open_channels(address))

    async def public_key_of(self, subscriber: str) -> bytes:
        """The subscriber's public key, recovered from its channel-opening transaction."""
        address = checked_address(subscriber, "subscriber")
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
        address = checked_address(subscriber, "subscriber")
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
