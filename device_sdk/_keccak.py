"""Keccak-256 from the fastest installed backend, and EIP-55 addresses built on it.

Every voucher check hashes three times (struct, digest, public key -> address), so the
backend matters. Measured on one core for 64 bytes (2026-11, Python 3.11):

=============================  =======  ==========================================
backend                        time     notes
=============================  =======  ==========================================
``pysha3`` (safe-pysha3)       0.66 us  C extension; optional, eth-tester pulls it in
``pycryptodome``               3.2 us   ``Crypto.Hash.keccak``, a required dependency
``eth_hash``                   3.3 us   wraps one of the two above; last resort
=============================  =======  ==========================================

The ranking comes from what each backend is (a direct C call vs a cffi object per call),
so it holds across machines: the chain is fixed rather than timed at import, which keeps
imports fast and the choice reproducible. Each candidate must also reproduce the known
digest of ``b""`` before it is chosen: an unrelated module named ``sha3`` (or one giving
FIPS SHA3-256, which pads differently) is skipped instead of silently signing garbage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = [
    "KECCAK_BACKEND",
    "checksum_address",
    "keccak256",
    "keccak256_backends",
]

Hasher = Callable[[bytes], bytes]

_EMPTY_DIGEST = bytes.fromhex("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")


def _pysha3() -> Hasher:
    import sha3

    new = sha3.keccak_256

    def keccak256(data: bytes) -> bytes:
        return new(data).digest()  # type: ignore[no-any-return]

    return keccak256


def _pycryptodome() -> Hasher:
    from Crypto.Hash import keccak

    new = keccak.new

    def keccak256(data: bytes) -> bytes:
        return new(data=data, digest_bits=256).digest()

    return keccak256


def _eth_hash() -> Hasher:
    from eth_hash.auto import keccak

    def keccak256(data: bytes) -> bytes:
        return keccak(data)

    return keccak256


# Fastest first; see the module docstring for the figures.
_CHAIN: tuple[tuple[str, Callable[[], Hasher]], ...] = (
    ("pysha3", _pysha3),
    ("pycryptodome", _pycryptodome),
    ("eth_hash", _eth_hash),
)


def _load(loader: Callable[[], Hasher]) -> Hasher | None:
    """The backend if it imports and hashes correctly, else None."""
    try:
        fn = loader()
        ok = fn(b"") == _EMPTY_DIGEST
    except Exception:  # any import or runtime failure just means "not this backend"
        return None
    return fn if ok else None


def keccak256_backends() -> dict[str, Hasher]:
    """Every working backend, fastest first (for cross-checks and benchmarks)."""
    found: dict[str, Hasher] = {}
    for name, loader in _CHAIN:
        fn = _load(loader)
        if fn is not None:
            found[name] = fn
    return found


def _choose() -> tuple[str, Hasher]:
    for name, loader in _CHAIN:
        fn = _load(loader)
        if fn is not None:
            return name, fn
    raise ImportError(  # pycryptodome is a hard dependency, so this means a broken install
        "no working keccak-256 backend: install pycryptodome (or safe-pysha3)"
    )


KECCAK_BACKEND: str
"""Name of the backend :func:`keccak256` uses: ``pysha3``, ``pycryptodome`` or ``eth_hash``."""

keccak256: Hasher
"""Keccak-256 (Ethereum's, not FIPS SHA3-256) of ``data``, as 32 bytes."""

KECCAK_BACKEND, keccak256 = _choose()


def checksum_address(address: bytes) -> str:
    """EIP-55 checksum form of a 20-byte address.

    Written here because ``eth_utils.to_checksum_address`` costs ~13 us, a quarter of a
    whole voucher check; this takes ~3 us, and ~0.1 us for an address seen recently (the
    broker checksums the same few lanes and payers 4 times per voucher decoded).
    """
    return _checksum_cached(bytes(address))


@functools.lru_cache(maxsize=4096)
def _checksum_cached(address: bytes) -> str:
    """:func:`checksum_address` of ``bytes`` (hashable), cached: bounded to 4,096 addresses,
    so addresses a client sends cannot grow it."""
    if len(address) != 20:
        raise ValueError(f"an address is 20 bytes, got {len(address)}")
    lower = address.hex()
    mask = keccak256(lower.encode("ascii")).hex()
    return "0x" + "".join(c.upper() if m >= "8" else c for c, m in zip(lower, mask, strict=False))
