"""The MQTT CONNECT password token: a short-lived EIP-712 signature bound to one broker.

A client connects with ``username`` = its address and ``password`` = a token::

    bsm1.<issuedAt decimal>.<nonce 32 hex>.<signature 130 hex>

The signature is EIP-712 typed data, so a wallet can produce it with
``eth_signTypedData_v4`` (see :func:`connect_typed_data`)::

    domain  = EIP712Domain(string name,string version,uint256 chainId)
              name "BlendSM Broker", version "1"
    type    = Connect(address broker,string clientId,uint64 issuedAt,bytes16 nonce)
    digest  = keccak256(0x1901 || domainSeparator || hashStruct(connect))

``broker`` is the broker operator's address (its identity on chain), so a token given
to one broker is worthless at another; ``clientId`` binds it to one MQTT session id;
``issuedAt`` (unix seconds) makes it short-lived and the random ``nonce`` lets the
broker refuse a second use within that life. Signatures follow the voucher rules
(65 bytes r || s || v, low s, v 27/28), so wallets and eth_account tokens both pass.

The verifier hashes with our own keccak and recovers with libsecp256k1 (coincurve):
no eth_account on the hot path, and the domain separator and type-hash prefix are
computed once per verifier.
"""

from __future__ import annotations

import heapq
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from blendsm.errors import ConfigError, ConnectTokenError, VoucherSignatureError

from ._ecdsa import key_address, recover_address, sign_digest, signing_key
from ._eip712 import (
    EIP712_DOMAIN_NO_CONTRACT_TYPEHASH,
    address_bytes,
    check_chain_id,
    domain_separator,
    typed_data,
)
from ._keccak import checksum_address, keccak256

__all__ = [
    "CONNECT_DOMAIN_NAME",
    "CONNECT_DOMAIN_TYPEHASH",
    "CONNECT_DOMAIN_VERSION",
    "CONNECT_TOKEN_MAX_LENGTH",
    "CONNECT_TOKEN_PREFIX",
    "CONNECT_TYPEHASH",
    "ConnectToken",
    "ConnectTokenSigner",
    "ConnectTokenVerifier",
    "connect_digest",
    "connect_typed_data",
    "parse_connect_token",
]

CONNECT_DOMAIN_NAME = "BlendSM Broker"
CONNECT_DOMAIN_VERSION = "1"
CONNECT_DOMAIN_TYPEHASH = EIP712_DOMAIN_NO_CONTRACT_TYPEHASH
"""``keccak256("EIP712Domain(string name,string version,uint256 chainId)")``."""
CONNECT_TYPEHASH = keccak256(
    b"Connect(address broker,string clientId,uint64 issuedAt,bytes16 nonce)"
)
CONNECT_TOKEN_PREFIX = "bsm1"
UINT64_MAX = 2**64 - 1
CONNECT_TOKEN_MAX_LENGTH = len(CONNECT_TOKEN_PREFIX) + 1 + 20 + 1 + 32 + 1 + 130
"""189: prefix, the longest uint64 (20 digits), nonce and signature, with three dots."""

# ASCII digits only (``int()`` alone would take "+1", "1_0", " 1", Arabic-Indic digits).
_ISSUED_AT = re.compile(r"0|[1-9][0-9]{0,19}")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_HEX130 = re.compile(r"[0-9a-fA-F]{130}")


@dataclass(frozen=True, slots=True)
class ConnectToken:
    """A parsed token: ``issued_at`` (uint64 seconds), 16-byte ``nonce``, 65-byte ``signature``."""

    issued_at: int
    nonce: bytes
    signature: bytes

    def encode(self) -> str:
        """The password text, signature and nonce in lowercase hex."""
        return f"{CONNECT_TOKEN_PREFIX}.{self.issued_at}.{self.nonce.hex()}.{self.signature.hex()}"


def parse_connect_token(password: str | bytes | None) -> ConnectToken:
    """Parse a password strictly: exactly four dot-separated fields, nothing else.

    ``bytes`` must be ASCII. Hex may be either case. Raises :class:`ConnectTokenError`
    naming the first thing wrong; the signature itself is not checked here.
    """
    if password is None:
        raise ConnectTokenError("no password: a connect token is required")
    if isinstance(password, bytes):
        if len(password) > CONNECT_TOKEN_MAX_LENGTH:
            raise ConnectTokenError(
                f"token too long: {len(password)} bytes, at most {CONNECT_TOKEN_MAX_LENGTH}"
            )
        try:
            password = password.decode("ascii")
        except UnicodeDecodeError:
            raise ConnectTokenError("token is not ASCII") from None
    elif not isinstance(password, str):
        raise ConnectTokenError(f"token must be str or bytes, got {type(password).__name__}")
    if len(password) > CONNECT_TOKEN_MAX_LENGTH:
        raise ConnectTokenError(
            f"token too long: {len(password)} characters, at most {CONNECT_TOKEN_MAX_LENGTH}"
        )
    fields = password.split(".")
    if len(fields) != 4:
        raise ConnectTokenError(
            f"token must have 4 dot-separated fields"
            f" ({CONNECT_TOKEN_PREFIX}.issuedAt.nonce.signature), got {len(fields)}"
        )
    prefix, issued, nonce, signature = fields
    if prefix != CONNECT_TOKEN_PREFIX:
        raise ConnectTokenError(f"token must start with {CONNECT_TOKEN_PREFIX!r}, got {prefix!r}")
    if _ISSUED_AT.fullmatch(issued) is None:
        raise ConnectTokenError(
            f"issuedAt must be decimal ASCII digits without sign or leading zeros, got {issued!r}"
        )
    issued_at = int(issued)
    if issued_at > UINT64_MAX:
        raise ConnectTokenError(f"issuedAt {issued_at} does not fit uint64")
    if _HEX32.fullmatch(nonce) is None:
        raise ConnectTokenError(f"nonce must be 32 hex digits (16 bytes), got {nonce!r}")
    if _HEX130.fullmatch(signature) is None:
        raise ConnectTokenError(
            f"signature must be 130 hex digits (65 bytes r || s || v), got {len(signature)} characters"
        )
    return ConnectToken(issued_at, bytes.fromhex(nonce), bytes.fromhex(signature))


def _client_id_bytes(client_id: object, error: type[ValueError]) -> bytes:
    """UTF-8 of a non-empty client id (an empty one is replaced by the broker, unsignable)."""
    if not isinstance(client_id, str) or not client_id:
        raise error(f"client_id: must be a non-empty str, got {client_id!r}")
    try:
        return client_id.encode("utf-8")
    except UnicodeEncodeError:
        raise error("client_id: not encodable as UTF-8 (lone surrogate)") from None


class _Domain:
    """Precomputed ``0x1901 || separator`` and ``CONNECT_TYPEHASH || broker`` for one broker."""

    __slots__ = ("broker", "broker_bytes", "chain_id", "prefix", "struct_head")

    def __init__(self, chain_id: int, broker: str | bytes) -> None:
        self.chain_id = check_chain_id(chain_id)
        self.broker_bytes = address_bytes(broker, "broker", ConfigError)
        self.broker = checksum_address(self.broker_bytes)
        separator = domain_separator(CONNECT_DOMAIN_NAME, CONNECT_DOMAIN_VERSION, self.chain_id)
        self.prefix = b"\x19\x01" + separator
        self.struct_head = CONNECT_TYPEHASH + bytes(12) + self.broker_bytes

    def digest(self, client_id: bytes, issued_at: int, nonce: bytes) -> bytes:
        struct_hash = keccak256(
            self.struct_head
            + keccak256(client_id)
            + issued_at.to_bytes(32, "big")
            + nonce
            + bytes(16)
        )
        return keccak256(self.prefix + struct_hash)


def _check_issued_at(issued_at: object) -> int:
    if isinstance(issued_at, bool) or not isinstance(issued_at, int):
        raise ConfigError(f"issued_at: must be an int, got {issued_at!r}")
    if not 0 <= issued_at <= UINT64_MAX:
        raise ConfigError(f"issued_at: must fit uint64, got {issued_at}")
    return issued_at


def _check_nonce(nonce: object) -> bytes:
    if not isinstance(nonce, bytes) or len(nonce) != 16:
        raise ConfigError("nonce: must be 16 bytes (bytes16)")
    return nonce


def connect_digest(
    chain_id: int, broker: str | bytes, client_id: str, issued_at: int, nonce: bytes
) -> bytes:
    """The 32-byte EIP-712 digest a client signs; inputs checked (ConfigError)."""
    return _Domain(chain_id, broker).digest(
        _client_id_bytes(client_id, ConfigError), _check_issued_at(issued_at), _check_nonce(nonce)
    )


def connect_typed_data(
    chain_id: int, broker: str | bytes, client_id: str, issued_at: int, nonce: bytes
) -> dict[str, Any]:
    """The token's message as EIP-712 JSON (``eth_signTypedData_v4``) for wallets; sign it,
    then build the password with ``ConnectToken(issued_at, nonce, signature).encode()``."""
    domain = _Domain(chain_id, broker)
    _client_id_bytes(client_id, ConfigError)
    return typed_data(
        CONNECT_DOMAIN_NAME,
        CONNECT_DOMAIN_VERSION,
        domain.chain_id,
        None,
        "Connect",
        (
            ("broker", "address"),
            ("clientId", "string"),
            ("issuedAt", "uint64"),
            ("nonce", "bytes16"),
        ),
        {
            "broker": domain.broker,
            "clientId": client_id,
            "issuedAt": _check_issued_at(issued_at),
            "nonce": _check_nonce(nonce),
        },
    )


class _BoundToBroker:
    """Base of the signer and the verifier: both are bound to one broker and chain id."""

    __slots__ = ("_domain",)
    _domain: _Domain

    @property
    def broker(self) -> str:
        """Checksum address of the broker operator the tokens are bound to."""
        return self._domain.broker

    @property
    def chain_id(self) -> int:
        """The chain id in the tokens' EIP-712 domain."""
        return self._domain.chain_id


class ConnectTokenSigner(_BoundToBroker):
    """Makes CONNECT passwords for one key, chain and broker; ``address`` is the username."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes, chain_id: int, broker: str | bytes) -> None:
        self._key = signing_key(private_key)
        self._domain = _Domain(chain_id, broker)
        self.address: str = checksum_address(key_address(self._key))

    def token(self, client_id: str, now: float | None = None) -> str:
        """A fresh password for ``client_id``, issued at ``now`` (default: the clock).

        Each call draws a new random nonce, so make one token per connection attempt.
        """
        issued_at = _check_issued_at(int(time.time() if now is None else now))
        nonce = secrets.token_bytes(16)
        digest = self._domain.digest(_client_id_bytes(client_id, ConfigError), issued_at, nonce)
        return ConnectToken(issued_at, nonce, sign_digest(self._key, digest)).encode()


class ConnectTokenVerifier(_BoundToBroker):
    """Checks CONNECT credentials for one broker; returns the client's checksum address.

    A token is accepted when, in this order: it parses; ``username`` is an address
    (``0x`` + 40 hex; mixed case must be a valid EIP-55 checksum); ``client_id`` is a
    non-empty str; ``now - validity <= issuedAt <= now + clock_skew``; the signature
    (voucher rules) recovers to ``username`` under this chain id and broker; and its
    nonce has not been accepted before for that address. Any failure raises
    :class:`ConnectTokenError`. The replay check comes last, so only correctly signed,
    fresh tokens ever enter the cache.

    Replay cache: one entry per accepted (address, nonce) until ``issuedAt + validity``,
    after which the time check alone refuses the token and the entry is dropped (a
    min-heap on expiry, purged on every call, amortised O(log n)). At most
    ``max_cached`` entries are kept; when it is full of unexpired entries a new token
    is refused (fail closed) instead of evicting a nonce that could still be replayed.
    Full means ``max_cached`` accepted connects within one ``validity`` window, e.g.
    100 000 per 65 s by default; raise it for bigger brokers (an entry costs ~200 B).
    A member key can fill it on purpose, which denies new connects until entries
    expire but never admits a replay.

    Thread-safe (the cache is guarded by a lock); on asyncio call it directly, it
    never blocks (~50 us, mostly the ECDSA recovery).
    """

    __slots__ = ("_expiries", "_lock", "_seen", "clock_skew", "max_cached", "validity")

    def __init__(
        self,
        chain_id: int,
        broker: str | bytes,
        validity: int = 60,
        clock_skew: int = 5,
        max_cached: int = 100_000,
    ) -> None:
        for name, value, low in (
            ("validity", validity, 1),
            ("clock_skew", clock_skew, 0),
            ("max_cached", max_cached, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: must be an int >= {low}, got {value!r}")
        self._domain = _Domain(chain_id, broker)
        self.validity = validity
        self.clock_skew = clock_skew
        self.max_cached = max_cached
        self._seen: dict[bytes, int] = {}  # address || nonce -> expiry (issuedAt + validity)
        self._expiries: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()

    def cached(self) -> int:
        """Number of nonces currently remembered (expired ones go on the next verify)."""
        return len(self._seen)

    def verify(
        self,
        username: str | None,
        client_id: str,
        password: str | bytes | None,
        now: float,
    ) -> str:
        """The checksum address of an authentic, fresh, first-use token, else ConnectTokenError.

        ``now`` is the broker's unix time; a non-finite one is a caller bug (ConfigError).
        """
        if not math.isfinite(now):
            raise ConfigError(f"now: must be a finite unix time, got {now!r}")
        token = parse_connect_token(password)
        if username is None:
            raise ConnectTokenError("no username: it must be the client's address")
        address = address_bytes(username, "username", ConnectTokenError)
        client = _client_id_bytes(client_id, ConnectTokenError)
        issued_at = token.issued_at
        if issued_at < now - self.validity:
            raise ConnectTokenError(
                f"token expired: issued at {issued_at}, now {now}, valid {self.validity} s"
            )
        if issued_at > now + self.clock_skew:
            raise ConnectTokenError(
                f"token issued in the future: issued at {issued_at}, now {now},"
                f" allowed clock skew {self.clock_skew} s"
            )
        try:
            signer = recover_address(
                self._domain.digest(client, issued_at, token.nonce), token.signature
            )
        except VoucherSignatureError as exc:
            raise ConnectTokenError(f"bad signature: {exc}") from None
        if signer != address:
            # Also what a token for another broker, chain id or client id looks like.
            raise ConnectTokenError(
                f"signature does not match username {checksum_address(address)} for this"
                f" broker, chain id {self._domain.chain_id} and client id {client_id!r}"
            )
        key = address + token.nonce
        expiry = issued_at + self.validity
        with self._lock:
            expiries = self._expiries
            seen = self._seen
            while expiries and expiries[0][0] < now:
                del seen[heapq.heappop(expiries)[1]]
            if key in seen:
                raise ConnectTokenError(
                    f"token replayed: nonce 0x{token.nonce.hex()} already used by"
                    f" {checksum_address(address)}"
                )
            if len(seen) >= self.max_cached:
                raise ConnectTokenError(
                    f"replay cache full ({self.max_cached} unexpired nonces); refusing new"
                    " tokens until some expire"
                )
            seen[key] = expiry
            heapq.heappush(expiries, (expiry, key))
        return checksum_address(address)
