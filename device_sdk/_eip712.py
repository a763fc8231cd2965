"""EIP-712 domains and typed data, one implementation for every signed type of the SDK.

Vouchers (:mod:`._voucher`), messages (:mod:`._envelope`) and CONNECT tokens
(:mod:`._connect_token`) are all EIP-712 structs, so wallets can sign them with
``eth_signTypedData_v4`` and the contracts can check them with OpenZeppelin's ``EIP712``.
They share this module so the domain hashing, the JSON a wallet signs and the checks of the
domain fields cannot drift apart between the three; ``docs/protocol-vectors.json`` pins the
results byte for byte.

Each domain is hashed once, when it is built; the per-message digest is then
``keccak256(prefix || struct_hash)`` with ``prefix = 0x1901 || separator``, written inline
in each ``digest`` method (hot path, no extra call).
"""

from __future__ import annotations

import re
from typing import Any

from blendsm.errors import ConfigError

from ._keccak import checksum_address, keccak256

__all__ = [
    "EIP712_DOMAIN_NO_CONTRACT_TYPEHASH",
    "EIP712_DOMAIN_TYPEHASH",
    "UINT256_MAX",
    "address_bytes",
    "check_chain_id",
    "domain_separator",
    "init_domain",
    "typed_data",
]

EIP712_DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
EIP712_DOMAIN_NO_CONTRACT_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId)"
)
UINT256_MAX = 2**256 - 1

_HEX_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")
_EIP712_DOMAIN_FIELDS = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
)


def address_bytes(value: str | bytes, what: str, error: type[ValueError]) -> bytes:
    """20 address bytes from a 0x-hex string (EIP-55 checked if mixed case) or raw bytes.

    ``error`` is the exception the caller's layer raises (ConfigError for configuration,
    WireError or ConnectTokenError for what arrived from the network); ``what`` names the
    field in its message.
    """
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


def check_chain_id(chain_id: object) -> int:
    """``chain_id`` if it is an int (not bool) that fits uint256, else ConfigError."""
    if (
        isinstance(chain_id, bool)
        or not isinstance(chain_id, int)
        or not 0 <= chain_id <= UINT256_MAX
    ):
        raise ConfigError(f"chain_id: must be an int in [0, 2**256), got {chain_id!r}")
    return chain_id


def domain_separator(
    name: str, version: str, chain_id: int, verifying_contract: bytes | None = None
) -> bytes:
    """``hashStruct(EIP712Domain)`` of ``{name, version, chainId[, verifyingContract]}``.

    With 20 ``verifying_contract`` bytes this is OpenZeppelin's ``_domainSeparatorV4()``;
    without, the domain has no ``verifyingContract`` field (and type) at all.
    """
    head = keccak256(name.encode()) + keccak256(version.encode()) + chain_id.to_bytes(32, "big")
    if verifying_contract is None:
        return keccak256(EIP712_DOMAIN_NO_CONTRACT_TYPEHASH + head)
    return keccak256(EIP712_DOMAIN_TYPEHASH + head + bytes(12) + verifying_contract)


def init_domain(
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
    chain_id = check_chain_id(chain_id)
    raw = address_bytes(verifying_contract, what, ConfigError)
    separator = domain_separator(name, version, chain_id, raw)
    object.__setattr__(domain, "chain_id", chain_id)
    object.__setattr__(domain, "separator", separator)
    object.__setattr__(domain, "_prefix", b"\x19\x01" + separator)
    return raw


def typed_data(
    name: str,
    version: str,
    chain_id: int,
    verifying_contract: str | None,
    primary_type: str,
    struct_fields: tuple[tuple[str, str], ...],
    message: dict[str, Any],
) -> dict[str, Any]:
    """EIP-712 JSON (``eth_signTypedData_v4``) of ``message``, a ``primary_type`` struct with
    ``struct_fields`` (name, type) in order, in the domain that :func:`domain_separator`
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
