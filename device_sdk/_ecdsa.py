"""secp256k1 keys and signatures, with OpenZeppelin 5 ``ECDSA.recover`` rules.

Why one module: vouchers, message envelopes, CONNECT tokens and topic-key messages are all
signed by one secp256k1 key over a 32-byte digest and checked the same way, because the
broker must never accept a signature the contracts would refuse. Keeping the key check,
the signing and the recovery here means there is one place that decides what a valid
private key and a valid signature are.

Signatures are 65 bytes ``r || s || v`` with ``v`` in {27, 28} and low ``s``: what
libsecp256k1 (coincurve) produces deterministically (RFC 6979), what eth_account and
wallets produce, and what ``ECDSA.recover`` accepts.
"""

from __future__ import annotations

from coincurve import PrivateKey, PublicKey
from eth_account.signers.local import LocalAccount

from blendsm.errors import ConfigError, VoucherSignatureError

from ._keccak import keccak256

__all__ = [
    "SECP256K1_HALF_N",
    "SECP256K1_N",
    "high_s_twin",
    "key_address",
    "private_key_bytes",
    "recover_address",
    "sign_digest",
    "signing_key",
]

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
"""Order of the secp256k1 group."""
SECP256K1_HALF_N = SECP256K1_N // 2
"""Largest ``s`` OpenZeppelin accepts (``0x7FFF...5D576E7357A4501DDFE92F46681B20A0``)."""


def private_key_bytes(account: LocalAccount | bytes) -> bytes:
    """32 key bytes from an eth_account LocalAccount or raw bytes (ConfigError otherwise)."""
    if isinstance(account, bytes | bytearray):
        key = bytes(account)
    else:
        raw = getattr(account, "key", None)
        if raw is None:
            raise ConfigError(
                f"account: expected a LocalAccount or 32 private key bytes, got {type(account).__name__}"
            )
        key = bytes(raw)
    if len(key) != 32:
        raise ConfigError(f"account: a private key is 32 bytes, got {len(key)}")
    return key


def signing_key(private_key: bytes) -> PrivateKey:
    """The coincurve key of 32 secret bytes; ConfigError if they are not a valid secret.

    Every signer checks its key here, at construction, so a bad key fails where it is
    configured and not at the first message (key setup costs ~25 us: keep one signer).
    """
    if not isinstance(private_key, bytes) or len(private_key) != 32:
        raise ConfigError("private_key: must be 32 bytes")
    try:
        return PrivateKey(private_key)
    except ValueError:
        raise ConfigError("private_key: not a valid secp256k1 secret (0 or >= n)") from None


def key_address(key: PrivateKey) -> bytes:
    """The 20 address bytes of ``key``: ``keccak256(uncompressed public key)[12:]``."""
    return keccak256(key.public_key.format(compressed=False)[1:])[12:]


def sign_digest(key: PrivateKey, digest: bytes) -> bytes:
    """``r || s || v`` (v 27/28) over a 32-byte digest; deterministic and always low-s, so
    it equals eth_account's signature and passes OZ ``ECDSA.recover``."""
    rs_recid = key.sign_recoverable(digest, hasher=None)
    return rs_recid[:64] + bytes((rs_recid[64] + 27,))


def recover_address(digest: bytes, signature: bytes) -> bytes:
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


def high_s_twin(signature: bytes) -> bytes:
    """The malleable twin (r, n - s, v flipped) of a 65-byte signature.

    Raw ``ecrecover`` maps both to the same signer; OpenZeppelin (and we) refuse the
    high-s one. Shared with the contract tests' rejection table.
    """
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("expected a 65-byte r || s || v signature with v in {27, 28}")
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((55 - signature[64],))
