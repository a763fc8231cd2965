"""Typed async bindings of the marketplace contracts, for the broker and the SDK.

One class per contract, each a web3 contract object plus an optional
:class:`~blendsm.contracts.Transactor` for writes; :class:`Marketplace` bundles them from a
:class:`~blendsm.contracts.Deployment`. This module holds membership (Registry), the catalogue
(Market), anchors and ratings, and the bundle; the money side is in :mod:`._channels`, the
shared machinery in :mod:`._binding_base`, the returned values in :mod:`._records`.

Reads go through web3's contract layer (~4 ms a call, see FIELD-NOTES): the broker caches what
it reads and never reads on its delivery path, so simplicity wins over raw ``eth_call`` here.
Every method runs inside :func:`~blendsm.contracts.chain_errors`, so a custom error comes out
as ``ContractRevertError(error_name, error_args)`` and a dead endpoint as
``ChainUnavailableError``. Results are our frozen dataclasses, never web3 AttributeDicts, and
every write reports the gas it used. Addresses come back in checksum form; the zero address
comes back as None where it means "nobody" (native coin, no operator, unknown device).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3

from blendsm.contracts._binding_base import (
    Binding,
    addr,
    addr_or_zero,
    bytes32,
    none_if_zero,
    tx_fields,
)
from blendsm.contracts._brokers import Brokers
from blendsm.contracts._channels import Erc20, PaymentChannels
from blendsm.contracts._deploy import Deployment
from blendsm.contracts._records import (
    ORACLE_ROLE,
    AnchorInfo,
    Participant,
    Policy,
    RatingInfo,
    Role,
    Status,
    TopicCreation,
    TopicInfo,
    TxResult,
)
from blendsm.contracts._revert import chain_errors
from blendsm.contracts._transactor import Transactor
from blendsm.errors import ConfigError

__all__ = ["DataAnchors", "Market", "Marketplace", "Ratings", "Registry"]


class Registry(Binding):
    """Membership (apply, approve by an oracle, revoke, leave) and device ownership."""

    NAME = "Registry"

    async def apply_for_role(self, role: Role) -> TxResult:
        return await self._simple("applyForRole", int(Role(role)))

    async def approve(self, account: str) -> TxResult:
        """Admit a pending applicant (oracle only)."""
        return await self._simple("approve", addr(account))

    async def reject(self, account: str) -> TxResult:
        return await self._simple("reject", addr(account))

    async def revoke(self, account: str) -> TxResult:
        """Revoke an active participant for good (oracle only)."""
        return await self._simple("revoke", addr(account))

    async def leave(self) -> TxResult:
        return await self._simple("leave")

    async def add_device(self, device: str) -> TxResult:
        return await self._simple("addDevice", addr(device))

    async def remove_device(self, device: str) -> TxResult:
        return await self._simple("removeDevice", addr(device))

    async def is_active(self, account: str) -> bool:
        return bool(await self._read("isActive", addr(account)))

    async def has_active_role(self, account: str, role: Role) -> bool:
        return bool(await self._read("hasActiveRole", addr(account), int(Role(role))))

    async def participant(self, account: str) -> Participant:
        role, status = await self._read("participant", addr(account))
        return Participant(Role(role), Status(status))

    async def device_owner(self, device: str) -> str | None:
        """The seller that registered ``device``, whatever its status; None if unregistered."""
        return none_if_zero(await self._read("deviceOwner", addr(device)))

    async def device_count(self, seller: str) -> int:
        return int(await self._read("deviceCount", addr(seller)))

    async def active_seller_of(self, device: str) -> str | None:
        """The seller ``device`` acts for, None if unregistered or its seller is not active."""
        return none_if_zero(await self._read("activeSellerOf", addr(device)))

    async def is_oracle(self, account: str) -> bool:
        return bool(await self._read("hasRole", ORACLE_ROLE, addr(account)))


class Market(Binding):
    """Topics (data products), their prices and access policies."""

    NAME = "Market"

    @staticmethod
    def topic_id(name: str) -> bytes:
        """keccak256 of the UTF-8 topic name, as the contract computes it."""
        return bytes(keccak(name.encode()))

    async def create_topic(
        self,
        name: str,
        price: int,
        token: str | None = None,
        policy: Policy = Policy.OPEN,
        min_rating_x100: int = 0,
    ) -> TopicCreation:
        """Register ``name`` (active sellers only); ``token`` None prices it in the native coin."""
        receipt = await self._write(
            "createTopic", name, price, addr_or_zero(token), int(Policy(policy)), min_rating_x100
        )
        topic_id = bytes(self._one_event(receipt, "TopicCreated")["args"]["topicId"])
        return TopicCreation(**tx_fields(receipt), topic_id=topic_id)

    async def set_price(self, topic_id: bytes, price: int) -> TxResult:
        return await self._simple("setPrice", bytes32(topic_id, "topic_id"), price)

    async def set_policy(
        self, topic_id: bytes, policy: Policy, min_rating_x100: int = 0
    ) -> TxResult:
        return await self._simple(
            "setPolicy", bytes32(topic_id, "topic_id"), int(Policy(policy)), min_rating_x100
        )

    async def set_access(
        self, topic_id: bytes, accounts: Iterable[str], listed: bool = True
    ) -> TxResult:
        """Put ``accounts`` on (or, ``listed=False``, off) the topic's allow/deny list."""
        return await self._simple(
            "setAccess", bytes32(topic_id, "topic_id"), [addr(a) for a in accounts], listed
        )

    async def pause(self, topic_id: bytes) -> TxResult:
        return await self._simple("pause", bytes32(topic_id, "topic_id"))

    async def resume(self, topic_id: bytes) -> TxResult:
        return await self._simple("resume", bytes32(topic_id, "topic_id"))

    async def set_encrypted(self, topic_id: bytes, encrypted: bool = True) -> TxResult:
        """Mark the topic end-to-end encrypted (or, ``encrypted=False``, in clear); the topic's
        seller only; reverts (MarketEncryptionUnchanged) if it is in that state already."""
        return await self._simple("setEncrypted", bytes32(topic_id, "topic_id"), bool(encrypted))

    async def is_encrypted(self, topic_id: bytes) -> bool:
        """Whether the topic's seller marked it encrypted (False for an unknown topic)."""
        return bool(await self._read("isEncrypted", bytes32(topic_id, "topic_id")))

    async def can_subscribe(self, buyer: str, topic_id: bytes) -> bool:
        return bool(await self._read("canSubscribe", addr(buyer), bytes32(topic_id, "topic_id")))

    async def can_publish(self, device: str, topic_id: bytes) -> bool:
        return bool(await self._read("canPublish", addr(device), bytes32(topic_id, "topic_id")))

    async def is_listed(self, topic_id: bytes, account: str) -> bool:
        return bool(await self._read("isListed", bytes32(topic_id, "topic_id"), addr(account)))

    async def topic(self, topic_id: bytes) -> TopicInfo | None:
        """The topic's record (with ``isEncrypted``), None if no topic has this id."""
        seller, paused, policy, min_rating, token, price, name = await self._read(
            "topic", bytes32(topic_id, "topic_id")
        )
        if int(seller, 16) == 0:
            return None
        encrypted = await self.is_encrypted(topic_id)
        return TopicInfo(
            topic_id=bytes(topic_id),
            name=name,
            seller=addr(seller),
            token=none_if_zero(token),
            price=int(price),
            policy=Policy(policy),
            min_rating_x100=int(min_rating),
            paused=bool(paused),
            encrypted=encrypted,
        )

    async def topic_count(self) -> int:
        return int(await self._read("topicCount"))

    async def topic_ids(self) -> list[bytes]:
        """Every topic id in creation order (one call per topic: for cache warm-up, not loops)."""
        return [bytes(await self._read("topicIdAt", i)) for i in range(await self.topic_count())]


class DataAnchors(Binding):
    """Merkle roots of delivered message batches, per broker operator."""

    NAME = "DataAnchors"

    async def anchor(self, batch_id: int, root: bytes, leaf_count: int) -> TxResult:
        """Anchor a batch root (active operators only; ``batch_id`` strictly increasing)."""
        return await self._simple("anchor", batch_id, bytes32(root, "root"), leaf_count)

    async def anchor_of(self, broker: str, batch_id: int) -> AnchorInfo | None:
        """The anchored batch, None if ``broker`` never anchored ``batch_id``."""
        root, leaf_count, anchored_at, block_number = await self._read(
            "anchorOf", addr(broker), batch_id
        )
        if not any(root):
            return None
        return AnchorInfo(
            addr(broker),
            batch_id,
            bytes(root),
            int(leaf_count),
            int(anchored_at),
            int(block_number),
        )

    _ANCHORED = keccak(text="Anchored(address,uint256,bytes32,uint64)")

    def anchored_in(self, receipt: Any, broker: str, batch_id: int) -> tuple[bytes, int] | None:
        """``(root, leaf_count)`` of the ``Anchored`` event this contract emitted for
        ``broker``'s ``batch_id`` in a transaction's ``receipt``; None if there is none.

        Why: after a successful ``anchor`` the event says what ``anchorOf`` would, in the
        block the receipt names, without another call to the node (one a root, on the loop
        that delivers). Decoded by hand (two indexed topics, two words of data)."""
        broker_topic = bytes(12) + bytes.fromhex(addr(broker)[2:])
        for log in receipt["logs"]:
            topics = log["topics"]
            if (
                log["address"] == self.contract.address
                and len(topics) == 3
                and bytes(topics[0]) == self._ANCHORED
                and bytes(topics[1]) == broker_topic
                and int.from_bytes(bytes(topics[2]), "big") == batch_id
            ):
                data = bytes(log["data"])
                if len(data) != 64:
                    return None
                return data[:32], int.from_bytes(data[32:], "big")
        return None

    async def latest_batch_id(self, broker: str) -> int:
        return int(await self._read("latestBatchId", addr(broker)))

    async def verify(self, broker: str, batch_id: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
        """Whether ``proof`` shows ``leaf`` is in the anchored batch (checked on chain)."""
        return bool(
            await self._read(
                "verify",
                addr(broker),
                batch_id,
                bytes32(leaf, "leaf"),
                [bytes32(p, "proof item") for p in proof],
            )
        )


class Ratings(Binding):
    """Ratings between the payer and payee of a channel that paid or settled."""

    NAME = "Ratings"

    async def rate(self, channel_id: bytes, score: int) -> TxResult:
        """Rate the other party of ``channel_id`` with 1..5, once per channel."""
        return await self._simple("rate", bytes32(channel_id, "channel_id"), score)

    async def rating_of(self, account: str) -> RatingInfo:
        count, total = await self._read("ratingOf", addr(account))
        return RatingInfo(addr(account), int(count), int(total))

    async def average_x100(self, account: str) -> int:
        return int(await self._read("averageX100", addr(account)))

    async def has_rated(self, channel_id: bytes, rater: str) -> bool:
        return bool(await self._read("hasRated", bytes32(channel_id, "channel_id"), addr(rater)))


class Marketplace:
    """The bindings of one deployment, sharing one Transactor (so nonces never collide).

    Without ``account`` (or ``transactor``) the bundle is read-only and writes raise ConfigError.
    """

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        deployment: Deployment,
        account: LocalAccount | None = None,
        *,
        transactor: Transactor | None = None,
        confirmations: int = 0,
    ) -> None:
        if transactor is None and account is not None:
            transactor = Transactor(w3, account, confirmations=confirmations)
        self.w3 = w3
        self.deployment = deployment
        self.transactor = transactor
        self.registry = Registry(w3, deployment.address("Registry"), transactor)
        self.market = Market(w3, deployment.address("Market"), transactor)
        self.channels = PaymentChannels(w3, deployment.address("PaymentChannels"), transactor)
        self.anchors = DataAnchors(w3, deployment.address("DataAnchors"), transactor)
        self.ratings = Ratings(w3, deployment.address("Ratings"), transactor)
        self._brokers: Brokers | None = None

    @property
    def brokers(self) -> Brokers:
        """The Brokers binding; ConfigError if the deployment predates that contract."""
        if self._brokers is None:
            if "Brokers" not in self.deployment.addresses:
                raise ConfigError(
                    "this deployment has no Brokers contract (it predates it): add one with"
                    " `blendsm deploy --chain URL --upgrade FILE`"
                )
            self._brokers = Brokers(self.w3, self.deployment.address("Brokers"), self.transactor)
        return self._brokers

    @property
    def address(self) -> str | None:
        """The signing account, None when read-only."""
        return None if self.transactor is None else self.transactor.address

    def as_account(self, account: LocalAccount, *, confirmations: int | None = None) -> Marketplace:
        """The same deployment and connection, signing as ``account``."""
        if confirmations is None:
            confirmations = self.transactor.confirmations if self.transactor is not None else 0
        return Marketplace(self.w3, self.deployment, account, confirmations=confirmations)

    def token(self, address: str) -> Erc20:
        """An ERC-20 token, signing as this bundle's account."""
        return Erc20(self.w3, address, self.transactor)

    async def check(self) -> None:
        """Raise ConfigError unless the endpoint is the deployment's chain and every contract
        has code there (a stale deployment file or the wrong endpoint)."""
        with chain_errors("check deployment"):
            chain_id = int(await self.w3.eth.chain_id)
            if chain_id != self.deployment.chain_id:
                raise ConfigError(
                    f"deployment is for chain id {self.deployment.chain_id}, the endpoint is chain id {chain_id}"
                )
            for name, address in sorted(self.deployment.addresses.items()):
                if not await self.w3.eth.get_code(to_checksum_address(address)):
                    raise ConfigError(f"deployment: no contract code for {name} at {address}")
