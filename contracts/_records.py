"""What the contract bindings hand back: constants, the contracts' enums, and frozen results.

Kept apart from the bindings so the values a caller stores, compares or caches (the broker's
chain view, the meter, the CLI) read as plain data, with no contract call in sight. Results of
writes derive from :class:`TxResult` so every write reports its hash, block and gas.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

from eth_utils import keccak

if TYPE_CHECKING:
    from blendsm.device_sdk import VoucherDomain

__all__ = [
    "ORACLE_ROLE",
    "ZERO_ADDRESS",
    "AnchorInfo",
    "BrokerInfo",
    "BrokerStatus",
    "ChannelInfo",
    "ChannelOpening",
    "ClaimReceipt",
    "CloseRequest",
    "DomainInfo",
    "Participant",
    "Policy",
    "RatingInfo",
    "Role",
    "ServingOperators",
    "Settlement",
    "Status",
    "TopicCreation",
    "TopicInfo",
    "TxResult",
]

ZERO_ADDRESS: Final = "0x0000000000000000000000000000000000000000"
#: ``Registry.ORACLE_ROLE``: the administrators who admit, reject and revoke participants.
ORACLE_ROLE: Final = keccak(text="ORACLE_ROLE")


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


class BrokerStatus(IntEnum):
    """``Brokers.BrokerStatus``: a broker key's standing; RETIRED is final."""

    NONE = 0
    ACTIVE = 1
    RETIRED = 2


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
    """A voucher of ``lane`` paid out: ``payout`` in total (``fee`` of it to the operator);
    ``lane_claimed`` is the lane's total now, ``claimed`` the channel's over all lanes. A
    ``lane_claimed`` below ``cumulative_amount`` means the deposit cut the claim short."""

    channel_id: bytes
    cumulative_amount: int
    payout: int
    fee: int
    claimed: int
    lane: str = ""
    lane_claimed: int = 0

    @property
    def cut_short(self) -> bool:
        """The deposit (shared by every lane) paid less than the voucher asked."""
        return self.lane_claimed < self.cumulative_amount


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
    claimed: int  # over all lanes (the contract's totalClaimed)
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


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """``Brokers.broker``: one broker process of an operator. ``endpoints`` are the URLs
    clients connect to; ``active`` is ``Brokers.isActiveBroker`` (registered, not retired,
    its operator active), read with the record."""

    broker_key: str
    operator: str
    status: BrokerStatus
    registered_at: int
    endpoints: tuple[str, ...]
    active: bool

    def as_json(self) -> dict[str, Any]:
        """The broker as the CLI's ``--json`` output and the HTTP API show it."""
        return {
            "broker": self.broker_key,
            "operator": self.operator,
            "status": self.status.name.lower(),
            "active": self.active,
            "registered_at": self.registered_at,
            "endpoints": list(self.endpoints),
        }


@dataclass(frozen=True, slots=True)
class ServingOperators:
    """``Brokers.servingOperators``: ``any_operator`` when the seller chose nobody (every
    active operator may serve), else the chosen operators still active (empty: nobody)."""

    any_operator: bool
    operators: tuple[str, ...]

    def serves(self, operator: str, operator_active: bool = True) -> bool:
        """Whether ``operator`` (active or not, as the caller knows) may serve the topic."""
        if not operator_active:
            return False
        return self.any_operator or operator.lower() in {o.lower() for o in self.operators}
