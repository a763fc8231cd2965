"""EIP-712 payment-channel vouchers, checked exactly as the PaymentChannels contract does.

The contract uses OpenZeppelin 5 ``EIP712`` and ``ECDSA.recover(bytes32, bytes)``::

    domain  = EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)
              name "BlendSM PaymentChannels", version "1"
    type    = Voucher(bytes32 channelId,uint256 cumulativeAmount)
    digest  = keccak256(0x1901 || domainSeparator || keccak256(abi.encode(VOUCHER_TYPEHASH,
                                                                          channelId, cumulativeAmount)))

The broker must never accept a voucher the contract would refuse, so
:func:`recover_voucher_signer` mirrors ``ECDSA.tryRecover`` check for check (65 bytes only,
low s, then ``ecrecover``'s own rules) and :meth:`VoucherVerifier.verify` mirrors ``claim``
in the same order. Error messages start with the matching Solidity error name where
OpenZeppelin has one, so contract tests can compare rejections one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from coincurve import PrivateKey, PublicKey

from blendsm.errors import (
    ConfigError,
    VoucherChannelError,
    VoucherError,
    VoucherNotNewerError,
    VoucherSignatureError,
    WireError,
)

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
VOUCHER_DOMAIN_VERSION = "1"
EIP712_DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
VOUCHER_TYPEHASH = keccak256(b"Voucher(bytes32 channelId,uint256 cumulativeAmount)")

UINT256_MAX = 2**256 - 1
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
"""Order of the secp256k1 group."""
SECP256K1_HALF_N = SECP256K1_N // 2
"""Largest ``s`` OpenZeppelin accepts (``0x7FFF...5D576E7357A4501DDFE92F46681B20A0``)."""

_ZERO_ADDRESS = bytes(20)
_HEX_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")


def _address_bytes(value: str | bytes, what: str, error: type[ValueError]) -> bytes:
    """20 address bytes from a 0x-hex string (EIP-55 checked if mixed case) or raw bytes."""
    if isinstance(value, bytes):
        if len(value) != 20:
            raise error(f"{what}: an address is 20 bytes, got {len(value)}")
        return bytes(value)
    if not isinstance(value, str) or _HEX_ADDRESS.fullmatch(value) is None:
        raise error(f"{what}: expected a 0x-prefixed 40-hex-digit address, got {value!r}")
    raw = bytes.fromhex(value[2:])
    body = value[2:]
    if body != body.lower() and body != body.upper() and checksum_address(raw) != "0x" + body:
        # Mixed case is a checksum claim (EIP-55); a wrong one usually means a typo.
        raise error(f"{what}: bad EIP-55 checksum in {value!r}")
    return raw


# EIP-712 domains, one implementation for every signed type of the SDK: vouchers (here),
# messages (_envelope) and CONNECT tokens (_connect_token). Each domain is hashed once, when
# it is built; the per-message digest is then keccak256(prefix || struct_hash) with
# prefix = 0x1901 || separator, written inline in each ``digest`` (hot path, no extra call).

_EIP712_DOMAIN_NO_CONTRACT_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId)"
)
_EIP712_DOMAIN_FIELDS = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
)


def _check_chain_id(chain_id: object) -> int:
    """``chain_id`` if it is an int (not bool) that fits uint256, else ConfigError."""
    if (
        isinstance(chain_id, bool)
        or not isinstance(chain_id, int)
        or not 0 <= chain_id <= UINT256_MAX
    ):
        raise ConfigError(f"chain_id: must be an int in [0, 2**256), got {chain_id!r}")
    return chain_id


def _domain_separator(
    name: str, version: str, chain_id: int, verifying_contract: bytes | None = None
) -> bytes:
    """``hashStruct(EIP712Domain)`` of ``{name, version, chainId[, verifyingContract]}``.

    With 20 ``verifying_contract`` bytes this is OpenZeppelin's ``_domainSeparatorV4()``;
    without, the domain has no ``verifyingContract`` field (and type) at all.
    """
    head = keccak256(name.encode()) + keccak256(version.encode()) + chain_id.to_bytes(32, "big")
    if verifying_contract is None:
        return keccak256(_EIP712_DOMAIN_NO_CONTRACT_TYPEHASH + head)
    return keccak256(EIP712_DOMAIN_TYPEHASH + head + bytes(12) + verifying_contract)


def _init_domain(
    domain: object,
    name: str,
    version: str,
    chain_id: object,
    verifying_contract: str | bytes,
    what: str,
) -> bytes:
    """Check and hash a contract-bound domain; fill ``chain_id``, ``separator`` and
    ``_prefix`` (``0x1901 || separator``) of the frozen dataclass ``domain``.

    Checks the chain id, then the address (``what`` names it in the ConfigError), and
    returns the contract's 20 bytes for the caller's own address fields.
    """
    chain_id = _check_chain_id(chain_id)
    raw = _address_bytes(verifying_contract, what, ConfigError)
    separator = _domain_separator(name, version, chain_id, raw)
    object.__setattr__(domain, "chain_id", chain_id)
    object.__setattr__(domain, "separator", separator)
    object.__setattr__(domain, "_prefix", b"\x19\x01" + separator)
    return raw


def _typed_data(
    name: str,
    version: str,
    chain_id: int,
    verifying_contract: str | None,
    primary_type: str,
    struct_fields: tuple[tuple[str, str], ...],
    message: dict[str, Any],
) -> dict[str, Any]:
    """EIP-712 JSON (``eth_signTypedData_v4``) of ``message``, a ``primary_type`` struct with
    ``struct_fields`` (name, type) in order, in the domain that :func:`_domain_separator`
    hashes (no ``verifyingContract`` when it is None)."""
    domain_fields = [dict(f) for f in _EIP712_DOMAIN_FIELDS]
    domain: dict[str, Any] = {"name": name, "version": version, "chainId": chain_id}
    if verifying_contract is not None:
        domain_fields.append({"name": "verifyingContract", "type": "address"})
        domain["verifyingContract"] = verifying_contract
    return {
        "types": {
            "EIP712Domain": domain_fields,
            primary_type: [{"name": n, "type": t} for n, t in struct_fields],
        },
        "primaryType": primary_type,
        "domain": domain,
        "message": message,
    }


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
        raw = _init_domain(
            self,
            VOUCHER_DOMAIN_NAME,
            VOUCHER_DOMAIN_VERSION,
            chain_id,
            verifying_contract,
            "verifying_contract",
        )
        object.__setattr__(self, "verifying_contract", checksum_address(raw))
        object.__setattr__(self, "verifying_contract_bytes", raw)

    def digest(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """The EIP-712 digest the payer signs; no input checks (see :func:`voucher_digest`)."""
        struct_hash = keccak256(
            VOUCHER_TYPEHASH + channel_id + cumulative_amount.to_bytes(32, "big")
        )
        return keccak256(self._prefix + struct_hash)


def voucher_typed_data(
    domain: VoucherDomain, channel_id: bytes, cumulative_amount: int
) -> dict[str, Any]:
    """The voucher as EIP-712 JSON (``eth_signTypedData_v4``), for wallets that sign typed data
    themselves (hardware wallets, eth_account's ``sign_typed_data``); same digest as ours."""
    _check_fields(channel_id, cumulative_amount)
    return _typed_data(
        VOUCHER_DOMAIN_NAME,
        VOUCHER_DOMAIN_VERSION,
        domain.chain_id,
        domain.verifying_contract,
        "Voucher",
        (("channelId", "bytes32"), ("cumulativeAmount", "uint256")),
        {"channelId": channel_id, "cumulativeAmount": cumulative_amount},
    )


def voucher_digest(domain: VoucherDomain, channel_id: bytes, cumulative_amount: int) -> bytes:
    """The 32-byte digest ``_hashTypedDataV4(hashStruct(voucher))``, inputs checked."""
    _check_fields(channel_id, cumulative_amount)
    return domain.digest(channel_id, cumulative_amount)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A signed promise: the payer owes ``cumulative_amount`` in total on ``channel_id``.

    Construction checks ``channel_id`` (32 bytes) and ``cumulative_amount`` (uint256)
    and raises :class:`VoucherError`, so a Voucher in hand always hashes like the
    contract's. The signature is deliberately not checked here: its length, ``s`` and
    ``v`` are checked on recovery, in the contract's order, with its error names.
    """

    channel_id: bytes
    cumulative_amount: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_fields(self.channel_id, self.cumulative_amount)
        if not isinstance(self.signature, bytes):
            raise VoucherSignatureError(
                f"signature must be bytes, got {type(self.signature).__name__}"
            )


def _recover(digest: bytes, signature: bytes) -> bytes:
    """The signer's 20 address bytes, or VoucherSignatureError exactly where OZ 5 reverts.

    ``ECDSA.recover(bytes32, bytes)`` -> ``tryRecover``: length must be 65 (64-byte
    EIP-2098 signatures included, this is ``ECDSAInvalidSignatureLength``); then
    ``s <= n/2`` (``ECDSAInvalidSignatureS``); then ``ecrecover``, which yields
    address(0), i.e. ``ECDSAInvalidSignature``, for v not 27/28, r or s outside [1, n),
    or r not the x of a curve point. libsecp256k1 (coincurve) is also what geth's
    precompile runs, so the point rules agree bit for bit.
    """
    if len(signature) != 65:
        raise VoucherSignatureError(
            f"ECDSAInvalidSignatureLength({len(signature)}): a voucher signature is exactly"
            " 65 bytes r || s || v (64-byte EIP-2098 signatures are refused too)"
        )
    s = int.from_bytes(signature[32:64], "big")
    if s > SECP256K1_HALF_N:
        raise VoucherSignatureError(
            f"ECDSAInvalidSignatureS(0x{s:064x}): s is in the upper half of the curve order"
            " (malleable twin of a low-s signature)"
        )
    v = signature[64]
    if v != 27 and v != 28:
        raise VoucherSignatureError(f"ECDSAInvalidSignature: v must be 27 or 28, got {v}")
    r = int.from_bytes(signature[:32], "big")
    if not 0 < r < SECP256K1_N or s == 0:
        raise VoucherSignatureError("ECDSAInvalidSignature: r and s must lie in [1, n)")
    try:
        public = PublicKey.from_signature_and_message(
            signature[:64] + (b"\x00" if v == 27 else b"\x01"), digest, hasher=None
        )
    except ValueError:
        raise VoucherSignatureError(
            "ECDSAInvalidSignature: no public key recovers from this r (ecrecover gives address(0))"
        ) from None
    return keccak256(public.format(compressed=False)[1:])[12:]


def recover_voucher_signer(domain: VoucherDomain, voucher: Voucher) -> str:
    """Checksum address that signed ``voucher`` under ``domain``, as OZ ``ECDSA.recover``.

    Raises :class:`VoucherSignatureError` wherever the contract would revert.
    """
    digest = domain.digest(voucher.channel_id, voucher.cumulative_amount)
    return checksum_address(_recover(digest, voucher.signature))


def high_s_twin(signature: bytes) -> bytes:
    """The malleable twin (r, n - s, v flipped) of a 65-byte signature.

    Raw ``ecrecover`` maps both to the same signer; OpenZeppelin (and we) refuse the
    high-s one. Shared with the contract tests' rejection table.
    """
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("expected a 65-byte r || s || v signature with v in {27, 28}")
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((55 - signature[64],))


class VoucherSigner:
    """Signs vouchers with one key; keep one per payer (key setup costs ~25 us).

    ``address`` is the payer's checksum address.
    """

    __slots__ = ("_key", "address", "domain")

    def __init__(self, private_key: bytes, domain: VoucherDomain) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise ConfigError("private_key: must be 32 bytes")
        try:
            self._key = PrivateKey(private_key)
        except ValueError:
            raise ConfigError("private_key: not a valid secp256k1 secret (0 or >= n)") from None
        self.domain = domain
        self.address: str = checksum_address(
            keccak256(self._key.public_key.format(compressed=False)[1:])[12:]
        )

    def sign(self, channel_id: bytes, cumulative_amount: int) -> Voucher:
        """A voucher for ``cumulative_amount`` in total on ``channel_id``.

        libsecp256k1 signs deterministically (RFC 6979) and always low-s, so the result
        equals eth_account's and passes OZ ``ECDSA.recover``.
        """
        digest = voucher_digest(self.domain, channel_id, cumulative_amount)
        rs_recid = self._key.sign_recoverable(digest, hasher=None)
        return Voucher(channel_id, cumulative_amount, rs_recid[:64] + bytes((rs_recid[64] + 27,)))


def sign_voucher(
    private_key: bytes, domain: VoucherDomain, channel_id: bytes, cumulative_amount: int
) -> Voucher:
    """One-off signing; use :class:`VoucherSigner` when signing repeatedly."""
    return VoucherSigner(private_key, domain).sign(channel_id, cumulative_amount)


@dataclass(frozen=True, slots=True, init=False)
class ChannelState:
    """What the chain says about a channel, as far as a claim depends on it.

    ``closes_at`` is the unix time the challenge period ends, None while no close was
    requested. ``payer`` accepts hex or 20 bytes and is stored in checksum form; a zero
    payer means the channel does not exist (the contract's test for existence).
    """

    payer: str
    deposit: int
    claimed: int
    closes_at: int | None = None
    settled: bool = False
    payer_bytes: bytes = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        payer: str | bytes,
        deposit: int,
        claimed: int,
        closes_at: int | None = None,
        settled: bool = False,
    ) -> None:
        raw = _address_bytes(payer, "payer", WireError)
        set_ = object.__setattr__
        set_(self, "payer", checksum_address(raw))
        set_(self, "deposit", deposit)
        set_(self, "claimed", claimed)
        set_(self, "closes_at", closes_at)
        set_(self, "settled", settled)
        set_(self, "payer_bytes", raw)


class VoucherVerifier:
    """Predicts what PaymentChannels ``claim`` pays for a voucher, or why it reverts.

    Checks run in the contract's order, first failure wins:

    1. channel: exists (``channel`` not None, payer not zero), not settled, and if a
       close was requested ``now < closes_at`` -> :class:`VoucherChannelError`;
    2. (optional) ``channel_id``, when given, equals the voucher's -> :class:`VoucherChannelError`;
    3. signature: ``ECDSA.recover`` rules (length 65, low s, v 27/28, valid point), then
       signer == payer -> :class:`VoucherSignatureError`;
    4. amount: ``payable = min(cumulative, deposit)``; ``payable <= claimed`` pays
       nothing -> :class:`VoucherNotNewerError`; else the payout is ``payable - claimed``.
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
        signer = _recover(
            self.domain.digest(voucher.channel_id, voucher.cumulative_amount), voucher.signature
        )
        if signer != channel.payer_bytes:
            raise VoucherSignatureError(
                f"voucher signed by {checksum_address(signer)}, not by the payer {channel.payer}"
            )
        payable = min(voucher.cumulative_amount, channel.deposit)
        if payable <= channel.claimed:
            raise VoucherNotNewerError(
                f"voucher pays nothing new: min(cumulative {voucher.cumulative_amount},"
                f" deposit {channel.deposit}) <= claimed {channel.claimed}"
            )
        return payable - channel.claimed
