"""Typed async bindings of the marketplace contracts, for the broker and the SDK.

One class per contract, each a web3 contract object plus an optional
:class:`~blendsm.contracts._transactor.Transactor` for writes; :class:`Marketplace` bundles the
five from a :class:`~blendsm.contracts._deploy.Deployment`. Reads go through web3's contract
layer (~4 ms a call, see FIELD-NOTES): the broker caches what it reads and never reads on its
delivery path, so simplicity wins over raw ``eth_call`` here. Every method runs inside
:func:`~blendsm.contracts._revert.chain_errors`, so a custom error comes out as
``ContractRevertError(error_name, error_args)`` and a dead endpoint as ``ChainUnavailableError``.
Results are our frozen dataclasses, never web3 AttributeDicts, and every write reports the gas
it used. Addresses come back in checksum form; the zero address comes back as None where it
means "nobody" (native coin, no operator, unknown device).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Final

from eth_abi import encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.logs import DISCARD
from web3.types import EventData, TxReceipt

from blendsm.contracts._deploy import Deployment, contract_at
from blendsm.contracts._revert import chain_errors
from blendsm.contracts._transactor import Transactor
from blendsm.errors import ChainError, ConfigError

if TYPE_CHECKING:
    from blendsm.device_sdk import VoucherDomain

__all__ = [
    "ORACLE_ROLE",
    "ZERO_ADDRESS",
    "AnchorInfo",
    "ChannelInfo",
    "ChannelOpening",
    "ClaimReceipt",
    "CloseRequest",
    "DataAnchors",
    "DomainInfo",
    "Erc20",
    "Market",
    "Marketplace",
    "Participant",
    "PaymentChannels",
    "Policy",
    "RatingInfo",
    "Ratings",
    "Registry",
    "Role",
    "Settlement",
    "Status",
    "TopicCreation",
    "TopicInfo",
    "TxResult",
]

ZERO_ADDRESS: Final = "0x0000000000000000000000000000000000000000"
#: ``Registry.ORACLE_ROLE``: the administrators who admit, reject and revoke participants.
ORACLE_ROLE: Final = keccak(text="ORACLE_ROLE")

# The ERC-20 subset a payer needs to fund a channel; any standard token answers it.
_ERC20_ABI: Final[list[dict[str, Any]]] = [
    {
        "type": "function",
        "name": "approve",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "spender", "type": "address"}, {"name": "value", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "allowance",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "transfer",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
]


class Role(IntEnum):
    """``Registry.Role``: what a participant does in the marketplace."""

    NONE = 0
    SELLER = 1
    BUYER = 2
    OPERATOR = 3
    VALIDATOR = 4


class Status(IntEnum):
    """``Registry.Status``: where a participant stands; REVOKED is final."""

    NONE = 0
    PENDING = 1
    ACTIVE = 2
    REJECTED = 3
    REVOKED = 4
    LEFT = 5


class Policy(IntEnum):
    """``Market.Policy``: who may subscribe to a topic."""

    OPEN = 0
    ALLOWLIST = 1
    DENYLIST = 2
    MIN_RATING = 3


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxResult:
    """A mined, successful transaction: its hash, block and the gas it used."""

    tx_hash: bytes
    block_number: int
    gas_used: int


@dataclass(frozen=True, slots=True)
class TopicCreation(TxResult):
    """``Market.createTopic`` went through; ``topic_id`` is keccak256 of the name."""

    topic_id: bytes


@dataclass(frozen=True, slots=True)
class ChannelOpening(TxResult):
    """``PaymentChannels.open`` went through; ``approval`` is the ERC-20 approve sent first, if any."""

    channel_id: bytes
    deposit: int
    approval: TxResult | None = None


@dataclass(frozen=True, slots=True)
class ClaimReceipt(TxResult):
    """A voucher paid out: ``payout`` in total (``fee`` of it to the operator), ``claimed`` now."""

    channel_id: bytes
    cumulative_amount: int
    payout: int
    fee: int
    claimed: int


@dataclass(frozen=True, slots=True)
class CloseRequest(TxResult):
    """The payer asked to close; the payee may claim until ``closes_at`` (unix seconds)."""

    channel_id: bytes
    closes_at: int


@dataclass(frozen=True, slots=True)
class Settlement(TxResult):
    """A channel settled: ``refund`` went back to the payer; ``payout``/``fee`` paid by a
    cooperative close's final voucher (0 for a withdrawal)."""

    channel_id: bytes
    refund: int
    payout: int = 0
    fee: int = 0


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Participant:
    """``Registry.participant``: the role asked for or held, and the status."""

    role: Role
    status: Status

    @property
    def active(self) -> bool:
        return self.status is Status.ACTIVE


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """``Market.topic``: a data product; ``token`` None means the native coin; ``encrypted``
    is ``Market.isEncrypted`` (the seller marked the topic end-to-end encrypted)."""

    topic_id: bytes
    name: str
    seller: str
    token: str | None
    price: int
    policy: Policy
    min_rating_x100: int
    paused: bool
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """``PaymentChannels.channel``; ``token`` None is the native coin, ``operator`` None is no
    operator, ``closes_at`` None while no close was requested."""

    channel_id: bytes
    payer: str
    payee: str
    operator: str | None
    token: str | None
    deposit: int
    claimed: int
    fee_bps: int
    closes_at: int | None
    settled: bool

    @property
    def remaining(self) -> int:
        """What vouchers can still claim (0 once settled)."""
        return 0 if self.settled else self.deposit - self.claimed

    @property
    def closing(self) -> bool:
        return self.closes_at is not None and not self.settled


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """The EIP-712 domain of the PaymentChannels contract, what the SDK's VoucherDomain needs."""

    chain_id: int
    verifying_contract: str
    name: str = "BlendSM PaymentChannels"
    version: str = "1"

    def voucher_domain(self) -> VoucherDomain:
        """The SDK's :class:`~blendsm.device_sdk.VoucherDomain` (digests, signing, checks)."""
        from blendsm.device_sdk import VoucherDomain  # imported when first needed

        return VoucherDomain(self.chain_id, self.verifying_contract)


@dataclass(frozen=True, slots=True)
class AnchorInfo:
    """``DataAnchors.anchorOf``: a batch root and when it was anchored."""

    broker: str
    batch_id: int
    root: bytes
    leaf_count: int
    anchored_at: int
    block_number: int


@dataclass(frozen=True, slots=True)
class RatingInfo:
    """``Ratings.ratingOf``: how many ratings ``account`` received and their sum."""

    account: str
    count: int
    total: int

    @property
    def average_x100(self) -> int:
        """The average times 100, rounded down as the contract does; 0 if unrated."""
        return self.total * 100 // self.count if self.count else 0


# --- helpers -----------------------------------------------------------------------------


def _addr(value: str) -> str:
    try:
        return str(to_checksum_address(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an address: {value!r}") from exc


def _addr_or_zero(value: str | None) -> str:
    return ZERO_ADDRESS if value is None else _addr(value)


def _none_if_zero(value: str) -> str | None:
    return None if int(value, 16) == 0 else str(to_checksum_address(value))


def _b32(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(value)


def _tx(receipt: TxReceipt) -> dict[str, Any]:
    return {
        "tx_hash": bytes(receipt["transactionHash"]),
        "block_number": int(receipt["blockNumber"]),
        "gas_used": int(receipt["gasUsed"]),
    }


# --- bindings ----------------------------------------------------------------------------


class _Binding:
    """A contract object and, when writes are wanted, the Transactor that signs them."""

    NAME: ClassVar[str]

    def __init__(
        self, w3: AsyncWeb3[Any], address: str, transactor: Transactor | None = None
    ) -> None:
        self.w3 = w3
        self.contract: AsyncContract = self._contract(w3, _addr(address))
        self.transactor = transactor

    def _contract(self, w3: AsyncWeb3[Any], address: str) -> AsyncContract:
        return contract_at(w3, self.NAME, address)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    async def _read(self, function: str, *args: Any) -> Any:
        with chain_errors(f"{self.NAME}.{function}"):
            return await self.contract.functions[function](*args).call()

    async def _write(self, function: str, *args: Any, value: int = 0) -> TxReceipt:
        if self.transactor is None:
            raise ConfigError(
                f"{self.NAME}.{function}: no account given, this binding is read-only"
            )
        with chain_errors(f"{self.NAME}.{function}"):
            return await self.transactor.send(self.contract.functions[function](*args), value=value)

    async def _simple(self, function: str, *args: Any, value: int = 0) -> TxResult:
        return TxResult(**_tx(await self._write(function, *args, value=value)))

    def _events(self, receipt: TxReceipt, event: str) -> list[EventData]:
        """``event`` logs of this contract in ``receipt`` (logs of other contracts ignored)."""
        ours = [log for log in receipt["logs"] if log["address"] == self.contract.address]
        with chain_errors(f"{self.NAME}: decode {event}"):
            return list(
                self.contract.events[event]().process_receipt({"logs": ours}, errors=DISCARD)
            )

    def _one_event(self, receipt: TxReceipt, event: str) -> EventData:
        found = self._events(receipt, event)
        if not found:
            raise ChainError(
                f"{self.NAME}: receipt of {receipt['transactionHash'].hex()} lacks {event}"
            )
        return found[0]


class Erc20(_Binding):
    """The ERC-20 subset a payer needs to fund channels (any standard token)."""

    NAME = "ERC20"

    def _contract(self, w3: AsyncWeb3[Any], address: str) -> AsyncContract:
        return w3.eth.contract(address=address, abi=_ERC20_ABI)  # type: ignore[call-overload,no-any-return]

    async def balance_of(self, account: str) -> int:
        return int(await self._read("balanceOf", _addr(account)))

    async def allowance(self, owner: str, spender: str) -> int:
        return int(await self._read("allowance", _addr(owner), _addr(spender)))

    async def approve(self, spender: str, amount: int) -> TxResult:
        return await self._simple("approve", _addr(spender), amount)

    async def transfer(self, to: str, amount: int) -> TxResult:
        return await self._simple("transfer", _addr(to), amount)


class Registry(_Binding):
    """Membership (apply, approve by an oracle, revoke, leave) and device ownership."""

    NAME = "Registry"

    async def apply_for_role(self, role: Role) -> TxResult:
        return await self._simple("applyForRole", int(Role(role)))

    async def approve(self, account: str) -> TxResult:
        """Admit a pending applicant (oracle only)."""
        return await self._simple("approve", _addr(account))

    async def reject(self, account: str) -> TxResult:
        return await self._simple("reject", _addr(account))

    async def revoke(self, account: str) -> TxResult:
        """Revoke an active participant for good (oracle only)."""
        return await self._simple("revoke", _addr(account))

    async def leave(self) -> TxResult:
        return await self._simple("leave")

    async def add_device(self, device: str) -> TxResult:
        return await self._simple("addDevice", _addr(device))

    async def remove_device(self, device: str) -> TxResult:
        return await self._simple("removeDevice", _addr(device))

    async def is_active(self, account: str) -> bool:
        return bool(await self._read("isActive", _addr(account)))

    async def has_active_role(self, account: str, role: Role) -> bool:
        return bool(await self._read("hasActiveRole", _addr(account), int(Role(role))))

    async def participant(self, account: str) -> Participant:
        role, status = await self._read("participant", _addr(account))
        return Participant(Role(role), Status(status))

    async def device_owner(self, device: str) -> str | None:
        """The seller that registered ``device``, whatever its status; None if unregistered."""
        return _none_if_zero(await self._read("deviceOwner", _addr(device)))

    async def device_count(self, seller: str) -> int:
        return int(await self._read("deviceCount", _addr(seller)))

    async def active_seller_of(self, device: str) -> str | None:
        """The seller ``device`` acts for, None if unregistered or its seller is not active."""
        return _none_if_zero(await self._read("activeSellerOf", _addr(device)))

    async def is_oracle(self, account: str) -> bool:
        return bool(await self._read("hasRole", ORACLE_ROLE, _addr(account)))


class Market(_Binding):
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
            "createTopic", name, price, _addr_or_zero(token), int(Policy(policy)), min_rating_x100
        )
        topic_id = bytes(self._one_event(receipt, "TopicCreated")["args"]["topicId"])
        return TopicCreation(**_tx(receipt), topic_id=topic_id)

    async def set_price(self, topic_id: bytes, price: int) -> TxResult:
        return await self._simple("setPrice", _b32(topic_id, "topic_id"), price)

    async def set_policy(
        self, topic_id: bytes, policy: Policy, min_rating_x100: int = 0
    ) -> TxResult:
        return await self._simple(
            "setPolicy", _b32(topic_id, "topic_id"), int(Policy(policy)), min_rating_x100
        )

    async def set_access(
        self, topic_id: bytes, accounts: Iterable[str], listed: bool = True
    ) -> TxResult:
        """Put ``accounts`` on (or, ``listed=False``, off) the topic's allow/deny list."""
        return await self._simple(
            "setAccess", _b32(topic_id, "topic_id"), [_addr(a) for a in accounts], listed
        )

    async def pause(self, topic_id: bytes) -> TxResult:
        return await self._simple("pause", _b32(topic_id, "topic_id"))

    async def resume(self, topic_id: bytes) -> TxResult:
        return await self._simple("resume", _b32(topic_id, "topic_id"))

    async def set_encrypted(self, topic_id: bytes, encrypted: bool = True) -> TxResult:
        """Mark the topic end-to-end encrypted (or, ``encrypted=False``, in clear); the topic's
        seller only; reverts (MarketEncryptionUnchanged) if it is in that state already."""
        return await self._simple("setEncrypted", _b32(topic_id, "topic_id"), bool(encrypted))

    async def is_encrypted(self, topic_id: bytes) -> bool:
        """Whether the topic's seller marked it encrypted (False for an unknown topic)."""
        return bool(await self._read("isEncrypted", _b32(topic_id, "topic_id")))

    async def can_subscribe(self, buyer: str, topic_id: bytes) -> bool:
        return bool(await self._read("canSubscribe", _addr(buyer), _b32(topic_id, "topic_id")))

    async def can_publish(self, device: str, topic_id: bytes) -> bool:
        return bool(await self._read("canPublish", _addr(device), _b32(topic_id, "topic_id")))

    async def is_listed(self, topic_id: bytes, account: str) -> bool:
        return bool(await self._read("isListed", _b32(topic_id, "topic_id"), _addr(account)))

    async def topic(self, topic_id: bytes) -> TopicInfo | None:
        """The topic's record (with ``isEncrypted``), None if no topic has this id."""
        seller, paused, policy, min_rating, token, price, name = await self._read(
            "topic", _b32(topic_id, "topic_id")
        )
        if int(seller, 16) == 0:
            return None
        encrypted = await self.is_encrypted(topic_id)
        return TopicInfo(
            topic_id=bytes(topic_id),
            name=name,
            seller=_addr(seller),
            token=_none_if_zero(token),
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


class PaymentChannels(_Binding):
    """Unidirectional payer -> payee channels paid by EIP-712 vouchers."""

    NAME = "PaymentChannels"
    _chain_id: int | None = None

    async def domain(self) -> DomainInfo:
        """Chain id and address of the voucher domain (the chain id is read once)."""
        if self._chain_id is None:
            with chain_errors("PaymentChannels.domain"):
                self._chain_id = int(await self.w3.eth.chain_id)
        return DomainInfo(self._chain_id, self.address)

    async def approve_token(self, token: str, amount: int) -> TxResult:
        """Let this contract pull ``amount`` of ``token`` from the sender (before open/top-up)."""
        return await self._token(token).approve(self.address, amount)

    async def allowance(self, token: str, owner: str) -> int:
        return await self._token(token).allowance(owner, self.address)

    def _token(self, token: str) -> Erc20:
        return Erc20(self.w3, token, self.transactor)

    async def _fund(self, token: str | None, amount: int, approve: bool) -> TxResult | None:
        if token is None or not approve:
            return None
        if self.transactor is None:
            raise ConfigError("PaymentChannels: no account given, this binding is read-only")
        if await self.allowance(token, self.transactor.address) >= amount:
            return None
        return await self.approve_token(token, amount)

    async def open(
        self,
        payee: str,
        operator: str | None,
        token: str | None,
        amount: int,
        fee_bps: int = 0,
        *,
        approve: bool = False,
    ) -> ChannelOpening:
        """Open a channel to ``payee`` with a deposit of ``amount``; ``token`` None is the native
        coin (sent as value). For an ERC-20, ``approve=True`` first approves ``amount`` unless
        the allowance already covers it. The id comes from the ChannelOpened log."""
        approval = await self._fund(token, amount, approve)
        receipt = await self._write(
            "open",
            _addr(payee),
            _addr_or_zero(operator),
            _addr_or_zero(token),
            amount,
            fee_bps,
            value=amount if token is None else 0,
        )
        channel_id = bytes(self._one_event(receipt, "ChannelOpened")["args"]["channelId"])
        return ChannelOpening(
            **_tx(receipt), channel_id=channel_id, deposit=amount, approval=approval
        )

    async def top_up(self, channel_id: bytes, amount: int, *, approve: bool = False) -> TxResult:
        """Add ``amount`` to the deposit (payer only); reads the channel to know its token."""
        info = await self.channel(channel_id)
        token = info.token if info is not None else None
        await self._fund(token, amount, approve)
        return await self._simple(
            "topUp", _b32(channel_id, "channel_id"), amount, value=amount if token is None else 0
        )

    async def claim(
        self, channel_id: bytes, cumulative_amount: int, signature: bytes
    ) -> ClaimReceipt:
        """Pay out a voucher; anyone may submit it."""
        receipt = await self._write(
            "claim", _b32(channel_id, "channel_id"), cumulative_amount, bytes(signature)
        )
        args = self._one_event(receipt, "ChannelClaimed")["args"]
        return ClaimReceipt(
            **_tx(receipt),
            channel_id=bytes(channel_id),
            cumulative_amount=int(args["cumulativeAmount"]),
            payout=int(args["payout"]),
            fee=int(args["fee"]),
            claimed=int(args["claimed"]),
        )

    async def request_close(self, channel_id: bytes) -> CloseRequest:
        receipt = await self._write("requestClose", _b32(channel_id, "channel_id"))
        closes_at = int(self._one_event(receipt, "CloseRequested")["args"]["closesAt"])
        return CloseRequest(**_tx(receipt), channel_id=bytes(channel_id), closes_at=closes_at)

    async def withdraw(self, channel_id: bytes) -> Settlement:
        """Refund the unclaimed deposit after the challenge period (payer only)."""
        receipt = await self._write("withdraw", _b32(channel_id, "channel_id"))
        return self._settlement(receipt, channel_id)

    async def cooperative_close(
        self, channel_id: bytes, cumulative_amount: int = 0, signature: bytes = b""
    ) -> Settlement:
        """Settle at once (payee only), claiming the final voucher if it pays anything new."""
        receipt = await self._write(
            "cooperativeClose", _b32(channel_id, "channel_id"), cumulative_amount, bytes(signature)
        )
        return self._settlement(receipt, channel_id)

    def _settlement(self, receipt: TxReceipt, channel_id: bytes) -> Settlement:
        refund = int(self._one_event(receipt, "ChannelSettled")["args"]["refund"])
        claims = self._events(receipt, "ChannelClaimed")
        payout = int(claims[0]["args"]["payout"]) if claims else 0
        fee = int(claims[0]["args"]["fee"]) if claims else 0
        return Settlement(
            **_tx(receipt), channel_id=bytes(channel_id), refund=refund, payout=payout, fee=fee
        )

    async def channel(self, channel_id: bytes) -> ChannelInfo | None:
        """The channel's state, None if no channel has this id."""
        (
            payer,
            fee_bps,
            closes_at,
            settled,
            payee,
            operator,
            token,
            deposit,
            claimed,
        ) = await self._read("channel", _b32(channel_id, "channel_id"))
        if int(payer, 16) == 0:
            return None
        return ChannelInfo(
            channel_id=bytes(channel_id),
            payer=_addr(payer),
            payee=_addr(payee),
            operator=_none_if_zero(operator),
            token=_none_if_zero(token),
            deposit=int(deposit),
            claimed=int(claimed),
            fee_bps=int(fee_bps),
            closes_at=int(closes_at) or None,
            settled=bool(settled),
        )

    async def voucher_digest(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """The EIP-712 digest the payer signs, as the contract computes it."""
        return bytes(
            await self._read("voucherDigest", _b32(channel_id, "channel_id"), cumulative_amount)
        )

    async def domain_separator(self) -> bytes:
        return bytes(await self._read("domainSeparator"))

    async def challenge_period(self) -> int:
        return int(await self._read("challengePeriod"))

    async def max_fee_bps(self) -> int:
        return int(await self._read("MAX_FEE_BPS"))

    async def nonce_of(self, payer: str) -> int:
        """Channels ``payer`` opened so far (the nonce of its next channel id)."""
        return int(await self._read("nonces", _addr(payer)))

    async def next_channel_id(self, payer: str, payee: str, token: str | None = None) -> bytes:
        """The id ``payer``'s next channel to ``payee`` in ``token`` will get."""
        domain = await self.domain()
        nonce = await self.nonce_of(payer)
        encoded = encode(
            ["uint256", "address", "address", "address", "address", "uint256"],
            [
                domain.chain_id,
                self.address,
                _addr(payer),
                _addr(payee),
                _addr_or_zero(token),
                nonce,
            ],
        )
        return bytes(keccak(encoded))


class DataAnchors(_Binding):
    """Merkle roots of delivered message batches, per broker operator."""

    NAME = "DataAnchors"

    async def anchor(self, batch_id: int, root: bytes, leaf_count: int) -> TxResult:
        """Anchor a batch root (active operators only; ``batch_id`` strictly increasing)."""
        return await self._simple("anchor", batch_id, _b32(root, "root"), leaf_count)

    async def anchor_of(self, broker: str, batch_id: int) -> AnchorInfo | None:
        """The anchored batch, None if ``broker`` never anchored ``batch_id``."""
        root, leaf_count, anchored_at, block_number = await self._read(
            "anchorOf", _addr(broker), batch_id
        )
        if not any(root):
            return None
        return AnchorInfo(
            _addr(broker),
            batch_id,
            bytes(root),
            int(leaf_count),
            int(anchored_at),
            int(block_number),
        )

    async def latest_batch_id(self, broker: str) -> int:
        return int(await self._read("latestBatchId", _addr(broker)))

    async def verify(self, broker: str, batch_id: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
        """Whether ``proof`` shows ``leaf`` is in the anchored batch (checked on chain)."""
        return bool(
            await self._read(
                "verify",
                _addr(broker),
                batch_id,
                _b32(leaf, "leaf"),
                [_b32(p, "proof item") for p in proof],
            )
        )


class Ratings(_Binding):
    """Ratings between the payer and payee of a channel that paid or settled."""

    NAME = "Ratings"

    async def rate(self, channel_id: bytes, score: int) -> TxResult:
        """Rate the other party of ``channel_id`` with 1..5, once per channel."""
        return await self._simple("rate", _b32(channel_id, "channel_id"), score)

    async def rating_of(self, account: str) -> RatingInfo:
        count, total = await self._read("ratingOf", _addr(account))
        return RatingInfo(_addr(account), int(count), int(total))

    async def average_x100(self, account: str) -> int:
        return int(await self._read("averageX100", _addr(account)))

    async def has_rated(self, channel_id: bytes, rater: str) -> bool:
        return bool(await self._read("hasRated", _b32(channel_id, "channel_id"), _addr(rater)))


class Marketplace:
    """The five bindings of one deployment, sharing one Transactor (so nonces never collide).

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
