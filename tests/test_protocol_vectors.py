"""Wire-protocol test vectors (docs/protocol-vectors.json), recomputed with our own code.

The JSON file is what a client in another language checks itself against (see
docs/protocol.md). This test rebuilds every vector from the fixed TEST-ONLY inputs below
with the SDK and asserts equality with the file, so the vectors can never drift from the
code; EIP-712 digests and signatures are also cross-checked with eth_account.

Regenerate after a deliberate protocol change with::

    python tests/test_protocol_vectors.py > docs/protocol-vectors.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey, PublicKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_typed_data

from blendsm.device_sdk import (
    AAD_LABEL,
    ANCHORS_TOPIC,
    CONNECT_DOMAIN_TYPEHASH,
    CONNECT_TYPEHASH,
    EIP712_DOMAIN_TYPEHASH,
    MESSAGE_TYPEHASH,
    NOTICE,
    PROOF,
    RESUME,
    VOUCHER,
    VOUCHER_TYPEHASH,
    AnchorNotice,
    ConnectToken,
    ConnectTokenVerifier,
    EnvelopeSigner,
    MerkleTree,
    MessageDomain,
    PaymentRequest,
    Proof,
    ProofRequest,
    Quote,
    Receipt,
    Refusal,
    Resumed,
    ResumeRequest,
    Unserved,
    VoucherDomain,
    VoucherSigner,
    checksum_address,
    connect_digest,
    connect_typed_data,
    control_topic,
    decode_anchor_notice,
    decode_any_notice,
    decode_envelope,
    decode_key_message,
    decode_proof_request,
    decode_resume_request,
    decode_resumed,
    decode_voucher,
    encode_anchor_notice,
    encode_notice,
    encode_proof_request,
    encode_resume_request,
    encode_resumed,
    encode_voucher,
    hash_pair,
    keccak256,
    key_topic,
    leaf_hash,
    message_leaf,
    message_typed_data,
    open_sealed,
    parse_connect_token,
    recover_voucher_signer,
    topic_id_of,
    unwrap_topic_key,
    verify_envelope,
    verify_proof,
    voucher_typed_data,
)

VECTORS_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol-vectors.json"

# ----------------------------------------------------------------------- fixed inputs
# TEST-ONLY keys: keccak256 of a public label. Anyone can recompute them; never fund them.
KEY_LABELS = {
    "broker": "blendsm test-only key: broker",
    "payer": "blendsm test-only key: payer",
    "device": "blendsm test-only key: device",
    "seller": "blendsm test-only key: seller",
    "ecies_ephemeral": "blendsm test-only key: ecies ephemeral",
}
KEYS = {name: keccak256(label.encode()) for name, label in KEY_LABELS.items()}
CHAIN_ID = 31337
PAYMENT_CHANNELS = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
REGISTRY = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512"
TOPIC = "sensors/berlin/temperature"
CLIENT_ID = "vector-client-1"
ISSUED_AT = 1_700_000_000
CONNECT_NONCE = bytes(range(16))
CHANNEL_ID = keccak256(b"blendsm test-only channel")
CUMULATIVE_AMOUNT = 123_456_789_000_000_000_000
TIMESTAMP_MS = 1_700_000_000_123
PAYLOADS = [b'{"t":21.5}', b'{"t":21.6}', b'{"t":21.7}', b'{"t":21.8}']
TOPIC_KEY = bytes(range(0x20, 0x40))
EPOCH = 7
SEAL_NONCE = bytes(range(0xA0, 0xAC))
ECIES_NONCE = bytes(range(0xC0, 0xD0))


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _address(private_key: bytes) -> str:
    public = PrivateKey(private_key).public_key.format(compressed=False)
    return checksum_address(keccak256(public[1:])[12:])


def _sign(private_key: bytes, digest: bytes) -> bytes:
    rs_recid = PrivateKey(private_key).sign_recoverable(digest, hasher=None)
    return rs_recid[:64] + bytes((rs_recid[64] + 27,))


def _ecies_wrap(recipient_public: bytes, plain: bytes) -> bytes:
    """eciespy's format, rebuilt with a fixed ephemeral key and nonce (deterministic)."""
    ephemeral = PrivateKey(KEYS["ecies_ephemeral"])
    ephemeral_public = ephemeral.public_key.format(compressed=False)
    shared = PublicKey(recipient_public).multiply(ephemeral.secret).format(compressed=False)
    sym_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"").derive(ephemeral_public + shared)
    sealed = AESGCM(sym_key).encrypt(ECIES_NONCE, plain, None)  # ciphertext || tag
    return ephemeral_public + ECIES_NONCE + sealed[-16:] + sealed[:-16]


def build_vectors() -> dict[str, Any]:
    addresses = {name: _address(key) for name, key in KEYS.items()}
    vectors: dict[str, Any] = {
        "_comment": (
            "BlendSM wire-protocol test vectors, see docs/protocol.md. Every private key here"
            " is TEST-ONLY (keccak256 of the public label): never use or fund them. Generated"
            " and checked by tests/test_protocol_vectors.py."
        ),
        "keys": {
            name: {
                "label": KEY_LABELS[name],
                "private_key": _hex(KEYS[name]),
                "address": addresses[name],
                "public_key": _hex(PrivateKey(KEYS[name]).public_key.format(compressed=False)),
            }
            for name in KEYS
        },
        "chain_id": CHAIN_ID,
        "contracts": {
            "PaymentChannels": checksum_address(bytes.fromhex(PAYMENT_CHANNELS[2:])),
            "Registry": checksum_address(bytes.fromhex(REGISTRY[2:])),
        },
        "typehashes": {
            "EIP712Domain(string name,string version,uint256 chainId)": _hex(
                CONNECT_DOMAIN_TYPEHASH
            ),
            "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)": (
                _hex(EIP712_DOMAIN_TYPEHASH)
            ),
            "Connect(address broker,string clientId,uint64 issuedAt,bytes16 nonce)": _hex(
                CONNECT_TYPEHASH
            ),
            "Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)": _hex(
                VOUCHER_TYPEHASH
            ),
            "Message(bytes32 topicHash,address device,uint64 sequence,uint64 timestamp,"
            "bytes32 payloadHash,uint8 flags)": _hex(MESSAGE_TYPEHASH),
        },
    }

    # CONNECT token: the payer connects to the broker.
    broker_address = addresses["broker"]
    separator = keccak256(
        CONNECT_DOMAIN_TYPEHASH
        + keccak256(b"BlendSM Broker")
        + keccak256(b"1")
        + CHAIN_ID.to_bytes(32, "big")
    )
    struct_hash = keccak256(
        CONNECT_TYPEHASH
        + bytes(12)
        + bytes.fromhex(broker_address[2:])
        + keccak256(CLIENT_ID.encode())
        + ISSUED_AT.to_bytes(32, "big")
        + CONNECT_NONCE
        + bytes(16)
    )
    digest = connect_digest(CHAIN_ID, broker_address, CLIENT_ID, ISSUED_AT, CONNECT_NONCE)
    assert digest == keccak256(b"\x19\x01" + separator + struct_hash)
    signature = _sign(KEYS["payer"], digest)
    vectors["connect_token"] = {
        "inputs": {
            "signer": "payer",
            "chain_id": CHAIN_ID,
            "broker": broker_address,
            "client_id": CLIENT_ID,
            "issued_at": ISSUED_AT,
            "nonce": _hex(CONNECT_NONCE),
        },
        "username": addresses["payer"],
        "domain_separator": _hex(separator),
        "struct_hash": _hex(struct_hash),
        "digest": _hex(digest),
        "signature": _hex(signature),
        "token": ConnectToken(ISSUED_AT, CONNECT_NONCE, signature).encode(),
    }

    # Voucher: the payer pays the broker's lane of a channel of the PaymentChannels contract.
    voucher_domain = VoucherDomain(CHAIN_ID, PAYMENT_CHANNELS)
    lane = broker_address
    voucher = VoucherSigner(KEYS["payer"], voucher_domain).sign(CHANNEL_ID, lane, CUMULATIVE_AMOUNT)
    vectors["voucher"] = {
        "inputs": {
            "signer": "payer",
            "chain_id": CHAIN_ID,
            "verifying_contract": voucher_domain.verifying_contract,
            "channel_id": _hex(CHANNEL_ID),
            "lane": lane,
            "cumulative_amount": str(CUMULATIVE_AMOUNT),
        },
        "domain_separator": _hex(voucher_domain.separator),
        "struct_hash": _hex(
            keccak256(
                VOUCHER_TYPEHASH
                + CHANNEL_ID
                + bytes(12)
                + bytes.fromhex(lane[2:])
                + CUMULATIVE_AMOUNT.to_bytes(32, "big")
            )
        ),
        "digest": _hex(voucher_domain.digest(CHANNEL_ID, lane, CUMULATIVE_AMOUNT)),
        "signature": _hex(voucher.signature),
    }

    # Envelopes: four plaintext messages of the device on TOPIC, then one encrypted.
    message_domain = MessageDomain(CHAIN_ID, REGISTRY)
    device = EnvelopeSigner(KEYS["device"], message_domain)
    envelopes = []
    leaves = []
    for sequence, payload in enumerate(PAYLOADS, start=1):
        envelope = device.sign(TOPIC, payload, sequence, TIMESTAMP_MS + sequence - 1)
        digest = message_domain.digest(
            TOPIC, device.device, envelope.sequence, envelope.timestamp_ms, payload, 0
        )
        leaf = message_leaf(message_domain, TOPIC, envelope)
        leaves.append(leaf)
        envelopes.append(
            {
                "inputs": {
                    "signer": "device",
                    "topic": TOPIC,
                    "sequence": envelope.sequence,
                    "timestamp_ms": envelope.timestamp_ms,
                    "flags": 0,
                    "payload": _hex(payload),
                },
                "struct_hash": _hex(
                    keccak256(
                        MESSAGE_TYPEHASH
                        + keccak256(TOPIC.encode())
                        + bytes(12)
                        + device.device
                        + envelope.sequence.to_bytes(32, "big")
                        + envelope.timestamp_ms.to_bytes(32, "big")
                        + keccak256(payload)
                        + bytes(32)
                    )
                ),
                "digest": _hex(digest),
                "signature": _hex(envelope.signature),
                "wire": _hex(envelope.encode()),
                "leaf": _hex(leaf),
            }
        )

    # Sealed payload (fixed nonce for the vector; real senders draw a random one).
    aad = AAD_LABEL + TOPIC.encode() + EPOCH.to_bytes(4, "big")
    plaintext = b'{"t":22.0}'
    sealed = (
        EPOCH.to_bytes(4, "big")
        + SEAL_NONCE
        + AESGCM(TOPIC_KEY).encrypt(SEAL_NONCE, plaintext, aad)
    )
    encrypted = device.sign(TOPIC, sealed, 5, TIMESTAMP_MS + 4, flags=1)
    vectors["sealed_payload"] = {
        "inputs": {
            "topic": TOPIC,
            "key": _hex(TOPIC_KEY),
            "epoch": EPOCH,
            "nonce": _hex(SEAL_NONCE),
            "plaintext": _hex(plaintext),
        },
        "aad": _hex(aad),
        "sealed": _hex(sealed),
        "envelope": {
            "sequence": 5,
            "timestamp_ms": TIMESTAMP_MS + 4,
            "flags": 1,
            "digest": _hex(
                message_domain.digest(TOPIC, device.device, 5, TIMESTAMP_MS + 4, sealed, 1)
            ),
            "wire": _hex(encrypted.encode()),
            "leaf": _hex(message_leaf(message_domain, TOPIC, encrypted)),
        },
    }
    vectors["envelope"] = {
        "domain": {"chain_id": CHAIN_ID, "verifying_contract": message_domain.registry},
        "domain_separator": _hex(message_domain.separator),
        "device": device.address,
        "messages": envelopes,
    }

    # Merkle tree over the four plaintext message leaves.
    tree = MerkleTree(leaves)
    vectors["merkle"] = {
        "leaves": [_hex(leaf) for leaf in leaves],
        "level1": [_hex(hash_pair(leaves[0], leaves[1])), _hex(hash_pair(leaves[2], leaves[3]))],
        "root": _hex(tree.root),
        "proofs": [[_hex(node) for node in tree.proof(i)] for i in range(len(leaves))],
        "leaf_hash_example": {"data": "0x" + "ab" * 97, "leaf": _hex(leaf_hash(b"\xab" * 97))},
    }

    # Control topics and payloads.
    payer_address = addresses["payer"]
    seller = addresses["seller"]
    tx_hash = keccak256(b"blendsm test-only anchor tx")
    payloads = {
        "voucher": encode_voucher(voucher),
        "quote": encode_notice(
            Quote(TOPIC, seller, CHANNEL_ID, 1000, 50_000, 3000, 2000, lane=broker_address)
        ),
        "payment_request": encode_notice(
            PaymentRequest(CHANNEL_ID, 52_000, 2000, 50_000, TOPIC, lane=broker_address)
        ),
        "receipt": encode_notice(Receipt(CHANNEL_ID, CUMULATIVE_AMOUNT, lane=broker_address)),
        "refused": encode_notice(
            Refusal("not_newer", "voucher pays nothing new", CHANNEL_ID, 1000)
        ),
        "refused_proof": encode_notice(
            Refusal("proof_unavailable", "no such message", request_id="req-2")
        ),
        "anchor": encode_anchor_notice(AnchorNotice(42, tree.root, 4, tx_hash)),
        "anchor_unknown_tx": encode_anchor_notice(AnchorNotice(43, tree.root, 4, None)),
        "proof_request": encode_proof_request(
            ProofRequest("req-1", topic=TOPIC, sequence=3, device=device.address)
        ),
        "proof_request_by_leaf": encode_proof_request(ProofRequest("req-3", leaf=leaves[2])),
        "resume": encode_resume_request(ResumeRequest("req-4", TOPIC, {device.address: 3})),
        "resumed": encode_resumed(Resumed("req-4", TOPIC, 1, (Unserved(device.address, 4, 4),))),
        "proof": encode_notice(
            Proof(
                "req-1",
                TOPIC,
                3,
                device.address,
                leaves[2],
                tuple(tree.proof(2)),
                42,
                tree.root,
                tx_hash,
                2,
            )
        ),
    }
    vectors["control"] = {
        "topics": {
            "voucher": control_topic(payer_address, VOUCHER),
            "notice": control_topic(payer_address, NOTICE),
            "proof": control_topic(payer_address, PROOF),
            "resume": control_topic(payer_address, RESUME),
            "anchors": ANCHORS_TOPIC,
        },
        "payloads": {name: payload.decode() for name, payload in payloads.items()},
    }

    # Topic-key delivery: ECIES wrap (fixed ephemeral key and nonce) + seller signature.
    topic_id = topic_id_of(TOPIC)
    recipient = addresses["payer"]
    recipient_public = PrivateKey(KEYS["payer"]).public_key.format(compressed=False)
    wrapped_plain = b"BSMK\x01" + topic_id + EPOCH.to_bytes(4, "big") + TOPIC_KEY
    blob = _ecies_wrap(recipient_public, wrapped_plain)
    key_digest = keccak256(AAD_LABEL + topic_id + bytes.fromhex(recipient[2:]) + keccak256(blob))
    key_signature = _sign(KEYS["seller"], key_digest)
    vectors["key_message"] = {
        "inputs": {
            "seller": "seller",
            "recipient": "payer",
            "topic": TOPIC,
            "epoch": EPOCH,
            "key": _hex(TOPIC_KEY),
            "ecies_ephemeral_key": "ecies_ephemeral",
            "ecies_nonce": _hex(ECIES_NONCE),
        },
        "topic_id": _hex(topic_id),
        "key_topic": key_topic(topic_id, recipient),
        "wrapped_plaintext": _hex(wrapped_plain),
        "ecies_blob": _hex(blob),
        "digest": _hex(key_digest),
        "signature": _hex(key_signature),
        "payload": _hex(b"\x01" + blob + key_signature),
    }
    return vectors


def _dump(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    return json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    return build_vectors()


@pytest.mark.parametrize(
    "section",
    [
        "keys",
        "chain_id",
        "contracts",
        "typehashes",
        "connect_token",
        "voucher",
        "envelope",
        "sealed_payload",
        "merkle",
        "control",
        "key_message",
    ],
)
def test_section_matches_code(stored: dict[str, Any], built: dict[str, Any], section: str) -> None:
    assert stored[section] == built[section]


def test_file_is_exactly_what_the_code_generates(built: dict[str, Any]) -> None:
    assert VECTORS_PATH.read_text(encoding="utf-8") == _dump(built)


def test_typehashes_are_keccak_of_the_type_strings(stored: dict[str, Any]) -> None:
    for type_string, typehash in stored["typehashes"].items():
        assert _hex(keccak256(type_string.encode())) == typehash


def test_test_keys_are_keccak_of_labels(stored: dict[str, Any]) -> None:
    for entry in stored["keys"].values():
        assert entry["private_key"] == _hex(keccak256(entry["label"].encode()))
        assert Account.from_key(entry["private_key"]).address == entry["address"]


def _eth_account_sign(typed: dict[str, Any], private_key: str) -> tuple[str, str]:
    signed = Account.sign_message(encode_typed_data(full_message=typed), private_key)
    return _hex(bytes(signed.message_hash)), _hex(bytes(signed.signature))


def test_connect_token_against_eth_account(stored: dict[str, Any]) -> None:
    vector = stored["connect_token"]
    inputs = vector["inputs"]
    nonce = bytes.fromhex(inputs["nonce"][2:])
    typed = connect_typed_data(
        inputs["chain_id"], inputs["broker"], inputs["client_id"], inputs["issued_at"], nonce
    )
    key = stored["keys"][inputs["signer"]]["private_key"]
    assert _eth_account_sign(typed, key) == (vector["digest"], vector["signature"])
    token = parse_connect_token(vector["token"])
    assert (token.issued_at, token.nonce) == (inputs["issued_at"], nonce)
    verifier = ConnectTokenVerifier(inputs["chain_id"], inputs["broker"])
    assert (
        verifier.verify(
            vector["username"], inputs["client_id"], vector["token"], now=inputs["issued_at"]
        )
        == vector["username"]
    )


def test_voucher_against_eth_account(stored: dict[str, Any]) -> None:
    vector = stored["voucher"]
    inputs = vector["inputs"]
    domain = VoucherDomain(inputs["chain_id"], inputs["verifying_contract"])
    channel_id = bytes.fromhex(inputs["channel_id"][2:])
    typed = voucher_typed_data(domain, channel_id, inputs["lane"], int(inputs["cumulative_amount"]))
    key = stored["keys"][inputs["signer"]]["private_key"]
    assert _eth_account_sign(typed, key) == (vector["digest"], vector["signature"])
    voucher = decode_voucher(stored["control"]["payloads"]["voucher"].encode())
    assert _hex(voucher.signature) == vector["signature"]
    assert recover_voucher_signer(domain, voucher) == stored["keys"]["payer"]["address"]
    assert voucher.lane == inputs["lane"]


def test_envelopes_against_eth_account(stored: dict[str, Any]) -> None:
    section = stored["envelope"]
    domain = MessageDomain(CHAIN_ID, section["domain"]["verifying_contract"])
    key = stored["keys"]["device"]["private_key"]
    for vector in section["messages"]:
        inputs = vector["inputs"]
        payload = bytes.fromhex(inputs["payload"][2:])
        typed = message_typed_data(
            domain,
            inputs["topic"],
            section["device"],
            inputs["sequence"],
            inputs["timestamp_ms"],
            payload,
            inputs["flags"],
        )
        assert _eth_account_sign(typed, key) == (vector["digest"], vector["signature"])
        envelope = decode_envelope(bytes.fromhex(vector["wire"][2:]))
        assert envelope.payload == payload
        assert verify_envelope(domain, inputs["topic"], envelope) == section["device"]
        digest = bytes.fromhex(vector["digest"][2:])
        signature = bytes.fromhex(vector["signature"][2:])
        assert _hex(keccak256(keccak256(digest + signature))) == vector["leaf"]


def test_sealed_payload_opens(stored: dict[str, Any]) -> None:
    vector = stored["sealed_payload"]
    inputs = vector["inputs"]
    key = bytes.fromhex(inputs["key"][2:])
    sealed = bytes.fromhex(vector["sealed"][2:])
    assert _hex(open_sealed(key, inputs["topic"], sealed)) == inputs["plaintext"]
    envelope = decode_envelope(bytes.fromhex(vector["envelope"]["wire"][2:]))
    assert envelope.encrypted
    assert envelope.payload == sealed
    domain = MessageDomain(CHAIN_ID, stored["contracts"]["Registry"])
    assert verify_envelope(domain, inputs["topic"], envelope) == stored["envelope"]["device"]


def test_merkle_proofs_verify(stored: dict[str, Any]) -> None:
    section = stored["merkle"]
    root = bytes.fromhex(section["root"][2:])
    for leaf, proof in zip(section["leaves"], section["proofs"], strict=True):
        nodes = [bytes.fromhex(node[2:]) for node in proof]
        assert verify_proof(bytes.fromhex(leaf[2:]), nodes, root)
    assert section["leaves"] == [m["leaf"] for m in stored["envelope"]["messages"]]


def test_control_payloads_decode(stored: dict[str, Any]) -> None:
    payloads = {k: v.encode() for k, v in stored["control"]["payloads"].items()}
    for name in ("quote", "payment_request", "receipt", "refused", "refused_proof", "proof"):
        decoded = decode_any_notice(payloads[name])
        assert encode_notice(decoded) == payloads[name]
    proof = decode_any_notice(payloads["proof"])
    assert isinstance(proof, Proof)
    assert verify_proof(proof.leaf, proof.proof, proof.root)
    for name in ("anchor", "anchor_unknown_tx"):
        assert encode_anchor_notice(decode_anchor_notice(payloads[name])) == payloads[name]
    for name in ("proof_request", "proof_request_by_leaf"):
        assert encode_proof_request(decode_proof_request(payloads[name])) == payloads[name]
    assert encode_resume_request(decode_resume_request(payloads["resume"])) == payloads["resume"]
    assert encode_resumed(decode_resumed(payloads["resumed"])) == payloads["resumed"]


def test_key_message_unwraps(stored: dict[str, Any]) -> None:
    vector = stored["key_message"]
    keys = stored["keys"]
    payer_key = bytes.fromhex(keys["payer"]["private_key"][2:])
    topic_id = bytes.fromhex(vector["topic_id"][2:])
    topic_key = bytes.fromhex(vector["inputs"]["key"][2:])
    blob = bytes.fromhex(vector["ecies_blob"][2:])
    assert unwrap_topic_key(payer_key, blob) == (topic_id, EPOCH, topic_key)
    assert decode_key_message(
        payer_key,
        keys["payer"]["address"],
        keys["seller"]["address"],
        topic_id,
        bytes.fromhex(vector["payload"][2:]),
    ) == (EPOCH, topic_key)


if __name__ == "__main__":
    sys.stdout.write(_dump(build_vectors()))
