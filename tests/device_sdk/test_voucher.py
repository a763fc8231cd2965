"""Vouchers: byte-for-byte agreement with eth_account, and every refusal OZ 5 makes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.datatypes import Signature
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak as eth_utils_keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.device_sdk import (
    EIP712_DOMAIN_TYPEHASH,
    KECCAK_BACKEND,
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
    checksum_address,
    high_s_twin,
    keccak256,
    keccak256_backends,
    recover_voucher_signer,
    sign_voucher,
    voucher_digest,
    voucher_typed_data,
)
from blendsm.errors import (
    ConfigError,
    VoucherChannelError,
    VoucherError,
    VoucherLaneError,
    VoucherNotNewerError,
    VoucherSignatureError,
    WireError,
)

CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_CONTRACT = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
CHAIN_ID = 31337
# TEST ONLY: anvil's publicly known first dev key.
KEY = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
PAYER = Account.from_key(KEY).address  # anvil's first account
OTHER_KEY = bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
CID = bytes.fromhex("11" * 32)
# TEST ONLY: the broker key a voucher names (its lane); any address.
LANE = to_checksum_address("0x" + "ab" * 20)
OTHER_LANE = to_checksum_address("0x" + "cd" * 20)
OTHER_CID = bytes.fromhex("22" * 32)

private_keys = st.integers(1, SECP256K1_N - 1).map(lambda k: k.to_bytes(32, "big"))
uint256s = st.integers(0, UINT256_MAX)
bytes32s = st.binary(min_size=32, max_size=32)
addresses = st.binary(min_size=20, max_size=20)


def typed_data(
    chain_id: int, contract: str, channel_id: bytes, amount: int, lane: str | None = None
) -> SignableMessage:
    """The same voucher as eth_account encodes it from the EIP-712 JSON form."""
    return encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "Voucher": [
                    {"name": "channelId", "type": "bytes32"},
                    {"name": "lane", "type": "address"},
                    {"name": "cumulativeAmount", "type": "uint256"},
                ],
            },
            "primaryType": "Voucher",
            "domain": {
                "name": "BlendSM PaymentChannels",
                "version": "2",
                "chainId": chain_id,
                "verifyingContract": contract,
            },
            "message": {
                "channelId": channel_id,
                "lane": lane or LANE,
                "cumulativeAmount": amount,
            },
        }
    )


@pytest.fixture
def domain() -> VoucherDomain:
    return VoucherDomain(CHAIN_ID, CONTRACT)


@pytest.fixture
def verifier(domain: VoucherDomain) -> VoucherVerifier:
    return VoucherVerifier(domain)


@pytest.fixture
def channel() -> ChannelState:
    return ChannelState(PAYER, deposit=1_000, claimed=100)


def with_signature(voucher: Voucher, signature: bytes) -> Voucher:
    return Voucher(voucher.channel_id, voucher.lane, voucher.cumulative_amount, signature)


def rs_v(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,))


# --- keccak ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        (b"", "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"),
        (b"abc", "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"),
        (
            b"The quick brown fox jumps over the lazy dog",
            "4d741b6f1eb29cb2a9b9911c82f56fa8d73b04959d3d9d222895df6c0b28aa15",
        ),
        (  # ERC-20 Transfer event topic
            b"Transfer(address,address,uint256)",
            "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef",
        ),
    ],
)
def test_keccak256_known_vectors_on_every_backend(data: bytes, digest: str) -> None:
    backends = keccak256_backends()
    assert KECCAK_BACKEND in backends
    assert "pycryptodome" in backends  # the required dependency always works
    for name, fn in backends.items():
        assert fn(data).hex() == digest, name
    assert keccak256(data).hex() == digest


def test_keccak_backend_is_the_fastest_available() -> None:
    assert next(iter(keccak256_backends())) == KECCAK_BACKEND


@given(st.binary(max_size=600))  # several 136-byte blocks
def test_keccak256_backends_agree(data: bytes) -> None:
    assert {fn(data) for fn in keccak256_backends().values()} == {eth_utils_keccak(data)}


@given(addresses)
def test_checksum_address_matches_eth_utils(raw: bytes) -> None:
    assert checksum_address(raw) == to_checksum_address(raw)
    # cached by value: the same answer again, and for any bytes-like holding the address
    assert checksum_address(raw) == checksum_address(bytearray(raw)) == to_checksum_address(raw)
    assert checksum_address(memoryview(raw)) == to_checksum_address(raw)


def test_checksum_address_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        checksum_address(bytes(19))


# --- encoding agrees with eth_account -------------------------------------------------


def test_typehashes() -> None:
    assert (
        keccak256(b"Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)")
        == VOUCHER_TYPEHASH
    )
    assert EIP712_DOMAIN_TYPEHASH.hex() == (
        "8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f"
    )
    assert (VOUCHER_DOMAIN_NAME, VOUCHER_DOMAIN_VERSION) == ("BlendSM PaymentChannels", "2")


@settings(max_examples=60)
@given(st.integers(0, UINT256_MAX), addresses)
def test_domain_separator_matches_eth_account(chain_id: int, contract: bytes) -> None:
    address = to_checksum_address(contract)
    domain = VoucherDomain(chain_id, address)
    assert domain.separator == typed_data(chain_id, address, CID, 0).header
    assert domain.verifying_contract == address
    assert domain.verifying_contract_bytes == contract
    assert VoucherDomain(chain_id, contract) == domain
    assert VoucherDomain(chain_id, address.lower()) == domain


@settings(max_examples=150)
@given(private_keys, st.integers(1, 2**64), addresses, bytes32s, uint256s)
def test_sign_and_recover_match_eth_account(
    key: bytes, chain_id: int, contract: bytes, channel_id: bytes, amount: int
) -> None:
    address = to_checksum_address(contract)
    domain = VoucherDomain(chain_id, address)
    message = typed_data(chain_id, address, channel_id, amount)
    theirs = Account.sign_message(message, key)
    ours = sign_voucher(key, domain, channel_id, LANE, amount)

    assert voucher_digest(domain, channel_id, LANE, amount) == theirs.message_hash
    assert ours.signature == theirs.signature  # RFC 6979 on both sides
    assert ours.signature[64] in (27, 28)
    assert int.from_bytes(ours.signature[32:64], "big") <= SECP256K1_HALF_N

    payer = Account.from_key(key).address
    assert recover_voucher_signer(domain, ours) == payer
    assert Account.recover_message(message, signature=ours.signature) == payer
    assert VoucherSigner(key, domain).address == payer


def test_signer_is_reusable(domain: VoucherDomain) -> None:
    signer = VoucherSigner(KEY, domain)
    assert signer.address == PAYER
    vouchers = [signer.sign(CID, LANE, amount) for amount in (1, 2, 3)]
    assert [recover_voucher_signer(domain, v) for v in vouchers] == [PAYER] * 3
    assert vouchers[0] == sign_voucher(KEY, domain, CID, LANE, 1)


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "00" * 32])
def test_signer_rejects_bad_private_key(domain: VoucherDomain, bad: object) -> None:
    with pytest.raises(ConfigError, match="private_key"):
        VoucherSigner(bad, domain)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [bytes(32), SECP256K1_N.to_bytes(32, "big")])
def test_signer_rejects_out_of_range_secret(domain: VoucherDomain, bad: bytes) -> None:
    with pytest.raises(ConfigError, match="private_key"):
        VoucherSigner(bad, domain)


# --- voucher and domain fields --------------------------------------------------------


@pytest.mark.parametrize("channel_id", [b"", bytes(31), bytes(33), bytearray(32), "11" * 32])
def test_voucher_rejects_channel_id_not_bytes32(channel_id: object) -> None:
    with pytest.raises(VoucherError, match="channel_id"):
        Voucher(channel_id, LANE, 1, bytes(65))  # type: ignore[arg-type]
    with pytest.raises(VoucherError, match="channel_id"):
        sign_voucher(KEY, VoucherDomain(1, CONTRACT), channel_id, LANE, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", [-1, 2**256, 2**300, True, 1.0, "1"])
def test_voucher_rejects_amount_not_uint256(amount: object) -> None:
    with pytest.raises(VoucherError, match="cumulative_amount"):
        Voucher(CID, LANE, amount, bytes(65))  # type: ignore[arg-type]
    with pytest.raises(VoucherError, match="cumulative_amount"):
        voucher_digest(VoucherDomain(1, CONTRACT), CID, LANE, amount)  # type: ignore[arg-type]


def test_voucher_accepts_uint256_bounds(domain: VoucherDomain) -> None:
    for amount in (0, UINT256_MAX):
        assert recover_voucher_signer(domain, sign_voucher(KEY, domain, CID, LANE, amount)) == PAYER


def test_voucher_signature_must_be_bytes() -> None:
    with pytest.raises(VoucherSignatureError):
        Voucher(CID, LANE, 1, "0x" + "00" * 65)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chain_id", "contract"),
    [
        (-1, CONTRACT),
        (2**256, CONTRACT),
        (True, CONTRACT),
        (1, CONTRACT[:-1]),
        (1, CONTRACT[2:]),
        (1, bytes(19)),
        (1, CONTRACT.replace("F", "f", 1)),  # mixed case with a broken checksum
    ],
)
def test_domain_rejects_bad_parameters(chain_id: int, contract: str) -> None:
    with pytest.raises(ConfigError):
        VoucherDomain(chain_id, contract)


def test_channel_state_normalises_and_checks_payer() -> None:
    state = ChannelState(PAYER.lower(), 10, 0)
    assert state.payer == PAYER
    assert state.payer_bytes == bytes.fromhex(PAYER[2:])
    assert state == ChannelState(bytes.fromhex(PAYER[2:]), 10, 0)
    with pytest.raises(WireError, match="checksum"):
        ChannelState(PAYER.swapcase().replace("0X", "0x"), 10, 0)


# --- verify: what claim pays ----------------------------------------------------------


def test_verify_pays_the_delta(verifier: VoucherVerifier, domain: VoucherDomain) -> None:
    channel = ChannelState(PAYER, deposit=1_000, claimed=100)
    assert verifier.verify(sign_voucher(KEY, domain, CID, LANE, 101), channel, now=0) == 1
    assert verifier.verify(sign_voucher(KEY, domain, CID, LANE, 1_000), channel, now=0) == 900


def test_verify_caps_payout_at_deposit(verifier: VoucherVerifier, domain: VoucherDomain) -> None:
    voucher = sign_voucher(KEY, domain, CID, LANE, 5_000)
    assert verifier.verify(voucher, ChannelState(PAYER, 1_000, 100), now=0) == 900
    with pytest.raises(VoucherNotNewerError):
        verifier.verify(voucher, ChannelState(PAYER, 1_000, 1_000), now=0)


@pytest.mark.parametrize("amount", [0, 50, 100])
def test_verify_refuses_voucher_not_above_claimed(
    verifier: VoucherVerifier, domain: VoucherDomain, channel: ChannelState, amount: int
) -> None:
    with pytest.raises(VoucherNotNewerError):
        verifier.verify(sign_voucher(KEY, domain, CID, LANE, amount), channel, now=0)


def test_verify_refuses_other_signer(
    verifier: VoucherVerifier, domain: VoucherDomain, channel: ChannelState
) -> None:
    with pytest.raises(VoucherSignatureError, match="not by the payer"):
        verifier.verify(sign_voucher(OTHER_KEY, domain, CID, LANE, 500), channel, now=0)


@pytest.mark.parametrize(
    "signed_under",
    [VoucherDomain(CHAIN_ID + 1, CONTRACT), VoucherDomain(CHAIN_ID, OTHER_CONTRACT)],
    ids=["wrong-chain-id", "wrong-contract"],
)
def test_verify_refuses_other_domain(
    verifier: VoucherVerifier, channel: ChannelState, signed_under: VoucherDomain
) -> None:
    voucher = sign_voucher(KEY, signed_under, CID, LANE, 500)
    assert recover_voucher_signer(signed_under, voucher) == PAYER
    with pytest.raises(VoucherSignatureError, match="not by the payer"):
        verifier.verify(voucher, channel, now=0)


def test_verify_refuses_voucher_moved_to_other_channel(
    verifier: VoucherVerifier, domain: VoucherDomain, channel: ChannelState
) -> None:
    voucher = sign_voucher(KEY, domain, CID, LANE, 500)
    moved = Voucher(OTHER_CID, LANE, voucher.cumulative_amount, voucher.signature)
    with pytest.raises(VoucherSignatureError, match="not by the payer"):
        verifier.verify(moved, channel, now=0)
    # Honest voucher for another channel of the same payer, credited to the wrong one.
    other = sign_voucher(KEY, domain, OTHER_CID, LANE, 500)
    assert verifier.verify(other, channel, now=0) == 400
    with pytest.raises(VoucherChannelError, match="not 0x2222"):
        verifier.verify(voucher, channel, now=0, channel_id=OTHER_CID)
    assert verifier.verify(voucher, channel, now=0, channel_id=CID) == 400


def test_verify_refuses_altered_amount(
    verifier: VoucherVerifier, domain: VoucherDomain, channel: ChannelState
) -> None:
    voucher = sign_voucher(KEY, domain, CID, LANE, 500)
    with pytest.raises(VoucherSignatureError, match="not by the payer"):
        verifier.verify(Voucher(CID, LANE, 900, voucher.signature), channel, now=0)


# --- verify: channel state ------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (None, "unknown channel"),
        (ChannelState(bytes(20), 1_000, 0), "unknown channel"),
        (ChannelState(PAYER, 1_000, 100, settled=True), "settled"),
        (ChannelState(PAYER, 1_000, 100, closes_at=1_000), "challenge period ended"),
        (ChannelState(PAYER, 1_000, 100, closes_at=999), "challenge period ended"),
    ],
)
def test_verify_refuses_channel_state(
    verifier: VoucherVerifier, domain: VoucherDomain, state: ChannelState | None, match: str
) -> None:
    with pytest.raises(VoucherChannelError, match=match):
        verifier.verify(sign_voucher(KEY, domain, CID, LANE, 500), state, now=1_000)


def test_verify_claims_during_challenge_period(
    verifier: VoucherVerifier, domain: VoucherDomain
) -> None:
    closing = ChannelState(PAYER, 1_000, 100, closes_at=1_001)
    assert verifier.verify(sign_voucher(KEY, domain, CID, LANE, 500), closing, now=1_000) == 400


def test_check_order_channel_then_signature_then_amount(
    verifier: VoucherVerifier, domain: VoucherDomain
) -> None:
    bad_sig_stale = Voucher(CID, LANE, 50, bytes(64))  # bad signature AND not newer
    settled = ChannelState(PAYER, 1_000, 100, settled=True)
    with pytest.raises(VoucherChannelError):
        verifier.verify(bad_sig_stale, settled, now=0)
    with pytest.raises(VoucherSignatureError):
        verifier.verify(bad_sig_stale, ChannelState(PAYER, 1_000, 100), now=0)
    stale_other_signer = sign_voucher(OTHER_KEY, domain, CID, LANE, 50)
    with pytest.raises(VoucherSignatureError):
        verifier.verify(stale_other_signer, ChannelState(PAYER, 1_000, 100), now=0)


# --- verify: signature shape, as OZ ECDSA.recover(bytes32, bytes) ----------------------


@pytest.fixture
def good(domain: VoucherDomain) -> Voucher:
    return sign_voucher(KEY, domain, CID, LANE, 500)


def test_high_s_twin_is_refused(
    verifier: VoucherVerifier, domain: VoucherDomain, channel: ChannelState, good: Voucher
) -> None:
    twin = high_s_twin(good.signature)
    r, s, v = good.signature[:32], good.signature[32:64], good.signature[64]
    assert twin[:32] == r
    assert int.from_bytes(twin[32:64], "big") == SECP256K1_N - int.from_bytes(s, "big")
    assert twin[64] == 55 - v
    # Plain ecrecover (eth_keys, no low-s rule) maps the twin to the same payer ...
    vrs = Signature(vrs=(twin[64] - 27, int.from_bytes(twin[:32]), int.from_bytes(twin[32:64])))
    digest = voucher_digest(domain, CID, LANE, 500)
    assert vrs.recover_public_key_from_msg_hash(digest).to_checksum_address() == PAYER
    # ... which is exactly why OZ and we refuse it.
    with pytest.raises(VoucherSignatureError, match=r"^ECDSAInvalidSignatureS\(0x"):
        verifier.verify(with_signature(good, twin), channel, now=0)
    with pytest.raises(VoucherSignatureError, match="ECDSAInvalidSignatureS"):
        recover_voucher_signer(domain, with_signature(good, twin))
    assert high_s_twin(twin) == good.signature


def test_high_s_twin_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="65-byte"):
        high_s_twin(bytes(64))
    with pytest.raises(ValueError, match="65-byte"):
        high_s_twin(bytes(64) + b"\x01")


def test_s_at_half_order_is_not_high(verifier: VoucherVerifier, channel: ChannelState) -> None:
    # s == n/2 passes OZ's s check; the signature then fails only as a wrong signer/point.
    sig = rs_v(1, SECP256K1_HALF_N, 27)
    with pytest.raises(VoucherSignatureError) as info:
        verifier.verify(Voucher(CID, LANE, 500, sig), channel, now=0)
    assert "ECDSAInvalidSignatureS" not in str(info.value)
    with pytest.raises(VoucherSignatureError, match="ECDSAInvalidSignatureS"):
        verifier.verify(Voucher(CID, LANE, 500, rs_v(1, SECP256K1_HALF_N + 1, 27)), channel, now=0)


@pytest.mark.parametrize("v", [0, 1, 2, 3, 26, 29, 35, 255])
def test_v_not_27_or_28_is_refused(
    verifier: VoucherVerifier, channel: ChannelState, good: Voucher, v: int
) -> None:
    sig = good.signature[:64] + bytes((v,))
    with pytest.raises(VoucherSignatureError, match=r"^ECDSAInvalidSignature: v must be 27 or 28"):
        verifier.verify(with_signature(good, sig), channel, now=0)


def eip2098(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:64], "big") | ((signature[64] - 27) << 255)
    return signature[:32] + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    ("shape", "length"),
    [("eip2098", 64), ("truncated", 64), ("empty", 0), ("padded", 66), ("doubled", 130)],
)
def test_signature_length_must_be_65(
    verifier: VoucherVerifier, channel: ChannelState, good: Voucher, shape: str, length: int
) -> None:
    sig = {
        "eip2098": eip2098(good.signature),
        "truncated": good.signature[:64],
        "empty": b"",
        "padded": good.signature + b"\x00",
        "doubled": good.signature * 2,
    }[shape]
    assert len(sig) == length
    with pytest.raises(VoucherSignatureError, match=rf"^ECDSAInvalidSignatureLength\({length}\)"):
        verifier.verify(with_signature(good, sig), channel, now=0)


def _x_not_on_curve() -> int:
    p = 2**256 - 2**32 - 977
    x = 1
    while pow(x**3 + 7, (p - 1) // 2, p) == 1:  # Euler: y^2 = x^3 + 7 has a root
        x += 1
    return x


@pytest.mark.parametrize(
    "r",
    [0, SECP256K1_N, SECP256K1_N + 1, 2**256 - 1, _x_not_on_curve()],
    ids=["zero", "n", "n+1", "max", "no-point"],
)
def test_garbage_r_is_refused(
    verifier: VoucherVerifier, channel: ChannelState, good: Voucher, r: int
) -> None:
    sig = r.to_bytes(32, "big") + good.signature[32:]
    with pytest.raises(VoucherSignatureError, match=r"^ECDSAInvalidSignature\b"):
        verifier.verify(with_signature(good, sig), channel, now=0)


def test_zero_s_is_refused(verifier: VoucherVerifier, channel: ChannelState, good: Voucher) -> None:
    sig = good.signature[:32] + bytes(32) + good.signature[64:]
    with pytest.raises(VoucherSignatureError, match=r"^ECDSAInvalidSignature\b"):
        verifier.verify(with_signature(good, sig), channel, now=0)


def _scalars(edges: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, UINT256_MAX), st.integers(1, SECP256K1_HALF_N), st.sampled_from(edges)
    )


@settings(max_examples=300)
@given(
    _scalars([0, 1, SECP256K1_N - 1, SECP256K1_N, UINT256_MAX]),
    _scalars([0, 1, SECP256K1_HALF_N, SECP256K1_HALF_N + 1, SECP256K1_N - 1, SECP256K1_N]),
    st.sampled_from([27, 28, 27, 28, 0, 1, 29, 255]),
)
def test_random_signatures_agree_with_raw_ecrecover(r: int, s: int, v: int) -> None:
    """Wherever OZ's extra rules pass, we recover what eth_keys' ecrecover recovers."""
    domain = VoucherDomain(CHAIN_ID, CONTRACT)
    voucher = Voucher(CID, LANE, 7, rs_v(r, s, v))
    try:
        expected: str | None = (
            Signature(vrs=(v - 27, r, s))
            .recover_public_key_from_msg_hash(voucher_digest(domain, CID, LANE, 7))
            .to_checksum_address()
        )
    except Exception:  # eth_keys refuses what ecrecover would map to address(0)
        expected = None
    oz_ok = 0 < s <= SECP256K1_HALF_N and v in (27, 28) and 0 < r < SECP256K1_N
    if oz_ok and expected is not None:
        assert recover_voucher_signer(domain, voucher) == expected
    else:
        with pytest.raises(VoucherSignatureError):
            recover_voucher_signer(domain, voucher)


# --- packaging constraint -------------------------------------------------------------


def test_device_sdk_imports_without_web3_or_amqtt() -> None:
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"web3", "amqtt"}:
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import blendsm.device_sdk as sdk
        domain = sdk.VoucherDomain(1, bytes(20))
        voucher = sdk.sign_voucher(bytes(31) + b"\\x01", domain, bytes(32), bytes(20), 1)
        assert sdk.recover_voucher_signer(domain, voucher)
        assert not {"web3", "amqtt"} & set(sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@given(st.integers(0, 2**64), bytes32s, uint256s)
def test_typed_data_json_is_the_same_voucher(chain_id: int, channel_id: bytes, amount: int) -> None:
    # Wallets that sign EIP-712 JSON themselves must produce the digest the contract checks.
    domain = VoucherDomain(chain_id, CONTRACT)
    ours = encode_typed_data(full_message=voucher_typed_data(domain, channel_id, LANE, amount))
    reference = typed_data(chain_id, domain.verifying_contract, channel_id, amount)
    assert (ours.header, ours.body) == (reference.header, reference.body)
    assert keccak256(b"\x19\x01" + ours.header + ours.body) == voucher_digest(
        domain, channel_id, LANE, amount
    )


# --------------------------------------------------------------------------------- lanes


def test_the_lane_is_signed(domain: VoucherDomain, verifier: VoucherVerifier) -> None:
    """A voucher for one lane does not verify as another lane's: the payer signed the lane."""
    voucher = sign_voucher(KEY, domain, CID, LANE, 500)
    assert voucher.lane == LANE
    moved = Voucher(CID, OTHER_LANE, 500, voucher.signature)
    assert recover_voucher_signer(domain, moved) != PAYER
    assert voucher_digest(domain, CID, LANE, 500) != voucher_digest(domain, CID, OTHER_LANE, 500)
    # the lane may be given in any case or as bytes: it is kept in checksum form
    assert Voucher(CID, LANE.lower(), 500, voucher.signature) == voucher
    assert sign_voucher(KEY, domain, CID, bytes.fromhex(LANE[2:]), 500) == voucher
    with pytest.raises(VoucherError, match="lane"):
        Voucher(CID, "0x1234", 500, voucher.signature)


def test_verifier_pins_the_lane_and_caps_it_by_the_deposit_left(
    domain: VoucherDomain, verifier: VoucherVerifier
) -> None:
    """Lane A took 300 and lane B 500 of a 1,000 deposit: B's next voucher can reach at most
    500 + (1,000 - 800) = 700, and a voucher naming lane A is refused where B meters."""
    lane_b = ChannelState(PAYER, 1_000, 800, lane=OTHER_LANE, lane_claimed=500)
    assert lane_b.lane_payable == 700
    assert verifier.verify(sign_voucher(KEY, domain, CID, OTHER_LANE, 650), lane_b, now=0) == 150
    assert verifier.verify(sign_voucher(KEY, domain, CID, OTHER_LANE, 9_000), lane_b, now=0) == 200
    with pytest.raises(VoucherNotNewerError):
        verifier.verify(sign_voucher(KEY, domain, CID, OTHER_LANE, 500), lane_b, now=0)
    with pytest.raises(VoucherLaneError):
        verifier.verify(sign_voucher(KEY, domain, CID, LANE, 650), lane_b, now=0)
    full = ChannelState(PAYER, 1_000, 1_000, lane=OTHER_LANE, lane_claimed=500)
    with pytest.raises(VoucherNotNewerError):
        verifier.verify(sign_voucher(KEY, domain, CID, OTHER_LANE, 650), full, now=0)
