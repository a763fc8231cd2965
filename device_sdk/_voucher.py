"""EIP-712 payment-channel vouchers, checked exactly as the PaymentChannels contract does.

The contract uses OpenZeppelin 5 ``EIP712`` and ``ECDSA.recover(bytes32, bytes)``::

    domain  = EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)
              name "BlendSM PaymentChannels", version "2"
    type    = Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)
    digest  = keccak256(0x1901 || domainSeparator || keccak256(abi.encode(VOUCHER_TYPEHASH,
                                                               channelId, lane, cumulativeAmount)))

A lane is the key of the broker that metered the deliveries (or the operator's own address):
one channel, one cumulative counter per lane, the deposit shared (issue 14). Version "2" is
the lanes version, so a version-1 voucher (no lane) can never verify here or on chain.

The broker must never accept a voucher the contract would refuse, so
:func:`recover_voucher_signer` mirrors ``ECDSA.tryRecover`` check for check (65 bytes only,
low s, then ``ecrecover``'s own rules) and :meth:`VoucherVerifier.verify` mirrors ``claim``
in the same order. Error messages start with the matching Solidity error name where
OpenZeppelin has one, so contract tests can compare rejections one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blendsm.errors import (
    VoucherChannelError,
    VoucherError,
    VoucherLaneError,
    VoucherNotNewerError,
    VoucherSignatureError,
    WireError,
)

from ._ecdsa import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    high_s_twin,
    key_address,
    recover_address,
    sign_digest,
    signing_key,
)
from ._eip712 import EIP712_DOMAIN_TYPEHASH, UINT256_MAX, address_bytes, init_domain, typed_data
from ._keccak import checksum_address, keccak256

__all__ = [
    "EIP712_DOMAIN_TYPEHASH",
    "SECP256K1_HALF_N",
    "SECP256K1_N",
    "UINT256_MAX",
    "VOUCHER_DOMAIN_NAME",
    "VOUCHER_DOMAIN_VERSION",
    "VOUCHER_TYPEHASH",
    "ChannelState",
    "Voucher",
    "VoucherDomain",
    "VoucherSigner",
    "VoucherVerifier",
    "high_s_twin",
    "recover_voucher_signer",
    "sign_voucher",
    "voucher_digest",
    "voucher_typed_data",
]

VOUCHER_DOMAIN_NAME = "BlendSM PaymentChannels"
VOUCHER_DOMAIN_VERSION = "2"
VOUCHER_TYPEHASH = keccak256(b"Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)")

_ZERO_ADDRESS = bytes(20)
_WORD_PAD = bytes(12)


def _lane_bytes(lane: str | bytes) -> bytes:
    """The lane's 20 bytes (hex in any case, EIP-55 checked if mixed, or raw bytes)."""
    if isinstance(lane, bytes) and len(lane) == 20:
        return lane
    return address_bytes(lane, "lane", VoucherError)


def _check_fields(channel_id: object, cumulative_amount: object) -> None:
    """Reject what cannot be ``bytes32`` / ``uint256``, before any hashing."""
    if not isinstance(channel_id, bytes) or len(channel_id) != 32:
        got = (
            f"{len(channel_id)} bytes"
            if isinstance(channel_id, bytes)
            else type(channel_id).__name__
        )
        raise VoucherError(f"channel_id must be 32 bytes (bytes32), got {got}")
    if (
        not isinstance(cumulative_amount, int)
        or isinstance(cumulative_amount, bool)
        or not 0 <= cumulative_amount <= UINT256_MAX
    ):
        raise VoucherError(
            f"cumulative_amount must be an int in [0, 2**256), got {cumulative_amount!r}"
        )


@dataclass(frozen=True, slots=True, init=False)
class VoucherDomain:
    """The EIP-712 domain of one PaymentChannels deployment, hashed once.

    ``verifying_contract`` may be given as hex (any case; mixed case must be a valid
    EIP-55 checksum) or 20 bytes; it is stored in checksum form, with the bytes in
    ``verifying_contract_bytes``. ``separator`` equals the contract's
    ``_domainSeparatorV4()``.
    """

    chain_id: int
    verifying_contract: str
    verifying_contract_bytes: bytes = field(init=False, repr=False, compare=False)
    separator: bytes = field(init=False, repr=False, compare=False)
    _prefix: bytes = field(init=False, repr=False, compare=False)  # 0x1901 || separator

    def __init__(self, chain_id: int, verifying_contract: str | bytes) -> None:
        raw = init_domain(
            self,
            VOUCHER_DOMAIN_NAME,
            VOUCHER_DOMAIN_VERSION,
            chain_id,
            verifying_contract,
            "verifying_contract",
        )
        object.__setattr__(self, "verifying_contract", checksum_address(raw))
        object.__setattr__(self, "verifying_contract_bytes", raw)

    def digest(self, channel_id: bytes, lane: str | bytes, cumulative_amount: int) -> bytes:
        """The EIP-712 digest the payer signs; no amount checks (see :func:`voucher_digest`)."""
        struct_hash = keccak256(
            VOUCHER_TYPEHASH
            + channel_id
            + _WORD_PAD
            + _lane_bytes(lane)
            + cumulative_amount.to_bytes(32, "big")
        )
        return keccak256(self._prefix + struct_hash)


def voucher_typed_data(
    domain: VoucherDomain, channel_id: bytes, lane: str | bytes, cumulative_amount: int
) -> dict[str, Any]:
    """The voucher as EIP-712 JSON (``eth_signTypedData_v4``), for wallets that sign typed data
    themselves (hardware wallets, eth_account's ``sign_typed_data``); same digest as ours."""
    _check_fields(channel_id, cumulative_amount)
    return typed_data(
        VOUCHER_DOMAIN_NAME,
        VOUCHER_DOMAIN_VERSION,
        domain.chain_id,
        domain.verifying_contract,
        "Voucher",
        (("channelId", "bytes32"), ("lane", "address"), ("cumulativeAmount", "uint256")),
        {
            "channelId": channel_id,
            "lane": checksum_address(_lane_bytes(lane)),
            "cumulativeAmount": cumulative_amount,
        },
    )


def voucher_digest(
    domain: VoucherDomain, channel_id: bytes, lane: str | bytes, cumulative_amount: int
) -> bytes:
    """The 32-byte digest ``_hashTypedDataV4(hashStruct(voucher))``, inputs checked."""
    _check_fields(channel_id, cumulative_amount)
    return domain.digest(channel_id, _lane_bytes(lane), cumulative_amount)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A signed promise: the payer owes ``cumulative_amount`` in total on ``lane`` of
    ``channel_id``.

    Construction checks ``channel_id`` (32 bytes), ``lane`` (an address; kept in checksum
    form) and ``cumulative_amount`` (uint256) and raises :class:`VoucherError`, so a Voucher
    in hand always hashes like the contract's. The signature is deliberately not checked
    here: its length, ``s`` and ``v`` are checked on recovery, in the contract's order, with
    its error names.
    """

    channel_id: bytes
    lane: str
    cumulative_amount: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_fields(self.channel_id, self.cumulative_amount)
        object.__setattr__(self, "lane", checksum_address(_lane_bytes(self.lane)))
        if not isinstance(self.signature, bytes):
            raise VoucherSignatureError(
                f"signature must be bytes, got {type(self.signature).__name__}"
            )


def recover_voucher_signer(domain: VoucherDomain, voucher: Voucher) -> str:
    """Checksum address that signed ``voucher`` under ``domain``, as OZ ``ECDSA.recover``.

    Raises :class:`VoucherSignatureError` wherever the contract would revert.
    """
    digest = domain.digest(voucher.channel_id, voucher.lane, voucher.cumulative_amount)
    return checksum_address(recover_address(digest, voucher.signature))


class VoucherSigner:
    """Signs vouchers with one key; keep one per payer (key setup costs ~25 us).

    ``address`` is the payer's checksum address.
    """

    __slots__ = ("_key", "address", "domain")

    def __init__(self, private_key: bytes, domain: VoucherDomain) -> None:
        self._key = signing_key(private_key)
        self.domain = domain
        self.address: str = checksum_address(key_address(self._key))

    def sign(self, channel_id: bytes, lane: str | bytes, cumulative_amount: int) -> Voucher:
        """A voucher for ``cumulative_amount`` in total on ``lane`` of ``channel_id``.

        libsecp256k1 signs deterministically (RFC 6979) and always low-s, so the result
        equals eth_account's and passes OZ ``ECDSA.recover``.
        """
        raw = _lane_bytes(lane)
        digest = voucher_digest(self.domain, channel_id, raw, cumulative_amount)
        return Voucher(
            channel_id, checksum_address(raw), cumulative_amount, sign_digest(self._key, digest)
        )


def sign_voucher(
    private_key: bytes,
    domain: VoucherDomain,
    channel_id: bytes,
    lane: str | bytes,
    cumulative_amount: int,
) -> Voucher:
    """One-off signing; use :class:`VoucherSigner` when signing repeatedly."""
    return VoucherSigner(private_key, domain).sign(channel_id, lane, cumulative_amount)


@dataclass(frozen=True, slots=True, init=False)
class ChannelState:
    """What the chain says about a channel and one lane of it, as far as a claim depends on it.

    ``claimed`` is the channel's total over all lanes, ``lane_claimed`` what ``lane`` took
    (the part of ``claimed`` that is this lane's). ``lane`` None means the caller does not pin
    one: any lane is accepted as far as the verifier can tell (the contract still checks it
    is the operator or one of its brokers). ``closes_at`` is the unix time the challenge
    period ends, None while no close was requested. ``payer`` accepts hex or 20 bytes and is
    stored in checksum form; a zero payer means the channel does not exist (the contract's
    test for existence).
    """

    payer: str
    deposit: int
    claimed: int
    closes_at: int | None = None
    settled: bool = False
    lane: str | None = None
    lane_claimed: int = 0
    payer_bytes: bytes = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        payer: str | bytes,
        deposit: int,
        claimed: int,
        closes_at: int | None = None,
        settled: bool = False,
        *,
        lane: str | bytes | None = None,
        lane_claimed: int | None = None,
    ) -> None:
        raw = address_bytes(payer, "payer", WireError)
        set_ = object.__setattr__
        set_(self, "payer", checksum_address(raw))
        set_(self, "deposit", deposit)
        set_(self, "claimed", claimed)
        set_(self, "closes_at", closes_at)
        set_(self, "settled", settled)
        set_(self, "lane", None if lane is None else checksum_address(_lane_bytes(lane)))
        # One lane only (the v1 shape): the lane took everything claimed.
        set_(self, "lane_claimed", claimed if lane_claimed is None else lane_claimed)
        set_(self, "payer_bytes", raw)

    @property
    def lane_payable(self) -> int:
        """The most the lane can reach on chain now: what it took plus what the deposit
        still holds over all lanes (``deposit - (claimed - lane_claimed)``)."""
        return self.lane_claimed + max(0, self.deposit - self.claimed)


class VoucherVerifier:
    """Predicts what PaymentChannels ``claim`` pays for a voucher, or why it reverts.

    Checks run in the contract's order, first failure wins:

    1. channel: exists (``channel`` not None, payer not zero), not settled, and if a
       close was requested ``now < closes_at`` -> :class:`VoucherChannelError`;
    2. (optional) ``channel_id``, when given, equals the voucher's -> :class:`VoucherChannelError`;
    3. lane: when ``channel.lane`` is set, the voucher's lane equals it -> :class:`VoucherLaneError`;
    4. signature: ``ECDSA.recover`` rules (length 65, low s, v 27/28, valid point), then
       signer == payer -> :class:`VoucherSignatureError`;
    5. amount: ``payable = min(cumulative, lane_claimed + deposit - claimed)``;
       ``payable <= lane_claimed`` pays nothing -> :class:`VoucherNotNewerError`; else the
       payout is ``payable - lane_claimed``.
    """

    __slots__ = ("domain",)

    def __init__(self, domain: VoucherDomain) -> None:
        self.domain = domain

    def verify(
        self,
        voucher: Voucher,
        channel: ChannelState | None,
        now: int,
        *,
        channel_id: bytes | None = None,
    ) -> int:
        """The payout ``claim`` would make at block time ``now``.

        ``channel`` is the state of ``voucher.channel_id`` (None if the chain has no such
        channel). Pass ``channel_id`` when the caller meters a specific channel, so a
        voucher for another channel of the same payer cannot be credited to it.
        """
        if channel is None or channel.payer_bytes == _ZERO_ADDRESS:
            raise VoucherChannelError(f"unknown channel 0x{voucher.channel_id.hex()}")
        if channel.settled:
            raise VoucherChannelError(f"channel 0x{voucher.channel_id.hex()} is settled")
        if channel.closes_at is not None and now >= channel.closes_at:
            raise VoucherChannelError(
                f"channel 0x{voucher.channel_id.hex()}: challenge period ended at"
                f" {channel.closes_at} (now {now})"
            )
        if channel_id is not None and channel_id != voucher.channel_id:
            raise VoucherChannelError(
                f"voucher is for channel 0x{voucher.channel_id.hex()}, not 0x{channel_id.hex()}"
            )
        if channel.lane is not None and voucher.lane != channel.lane:
            raise VoucherLaneError(f"voucher is for lane {voucher.lane}, not {channel.lane}")
        signer = recover_address(
            self.domain.digest(voucher.channel_id, voucher.lane, voucher.cumulative_amount),
            voucher.signature,
        )
        if signer != channel.payer_bytes:
            raise VoucherSignatureError(
                f"voucher signed by {checksum_address(signer)}, not by the payer {channel.payer}"
            )
        payable = min(voucher.cumulative_amount, channel.lane_payable)
        if payable <= channel.lane_claimed:
            raise VoucherNotNewerError(
                f"voucher pays nothing new: min(cumulative {voucher.cumulative_amount},"
                f" lane {channel.lane_claimed} + deposit {channel.deposit} - claimed"
                f" {channel.claimed}) <= lane claimed {channel.lane_claimed}"
            )
        return payable - channel.lane_claimed
