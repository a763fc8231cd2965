"""blendsm.device_sdk: the light edge SDK and wire protocol.

Imports only paho-mqtt, eth-account/coincurve, orjson, pycryptodome and the stdlib (never
web3 or amqtt), so it runs on a gateway and the broker can reuse it on its hot path.
"""

from ._keccak import (
    KECCAK_BACKEND,
    checksum_address,
    keccak256,
    keccak256_backends,
)
from ._keys import account_from_env, account_from_keystore
from ._merkle import (
    MerkleTree,
    hash_pair,
    leaf_hash,
    process_proof,
    verify_proof,
)
from ._voucher import (
    EIP712_DOMAIN_TYPEHASH,
    SECP256K1_HALF_N,
    SECP256K1_N,
    UINT256_MAX,
    VOUCHER_DOMAIN_NAME,
    VOUCHER_DOMAIN_VERSION,
    VOUCHER_TYPEHASH,
    ChannelState,
    Voucher,
    VoucherDomain,
    VoucherSigner,
    VoucherVerifier,
    high_s_twin,
    recover_voucher_signer,
    sign_voucher,
    voucher_digest,
    voucher_typed_data,
)

__all__ = [
    "EIP712_DOMAIN_TYPEHASH",
    "KECCAK_BACKEND",
    "SECP256K1_HALF_N",
    "SECP256K1_N",
    "UINT256_MAX",
    "VOUCHER_DOMAIN_NAME",
    "VOUCHER_DOMAIN_VERSION",
    "VOUCHER_TYPEHASH",
    "ChannelState",
    "MerkleTree",
    "Voucher",
    "VoucherDomain",
    "VoucherSigner",
    "VoucherVerifier",
    "account_from_env",
    "account_from_keystore",
    "checksum_address",
    "hash_pair",
    "high_s_twin",
    "keccak256",
    "keccak256_backends",
    "leaf_hash",
    "process_proof",
    "recover_voucher_signer",
    "sign_voucher",
    "verify_proof",
    "voucher_digest",
    "voucher_typed_data",
]
