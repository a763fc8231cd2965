"""CONNECT password tokens: agreement with eth_account, every refusal, the replay cache."""

from __future__ import annotations

import time

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.device_sdk import (
    CONNECT_TOKEN_MAX_LENGTH,
    ConnectToken,
    ConnectTokenSigner,
    ConnectTokenVerifier,
    connect_digest,
    connect_typed_data,
    high_s_twin,
    parse_connect_token,
)
from blendsm.errors import ConfigError, ConnectTokenError, WireError

CHAIN_ID = 1337
KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
OTHER_KEY = bytes.fromhex("11" * 32)
BROKER = Account.from_key(bytes.fromhex("22" * 32)).address
OTHER_BROKER = Account.from_key(bytes.fromhex("33" * 32)).address
NOW = 1_800_000_000
CLIENT = "sensor-7"


@pytest.fixture
def signer() -> ConnectTokenSigner:
    return ConnectTokenSigner(KEY, CHAIN_ID, BROKER)


@pytest.fixture
def verifier() -> ConnectTokenVerifier:
    return ConnectTokenVerifier(CHAIN_ID, BROKER)


def test_error_is_a_wire_error() -> None:
    assert issubclass(ConnectTokenError, WireError)
    assert issubclass(ConnectTokenError, ValueError)


def test_round_trip(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT, now=NOW)
    assert signer.address == Account.from_key(KEY).address
    assert verifier.verify(signer.address, CLIENT, token, NOW) == signer.address
    assert verifier.cached() == 1


def test_bytes_password_and_lowercase_username(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier
) -> None:
    token = signer.token(CLIENT, now=NOW)
    assert verifier.verify(signer.address.lower(), CLIENT, token.encode(), NOW) == signer.address


def test_uppercase_hex_accepted(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    prefix, issued, nonce, sig = signer.token(CLIENT, now=NOW).split(".")
    token = f"{prefix}.{issued}.{nonce.upper()}.{sig.upper()}"
    assert verifier.verify(signer.address, CLIENT, token, NOW) == signer.address


def test_token_format(signer: ConnectTokenSigner) -> None:
    token = signer.token(CLIENT, now=NOW)
    prefix, issued, nonce, sig = token.split(".")
    assert (prefix, issued, len(nonce), len(sig)) == ("bsm1", str(NOW), 32, 130)
    assert token.isascii()
    parsed = parse_connect_token(token)
    assert parsed.encode() == token
    assert parsed.signature[64] in (27, 28)


def test_default_now_uses_clock(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT)
    assert verifier.verify(signer.address, CLIENT, token, time.time()) == signer.address


def test_nonces_differ(signer: ConnectTokenSigner) -> None:
    tokens = {parse_connect_token(signer.token(CLIENT, now=NOW)).nonce for _ in range(20)}
    assert len(tokens) == 20


@pytest.mark.parametrize("client_id", ["sensor-7", "ü-ñ-中文", "x" * 1000])
def test_matches_eth_account(client_id: str) -> None:
    signer = ConnectTokenSigner(KEY, CHAIN_ID, BROKER)
    parsed = parse_connect_token(signer.token(client_id, now=NOW))
    typed = connect_typed_data(CHAIN_ID, BROKER, client_id, parsed.issued_at, parsed.nonce)
    signable = encode_typed_data(full_message=typed)
    ours = connect_digest(CHAIN_ID, BROKER, client_id, parsed.issued_at, parsed.nonce)
    assert keccak(b"\x19" + signable.version + signable.header + signable.body) == ours
    # Same deterministic (RFC 6979) signature as eth_account, and it recovers the same.
    theirs = Account.sign_message(signable, KEY)
    assert bytes(theirs.signature) == parsed.signature
    assert Account.recover_message(signable, signature=parsed.signature) == signer.address


def test_wallet_signed_token_verifies(verifier: ConnectTokenVerifier) -> None:
    """A token built from a wallet's eth_signTypedData_v4 output is accepted."""
    nonce = bytes(range(16))
    typed = connect_typed_data(CHAIN_ID, BROKER, CLIENT, NOW, nonce)
    signed = Account.sign_message(encode_typed_data(full_message=typed), KEY)
    token = ConnectToken(NOW, nonce, bytes(signed.signature)).encode()
    assert verifier.verify(Account.from_key(KEY).address, CLIENT, token, NOW + 3)


def _refused(verifier: ConnectTokenVerifier, *args: object, match: str) -> None:
    with pytest.raises(ConnectTokenError, match=match):
        verifier.verify(*args)  # type: ignore[arg-type]


def test_wrong_broker(signer: ConnectTokenSigner) -> None:
    other = ConnectTokenVerifier(CHAIN_ID, OTHER_BROKER)
    _refused(other, signer.address, CLIENT, signer.token(CLIENT, now=NOW), NOW, match="does not")


def test_wrong_chain_id(signer: ConnectTokenSigner) -> None:
    other = ConnectTokenVerifier(CHAIN_ID + 1, BROKER)
    _refused(other, signer.address, CLIENT, signer.token(CLIENT, now=NOW), NOW, match="does not")


def test_wrong_client_id(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT, now=NOW)
    _refused(verifier, signer.address, "sensor-8", token, NOW, match="does not match")


def test_other_address_as_username(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier
) -> None:
    other = ConnectTokenSigner(OTHER_KEY, CHAIN_ID, BROKER).address
    _refused(verifier, other, CLIENT, signer.token(CLIENT, now=NOW), NOW, match="does not match")


@pytest.mark.parametrize(
    "username",
    [None, "", "alice", "0x" + "0" * 39, "0x" + "g" * 40, " 0x" + "1" * 40, 12],
)
def test_bad_username(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier, username: object
) -> None:
    _refused(verifier, username, CLIENT, signer.token(CLIENT, now=NOW), NOW, match="username")


def test_bad_checksum_username(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    address = signer.address
    flipped = address[:2] + "".join(c.swapcase() if c.isalpha() else c for c in address[2:])
    token = signer.token(CLIENT, now=NOW)
    _refused(verifier, flipped, CLIENT, token, NOW, match="EIP-55")


def test_expired(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT, now=NOW)
    _refused(verifier, signer.address, CLIENT, token, NOW + 60.001, match="expired")
    assert verifier.verify(signer.address, CLIENT, token, NOW + 60) == signer.address


def test_from_the_future(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT, now=NOW)
    _refused(verifier, signer.address, CLIENT, token, NOW - 5.5, match="future")
    assert verifier.verify(signer.address, CLIENT, token, NOW - 5) == signer.address


def test_replay_refused(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    token = signer.token(CLIENT, now=NOW)
    verifier.verify(signer.address, CLIENT, token, NOW)
    _refused(verifier, signer.address, CLIENT, token, NOW + 1, match="replayed")
    # Case changes in the hex do not make it a new token.
    prefix, issued, nonce, sig = token.split(".")
    _refused(
        verifier,
        signer.address,
        CLIENT,
        f"{prefix}.{issued}.{nonce.upper()}.{sig}",
        NOW,
        match="replayed",
    )


def test_high_s_twin_refused(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    parsed = parse_connect_token(signer.token(CLIENT, now=NOW))
    twin = ConnectToken(parsed.issued_at, parsed.nonce, high_s_twin(parsed.signature)).encode()
    _refused(verifier, signer.address, CLIENT, twin, NOW, match="bad signature")


def test_bad_v_refused(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    parsed = parse_connect_token(signer.token(CLIENT, now=NOW))
    bad = ConnectToken(parsed.issued_at, parsed.nonce, parsed.signature[:64] + b"\x00").encode()
    _refused(verifier, signer.address, CLIENT, bad, NOW, match="bad signature")


def test_tampered_nonce_refused(signer: ConnectTokenSigner, verifier: ConnectTokenVerifier) -> None:
    parsed = parse_connect_token(signer.token(CLIENT, now=NOW))
    bad = ConnectToken(parsed.issued_at, bytes(16), parsed.signature).encode()
    _refused(verifier, signer.address, CLIENT, bad, NOW, match="does not match")


def test_replay_allowed_for_different_nonce(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier
) -> None:
    for _ in range(3):
        assert verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW), NOW)
    assert verifier.cached() == 3


def test_same_nonce_other_address_is_independent(verifier: ConnectTokenVerifier) -> None:
    nonce = bytes(16)
    for key in (KEY, OTHER_KEY):
        typed = connect_typed_data(CHAIN_ID, BROKER, CLIENT, NOW, nonce)
        signed = Account.sign_message(encode_typed_data(full_message=typed), key)
        token = ConnectToken(NOW, nonce, bytes(signed.signature)).encode()
        verifier.verify(Account.from_key(key).address, CLIENT, token, NOW)
    assert verifier.cached() == 2


def test_cache_full_fails_closed(signer: ConnectTokenSigner) -> None:
    verifier = ConnectTokenVerifier(CHAIN_ID, BROKER, max_cached=3)
    for _ in range(3):
        verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW), NOW)
    token = signer.token(CLIENT, now=NOW + 10)
    # At NOW + 60 the first three are still replayable, so nothing is evicted.
    _refused(verifier, signer.address, CLIENT, token, NOW + 60, match="cache full")
    assert verifier.cached() == 3
    # Once they expire the refused (never cached) token is accepted.
    assert verifier.verify(signer.address, CLIENT, token, NOW + 61) == signer.address
    assert verifier.cached() == 1


def test_expiry_frees_cache(signer: ConnectTokenSigner) -> None:
    verifier = ConnectTokenVerifier(CHAIN_ID, BROKER, validity=10, max_cached=2)
    early = signer.token(CLIENT, now=NOW)
    verifier.verify(signer.address, CLIENT, early, NOW)
    verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW + 5), NOW + 5)
    assert verifier.cached() == 2
    # At NOW + 11 the first entry (expiry NOW + 10) is dropped, the second (NOW + 15) kept.
    verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW + 11), NOW + 11)
    assert verifier.cached() == 2
    _refused(verifier, signer.address, CLIENT, early, NOW + 11, match="expired")
    verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW + 100), NOW + 100)
    assert verifier.cached() == 1


def test_refused_tokens_never_enter_cache(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier
) -> None:
    token = signer.token(CLIENT, now=NOW)
    for args in ((OTHER_BROKER, CLIENT, token, NOW), (signer.address, "x", token, NOW)):
        with pytest.raises(ConnectTokenError):
            verifier.verify(*args)
    assert verifier.cached() == 0


GOOD = "bsm1.1800000000." + "ab" * 16 + "." + "cd" * 65


@pytest.mark.parametrize(
    ("password", "match"),
    [
        (None, "no password"),
        (12, "str or bytes"),
        ("", "4 dot-separated"),
        (GOOD + ".", "4 dot-separated"),
        (GOOD.replace("bsm1.", "bsm1.."), "4 dot-separated|too long"),
        ("bsm2" + GOOD[4:], "start with"),
        ("BSM1" + GOOD[4:], "start with"),
        (GOOD.replace("1800000000", "+1800000000"), "issuedAt"),
        (GOOD.replace("1800000000", "01800000000"), "issuedAt"),
        (GOOD.replace("1800000000", "1_800_000"), "issuedAt"),
        (GOOD.replace("1800000000", "-1"), "issuedAt"),
        (GOOD.replace("1800000000", "١٨٠"), "issuedAt"),
        (GOOD.replace("1800000000", ""), "issuedAt"),
        (GOOD.replace("1800000000", "18446744073709551616"), "uint64"),
        (GOOD.replace("ab" * 16, "ab" * 15), "nonce"),
        (GOOD.replace("ab" * 16, "ab" * 15 + "zz"), "nonce"),
        (GOOD.replace("ab" * 16, "0x" + "ab" * 15), "nonce"),
        (GOOD[:-2], "signature"),
        (GOOD[:-2] + "g0", "signature"),
        (" " + GOOD[:-1], "start with"),
        (GOOD[:-1] + "\n", "signature"),
        (GOOD + "0", "signature"),
        ("x" * (CONNECT_TOKEN_MAX_LENGTH + 1), "too long"),
        (b"x" * (CONNECT_TOKEN_MAX_LENGTH + 1), "too long"),
        (GOOD.encode()[:-1] + b"\xff", "ASCII"),
    ],
)
def test_malformed(password: object, match: str) -> None:
    with pytest.raises(ConnectTokenError, match=match):
        parse_connect_token(password)  # type: ignore[arg-type]


def test_max_length_is_tight() -> None:
    longest = ConnectToken(2**64 - 1, bytes(16), bytes(65)).encode()
    assert len(longest) == CONNECT_TOKEN_MAX_LENGTH
    assert parse_connect_token(longest).issued_at == 2**64 - 1


@settings(max_examples=300, deadline=None)
@given(
    username=st.one_of(st.none(), st.text(max_size=50)),
    client_id=st.one_of(st.text(max_size=30), st.just(CLIENT)),
    password=st.one_of(
        st.none(),
        st.text(max_size=250),
        st.binary(max_size=250),
        st.builds(
            lambda n, a, b, c: f"bsm1.{n}.{a}.{b}{c}",
            st.integers(min_value=-5, max_value=2**65),
            st.text("0123456789abcdefABCDEF", min_size=30, max_size=34),
            st.text("0123456789abcdef", min_size=128, max_size=132),
            st.text(max_size=3),
        ),
    ),
    now=st.floats(allow_nan=False, allow_infinity=False),
)
def test_random_input_only_raises_connect_token_error(
    username: str | None, client_id: str, password: str | bytes | None, now: float
) -> None:
    """No random input carries a valid signature: every one is refused, and only ever with
    ConnectTokenError."""
    verifier = ConnectTokenVerifier(CHAIN_ID, BROKER)
    with pytest.raises(ConnectTokenError):
        verifier.verify(username, client_id, password, now)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=CONNECT_TOKEN_MAX_LENGTH - 20, max_size=CONNECT_TOKEN_MAX_LENGTH))
def test_random_bytes_into_valid_shape(data: bytes) -> None:
    """Flipped bytes in a real token: accepted only if they still spell the same token (hex
    may change case), otherwise refused with ConnectTokenError."""
    signer = ConnectTokenSigner(KEY, CHAIN_ID, BROKER)
    original = signer.token(CLIENT, now=NOW)
    token = bytearray(original.encode())
    for i, b in enumerate(data[:8]):
        token[(b * 7 + i) % len(token)] = data[-1 - i]
    try:
        same = parse_connect_token(bytes(token)) == parse_connect_token(original)
    except ConnectTokenError:
        same = False
    verifier = ConnectTokenVerifier(CHAIN_ID, BROKER)
    if same:
        assert verifier.verify(signer.address, CLIENT, bytes(token), NOW) == signer.address
    else:
        with pytest.raises(ConnectTokenError):
            verifier.verify(signer.address, CLIENT, bytes(token), NOW)


@settings(max_examples=200, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.sampled_from("0123456789abcdefABCDEF")),
        min_size=1,
        max_size=3,
    )
)
def test_tampered_digits_are_refused(edits: list[tuple[int, str]]) -> None:
    """Digits of a real token changed to other digits, so it still parses: the verifier
    must refuse every changed value (issuedAt, nonce, r, s, v), not just malformed text."""
    signer = ConnectTokenSigner(KEY, CHAIN_ID, BROKER)
    original = signer.token(CLIENT, now=NOW)
    chars = list(original)
    digits = [i for i, c in enumerate(chars) if i > len("bsm1.") and c != "."]
    for where, digit in edits:
        chars[digits[where % len(digits)]] = digit
    tampered = "".join(chars)
    try:
        same = parse_connect_token(tampered) == parse_connect_token(original)
    except ConnectTokenError:
        same = False
    verifier = ConnectTokenVerifier(CHAIN_ID, BROKER)
    if same:  # only the case of hex digits changed
        assert verifier.verify(signer.address, CLIENT, tampered, NOW) == signer.address
    else:
        with pytest.raises(ConnectTokenError):
            verifier.verify(signer.address, CLIENT, tampered, NOW)


@pytest.mark.parametrize(
    "kwargs",
    [{"validity": 0}, {"clock_skew": -1}, {"max_cached": 0}, {"validity": True}, {"validity": 1.5}],
)
def test_verifier_config_checked(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ConnectTokenVerifier(CHAIN_ID, BROKER, **kwargs)  # type: ignore[arg-type]


def test_signer_config_checked() -> None:
    with pytest.raises(ConfigError, match="private_key"):
        ConnectTokenSigner(bytes(32), CHAIN_ID, BROKER)
    with pytest.raises(ConfigError, match="broker"):
        ConnectTokenSigner(KEY, CHAIN_ID, "0x1234")
    with pytest.raises(ConfigError, match="chain_id"):
        ConnectTokenSigner(KEY, -1, BROKER)
    signer = ConnectTokenSigner(KEY, CHAIN_ID, BROKER.lower())
    assert signer.broker == BROKER
    with pytest.raises(ConfigError, match="client_id"):
        signer.token("", now=NOW)
    with pytest.raises(ConfigError, match="issued_at"):
        signer.token(CLIENT, now=-1)


def test_non_finite_now_is_a_caller_bug(
    signer: ConnectTokenSigner, verifier: ConnectTokenVerifier
) -> None:
    with pytest.raises(ConfigError, match="now"):
        verifier.verify(signer.address, CLIENT, signer.token(CLIENT, now=NOW), float("nan"))
