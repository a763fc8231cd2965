"""Signed message envelopes: round trip, tamper detection, EIP-712 equality with eth_account."""

from __future__ import annotations

import dataclasses

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given
from hypothesis import strategies as st

from blendsm.device_sdk import (
    ENVELOPE_HEADER_SIZE,
    FLAG_ENCRYPTED,
    Envelope,
    EnvelopeSigner,
    MessageDomain,
    decode_envelope,
    message_leaf,
    message_typed_data,
    verify_envelope,
)
from blendsm.errors import EnvelopeError

KEY = bytes(range(1, 33))  # TEST ONLY
OTHER = bytes(range(2, 34))  # TEST ONLY
DOMAIN = MessageDomain(31337, "0x" + "11" * 20)


def test_round_trip_and_fixed_overhead() -> None:
    signer = EnvelopeSigner(KEY, DOMAIN)
    env = signer.sign("sensors/t", b"\x00\xff" * 32, 7, 1_700_000_000_123)
    wire = env.encode()
    assert len(wire) == ENVELOPE_HEADER_SIZE + 64 == 167
    assert decode_envelope(wire) == env
    assert verify_envelope(DOMAIN, "sensors/t", env) == Account.from_key(KEY).address


def test_digest_equals_eth_account_typed_data() -> None:
    signer = EnvelopeSigner(KEY, DOMAIN)
    env = signer.sign("a/b", b"payload", 1, 2, FLAG_ENCRYPTED)
    typed = message_typed_data(DOMAIN, "a/b", signer.address, 1, 2, b"payload", FLAG_ENCRYPTED)
    signed = Account.sign_message(encode_typed_data(full_message=typed), KEY)
    assert bytes(signed.signature) == env.signature


@pytest.mark.parametrize(
    "change",
    [
        {"payload": b"payloae"},
        {"sequence": 2},
        {"timestamp_ms": 3},
        {"flags": FLAG_ENCRYPTED},
        {"device": bytes(20)},
    ],
)
def test_any_altered_field_is_detected(change: dict[str, object]) -> None:
    env = EnvelopeSigner(KEY, DOMAIN).sign("a/b", b"payload", 1, 2)
    with pytest.raises(EnvelopeError):
        verify_envelope(DOMAIN, "a/b", dataclasses.replace(env, **change))  # type: ignore[arg-type]


def test_other_topic_domain_or_key_is_detected() -> None:
    env = EnvelopeSigner(KEY, DOMAIN).sign("a/b", b"p", 1, 2)
    with pytest.raises(EnvelopeError):
        verify_envelope(DOMAIN, "a/c", env)
    with pytest.raises(EnvelopeError):
        verify_envelope(MessageDomain(1, "0x" + "11" * 20), "a/b", env)
    forged = EnvelopeSigner(OTHER, DOMAIN).sign("a/b", b"p", 1, 2)
    with pytest.raises(EnvelopeError):
        verify_envelope(DOMAIN, "a/b", dataclasses.replace(forged, device=env.device))


@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_never_crashes(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except EnvelopeError:
        return
    assert isinstance(env, Envelope)
    with pytest.raises(EnvelopeError):
        verify_envelope(DOMAIN, "a/b", env)


def test_leaf_binds_the_signature() -> None:
    env = EnvelopeSigner(KEY, DOMAIN).sign("a/b", b"p", 1, 2)
    assert message_leaf(DOMAIN, "a/b", env) != message_leaf(DOMAIN, "a/c", env)
    other = dataclasses.replace(
        env, signature=env.signature[:-1] + bytes((55 - env.signature[-1],))
    )
    assert message_leaf(DOMAIN, "a/b", env) != message_leaf(DOMAIN, "a/b", other)


def test_verify_with_leaf_matches_the_separate_calls() -> None:
    from blendsm.device_sdk._envelope import verify_envelope_leaf

    env = EnvelopeSigner(KEY, DOMAIN).sign("a/b", b"p", 1, 2)
    assert verify_envelope_leaf(DOMAIN, "a/b", env) == (
        verify_envelope(DOMAIN, "a/b", env),
        message_leaf(DOMAIN, "a/b", env),
    )
    with pytest.raises(EnvelopeError):
        verify_envelope_leaf(DOMAIN, "a/c", env)
