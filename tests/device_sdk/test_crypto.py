"""AEAD payloads and ECIES-wrapped topic keys (blendsm.device_sdk._crypto), and the signed
key messages of _topic_keys, without a broker or a chain."""

from __future__ import annotations

import os

import pytest
from coincurve import PrivateKey

from blendsm.device_sdk._crypto import (
    SEALED_OVERHEAD,
    DecryptionError,
    check_public_key,
    new_topic_key,
    open_sealed,
    public_key_address,
    seal,
    sealed_epoch,
    unwrap_topic_key,
    wrap_topic_key,
)
from blendsm.device_sdk._keccak import keccak256
from blendsm.device_sdk._topic_keys import decode_key_message, encode_key_message
from blendsm.errors import ConfigError, WireError

TOPIC = "paid/temp"
TOPIC_ID = keccak256(TOPIC.encode())


def _party() -> tuple[bytes, bytes, str]:
    secret = os.urandom(32)
    public = PrivateKey(secret).public_key.format(compressed=False)
    return secret, public, public_key_address(public)


def test_seal_round_trip_and_layout() -> None:
    key = new_topic_key()
    blob = seal(key, 7, TOPIC, b"21.5 C")
    assert len(blob) == SEALED_OVERHEAD + len(b"21.5 C")
    assert sealed_epoch(blob) == 7
    assert b"21.5 C" not in blob
    assert open_sealed(key, TOPIC, blob) == b"21.5 C"
    assert open_sealed({7: key}.get, TOPIC, blob) == b"21.5 C"
    assert seal(key, 7, TOPIC, b"21.5 C") != blob  # fresh nonce each time


@pytest.mark.parametrize("index", [0, 5, 20, -1])
def test_any_altered_byte_is_refused(index: int) -> None:
    key = new_topic_key()
    blob = bytearray(seal(key, 1, TOPIC, b"reading"))
    blob[index] ^= 0x01
    with pytest.raises(DecryptionError):
        open_sealed({1: key, 0: key, 2**24 + 1: key}.get, TOPIC, bytes(blob))


def test_wrong_topic_epoch_or_key_is_refused() -> None:
    key = new_topic_key()
    blob = seal(key, 3, TOPIC, b"reading")
    with pytest.raises(DecryptionError):
        open_sealed(key, "paid/other", blob)  # AAD binds the topic
    relabelled = (4).to_bytes(4, "big") + blob[4:]
    with pytest.raises(DecryptionError):
        open_sealed(key, TOPIC, relabelled)  # AAD binds the epoch
    with pytest.raises(DecryptionError, match="no key for epoch 3"):
        open_sealed({1: key}.get, TOPIC, blob)
    with pytest.raises(DecryptionError):
        open_sealed(new_topic_key(), TOPIC, blob)
    with pytest.raises(DecryptionError, match="too short"):
        open_sealed(key, TOPIC, blob[:10])
    assert issubclass(DecryptionError, WireError)


def test_seal_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        seal(b"short", 1, TOPIC, b"x")
    with pytest.raises(ConfigError):
        seal(new_topic_key(), -1, TOPIC, b"x")
    with pytest.raises(ConfigError):
        seal(new_topic_key(), 2**32, TOPIC, b"x")


def test_wrap_unwrap_round_trip() -> None:
    secret, public, address = _party()
    key = new_topic_key()
    checked = check_public_key(public, address)
    blob = wrap_topic_key(checked, TOPIC_ID, 9, key)
    assert key not in blob
    assert unwrap_topic_key(secret, blob) == (TOPIC_ID, 9, key)
    assert check_public_key(public[1:], address) == public  # 64-byte form accepted
    compressed = PrivateKey(secret).public_key.format(compressed=True)
    assert check_public_key(compressed, address.lower()) == public


def test_unwrap_with_another_key_or_altered_blob_fails() -> None:
    _secret, public, _address = _party()
    other_secret, _, _ = _party()
    blob = wrap_topic_key(public, TOPIC_ID, 1, new_topic_key())
    with pytest.raises(DecryptionError):
        unwrap_topic_key(other_secret, blob)
    altered = bytearray(blob)
    altered[-1] ^= 1
    with pytest.raises(DecryptionError):
        unwrap_topic_key(_secret, bytes(altered))


def test_public_key_not_of_the_address_is_refused() -> None:
    _, public, _ = _party()
    _, _, other_address = _party()
    with pytest.raises(ConfigError, match="refusing to wrap"):
        check_public_key(public, other_address)
    with pytest.raises(ConfigError):
        check_public_key(b"\x04" + bytes(64), other_address)


def test_key_message_is_signed_by_the_seller_and_bound_to_topic_and_recipient() -> None:
    seller_secret, _, seller = _party()
    secret, public, address = _party()
    key = new_topic_key()
    message = encode_key_message(seller_secret, TOPIC_ID, address, public, 4, key)
    assert decode_key_message(secret, address, seller, TOPIC_ID, message) == (4, key)
    _, _, impostor = _party()
    with pytest.raises(DecryptionError, match="not by the seller"):
        decode_key_message(secret, address, impostor, TOPIC_ID, message)
    with pytest.raises(DecryptionError):  # replayed on another topic's key topic
        decode_key_message(secret, address, seller, keccak256(b"paid/other"), message)
    with pytest.raises(ConfigError):  # the public key is checked against the recipient
        encode_key_message(seller_secret, TOPIC_ID, seller, public, 4, key)


def test_keyring_accepts_signed_keys_keeps_epochs_and_never_seals_without_a_key() -> None:
    from blendsm.device_sdk._control import key_topic
    from blendsm.device_sdk._topic_keys import NoTopicKeyError, TopicKeyring

    seller_secret, _, seller = _party()
    secret, public, address = _party()
    ring = TopicKeyring(
        secret, topics={TOPIC: seller}, host="127.0.0.1", port=1883, broker=seller, chain_id=1
    )
    with pytest.raises(NoTopicKeyError):
        ring.encryptor(TOPIC, b"reading")  # nothing leaves in clear
    mine = key_topic(TOPIC_ID, address)
    k1, k2 = new_topic_key(), new_topic_key()
    assert (
        ring.accept(mine, encode_key_message(seller_secret, TOPIC_ID, address, public, 1, k1)) == 1
    )
    old = ring.encryptor(TOPIC, b"one")
    assert (
        ring.accept(mine, encode_key_message(seller_secret, TOPIC_ID, address, public, 2, k2)) == 2
    )
    assert sealed_epoch(ring.encryptor(TOPIC, b"two")) == 2
    assert ring.decrypt(TOPIC, old) == b"one"
    assert ring.accept(mine, b"") is None  # cleared: no current key, old epochs still readable
    assert ring.epoch(TOPIC) is None
    assert ring.epochs(TOPIC) == [1, 2]
    with pytest.raises(NoTopicKeyError):
        ring.encryptor(TOPIC, b"three")
    with pytest.raises(ConfigError):  # someone else's key topic
        ring.accept(key_topic(TOPIC_ID, seller), b"")


@pytest.mark.parametrize("kind", [0, 1, 2])
async def test_sender_public_key_is_recovered_from_a_signed_transaction(kind: int) -> None:
    from types import SimpleNamespace
    from typing import Any

    from eth_account import Account

    from blendsm.device_sdk._topic_key_service import sender_public_key

    secret, public, address = _party()
    tx: dict[str, Any] = {
        "nonce": 3,
        "gas": 90_000,
        "to": "0x" + "11" * 20,
        "value": 5,
        "data": b"\x01\x02",
        "chainId": 31337,
    }
    if kind == 0:
        tx["gasPrice"] = 10**9
    elif kind == 1:
        tx |= {"type": 1, "gasPrice": 10**9, "accessList": []}
    else:
        tx |= {"type": 2, "maxFeePerGas": 2 * 10**9, "maxPriorityFeePerGas": 10**9}
    signed = Account.sign_transaction(tx, secret)
    as_node = {k: v for k, v in tx.items() if k != "data"} | {
        "input": tx["data"],
        "from": address,
        "type": kind,
        "v": signed.v,
        "r": signed.r,
        "s": signed.s,
    }
    if kind:
        as_node |= {"yParity": signed.v, "accessList": []}

    async def get_transaction(_hash: bytes) -> dict[str, Any]:
        return as_node

    w3 = SimpleNamespace(eth=SimpleNamespace(get_transaction=get_transaction))
    assert await sender_public_key(w3, bytes(32), address) == public
    _, _, other = _party()
    with pytest.raises(ConfigError, match="recovered"):
        await sender_public_key(w3, bytes(32), other)
