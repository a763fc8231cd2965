"""DataAnchors: who may anchor, batch-id order, stored anchors, on-chain proof checks, and
the cross-check that Merkle proofs built by ``blendsm.device_sdk`` verify on chain.

Every test runs on the embedded chain and on anvil, except the volume cross-check
(embedded only; see its docstring).
"""

from __future__ import annotations

import random

import pytest
from eth_abi import decode, encode
from eth_utils import function_signature_to_4byte_selector, keccak

from blendsm.device_sdk import MerkleTree, leaf_hash, verify_proof

BOTH = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

SELLER, BUYER, OPERATOR, VALIDATOR = 1, 2, 3, 4
ROOT = keccak(text="a root")
ROOT2 = keccak(text="another root")
UINT64_MAX = 2**64 - 1


@pytest.fixture
def operator(enrol):
    return enrol("operator", OPERATOR)


def tree_of(n: int, tag: str = "") -> tuple[list[bytes], MerkleTree]:
    leaves = [leaf_hash(f"{tag}message {i} of {n}".encode()) for i in range(n)]
    return leaves, MerkleTree(leaves)


@BOTH
def test_wired_to_registry(chain, da):
    assert da.registry().call() == chain.Registry.address


@BOTH
def test_anchor_stores_and_emits(chain, da, tx, events, operator):
    assert da.latestBatchId(operator).call() == 0
    assert tuple(da.anchorOf(operator, 1).call()) == (bytes(32), 0, 0, 0)
    chain.time_travel(100)
    receipt = tx(da.anchor(1, ROOT, 5), "operator")
    assert events(receipt) == [
        ("DataAnchors.Anchored", {"broker": operator, "batchId": 1, "root": ROOT, "leafCount": 5})
    ]
    block = chain.w3.eth.get_block(receipt["blockNumber"])
    assert tuple(da.anchorOf(operator, 1).call()) == (ROOT, 5, block["timestamp"], block["number"])
    assert da.latestBatchId(operator).call() == 1
    assert tuple(da.anchorOf(operator, 2).call()) == (bytes(32), 0, 0, 0)
    assert tuple(da.anchorOf(chain.addr("stranger"), 1).call()) == (bytes(32), 0, 0, 0)

    chain.time_travel(1000)
    receipt = tx(da.anchor(2**256 - 1, ROOT2, UINT64_MAX), "operator")  # extreme values fit
    block2 = chain.w3.eth.get_block(receipt["blockNumber"])
    assert block2["timestamp"] >= block["timestamp"] + 1000
    assert tuple(da.anchorOf(operator, 2**256 - 1).call()) == (
        ROOT2,
        UINT64_MAX,
        block2["timestamp"],
        block2["number"],
    )
    assert da.latestBatchId(operator).call() == 2**256 - 1
    assert tuple(da.anchorOf(operator, 1).call())[:2] == (ROOT, 5)  # older anchor kept


@BOTH
def test_only_active_operators_anchor(chain, da, tx, enrol, reverts):
    reg = chain.Registry.functions
    enrol("seller", SELLER)
    enrol("buyer", BUYER)
    enrol("validator", VALIDATOR)
    tx(reg.applyForRole(OPERATOR), "operator")  # pending
    tx(reg.applyForRole(OPERATOR), "buyer2")
    tx(reg.reject(chain.addr("buyer2")), "oracle")  # rejected
    enrol("stranger", OPERATOR)
    tx(reg.revoke(chain.addr("stranger")), "oracle")  # revoked
    enrol("device", OPERATOR)
    tx(reg.leave(), "device")  # left
    for label in (
        "seller",
        "buyer",
        "validator",
        "operator",
        "buyer2",
        "stranger",
        "device",
        "oracle",
        "device2",
    ):
        caller = chain.addr(label)
        with reverts("DataAnchorsNotOperator", caller):
            da.anchor(1, ROOT, 1).transact({"from": caller})
        assert da.latestBatchId(caller).call() == 0
    tx(reg.approve(chain.addr("operator")), "oracle")
    tx(da.anchor(1, ROOT, 1), "operator")


@BOTH
def test_revoked_operator_anchors_stay_verifiable(chain, da, tx, reverts, operator):
    leaves, tree = tree_of(3)
    tx(da.anchor(1, tree.root, 3), "operator")
    tx(chain.Registry.functions.revoke(operator), "oracle")
    with reverts("DataAnchorsNotOperator", operator):
        da.anchor(2, ROOT, 1).transact({"from": operator})
    assert da.verify(operator, 1, leaves[2], tree.proof(2)).call()
    assert tuple(da.anchorOf(operator, 1).call())[:2] == (tree.root, 3)


@BOTH
def test_batch_ids_strictly_increase_per_broker(chain, da, tx, enrol, reverts, operator):
    other = enrol("validator", OPERATOR)
    op = {"from": operator}
    with reverts("DataAnchorsBatchIdNotIncreasing", 0, 0):  # 0 is never valid
        da.anchor(0, ROOT, 1).transact(op)
    tx(da.anchor(1, ROOT, 1), "operator")
    with reverts("DataAnchorsBatchIdNotIncreasing", 1, 1):  # equal: no overwrite
        da.anchor(1, ROOT2, 2).transact(op)
    with reverts("DataAnchorsBatchIdNotIncreasing", 0, 1):
        da.anchor(0, ROOT2, 2).transact(op)
    tx(da.anchor(5, ROOT2, 2), "operator")  # gaps are allowed
    assert da.latestBatchId(operator).call() == 5
    with reverts("DataAnchorsBatchIdNotIncreasing", 3, 5):  # no filling the gap later
        da.anchor(3, ROOT, 1).transact(op)
    with reverts("DataAnchorsBatchIdNotIncreasing", 5, 5):
        da.anchor(5, ROOT, 1).transact(op)
    tx(da.anchor(6, ROOT, 1), "operator")
    assert tuple(da.anchorOf(operator, 1).call())[:2] == (ROOT, 1)
    assert tuple(da.anchorOf(operator, 5).call())[:2] == (ROOT2, 2)
    assert tuple(da.anchorOf(operator, 3).call())[:2] == (bytes(32), 0)
    # each broker has its own sequence
    assert da.latestBatchId(other).call() == 0
    tx(da.anchor(1, ROOT2, 7), "validator")
    assert da.latestBatchId(other).call() == 1
    assert tuple(da.anchorOf(other, 1).call())[:2] == (ROOT2, 7)
    assert tuple(da.anchorOf(operator, 1).call())[:2] == (ROOT, 1)
    assert da.latestBatchId(operator).call() == 6


@BOTH
def test_operator_who_comes_back_continues_its_sequence(chain, da, tx, reverts, operator):
    tx(da.anchor(10, ROOT, 1), "operator")
    tx(chain.Registry.functions.leave(), "operator")
    tx(chain.Registry.functions.applyForRole(OPERATOR), "operator")
    tx(chain.Registry.functions.approve(operator), "oracle")
    with reverts("DataAnchorsBatchIdNotIncreasing", 1, 10):
        da.anchor(1, ROOT2, 1).transact({"from": operator})
    tx(da.anchor(11, ROOT2, 1), "operator")


@BOTH
def test_empty_batches_are_refused(chain, da, tx, reverts, operator):
    op = {"from": operator}
    with reverts("DataAnchorsEmptyBatch"):
        da.anchor(1, bytes(32), 1).transact(op)
    with reverts("DataAnchorsEmptyBatch"):
        da.anchor(1, ROOT, 0).transact(op)
    with reverts("DataAnchorsEmptyBatch"):
        da.anchor(1, bytes(32), 0).transact(op)
    assert da.latestBatchId(operator).call() == 0
    tx(da.anchor(1, ROOT, 1), "operator")
    # the batch-id check comes first
    with reverts("DataAnchorsBatchIdNotIncreasing", 1, 1):
        da.anchor(1, bytes(32), 0).transact(op)


@BOTH
def test_verify(chain, da, tx, operator):
    leaves, tree = tree_of(5)
    other_leaves, other_tree = tree_of(4, tag="other ")
    tx(da.anchor(1, tree.root, 5), "operator")
    tx(da.anchor(2, other_tree.root, 4), "operator")
    for i, leaf in enumerate(leaves):
        assert da.verify(operator, 1, leaf, tree.proof(i)).call()
    proof = tree.proof(1)
    assert not da.verify(operator, 1, leaves[2], proof).call()  # wrong leaf for the proof
    assert not da.verify(operator, 1, leaf_hash(b"never published"), proof).call()
    assert not da.verify(operator, 1, keccak(b"message 1 of 5"), proof).call()  # single-hashed
    assert not da.verify(operator, 2, leaves[1], proof).call()  # wrong batch
    assert not da.verify(operator, 3, leaves[1], proof).call()  # batch not anchored
    assert not da.verify(chain.addr("stranger"), 1, leaves[1], proof).call()  # unknown broker
    assert not da.verify(operator, 1, leaves[1], proof[:-1]).call()  # truncated proof
    assert not da.verify(operator, 1, leaves[1], [*proof, ROOT]).call()  # extended proof
    assert not da.verify(operator, 1, leaves[1], []).call()
    tampered = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    assert not da.verify(operator, 1, leaves[1], tampered).call()
    assert da.verify(operator, 2, other_leaves[3], other_tree.proof(3)).call()


@BOTH
def test_verify_without_anchor_is_false_even_for_the_zero_leaf(chain, da):
    # processProof(zero leaf, []) is the zero root: the root != 0 guard is what refuses it
    assert not da.verify(chain.addr("stranger"), 0, bytes(32), []).call()
    assert not da.verify(chain.addr("stranger"), 1, bytes(32), []).call()


@BOTH
def test_verify_takes_a_leaf_hash_not_data(chain, da, tx, operator):
    """Documented property of OZ MerkleProof: ``verify`` gets a 32-byte leaf, so an inner
    node with its shorter proof (and the root with an empty proof) also verifies. Double
    hashing makes such nodes useless as leaves: a verifier must compute the leaf itself
    with ``leaf_hash(data)``."""
    leaves, tree = tree_of(4)
    tx(da.anchor(1, tree.root, 4), "operator")
    inner = tree.proof(2)[1]  # hash of leaves 0 and 1
    assert da.verify(operator, 1, inner, tree.proof(0)[1:]).call()
    assert da.verify(operator, 1, tree.root, []).call()
    assert inner not in leaves
    assert tree.root not in leaves


# ---------------------------------------------------------------- volume cross-check


@pytest.mark.parametrize("chain", ["embedded"], indirect=True)
def test_python_merkle_proofs_verify_on_chain(chain, da, tx, operator):
    """Trees of EVERY size 1..257 built by ``blendsm.device_sdk.MerkleTree`` are anchored
    (one batch per size, batch id = size) and checked with ``DataAnchors.verify`` via eth_call.

    Coverage (all 33,153 proofs would take ~1.5-2.5 min of eth_calls on py-evm at 2.5-4.5 ms
    each; with every leaf of sizes up to 64 this took 30 s in CI, now ~15 s):
    - sizes 1..32: EVERY leaf's proof verifies on chain (528 proofs: every shape of a tree
      of depth up to 5, odd levels included);
    - sizes 33..257: a fixed sample of 8 leaves per size verifies: first, second, middle,
      second-to-last, last, and 3 drawn by ``random.Random(size)`` (reproducible);
    - every size: one tampered proof (a flipped bit in one sibling; for size 1, whose proof
      is empty, a flipped bit in the leaf) must be refused on chain, and (sizes 2..257) the
      right proof against the previous size's
      batch too;
    - the Python ``verify_proof`` agrees with the chain on every case checked.
    Embedded only: the same calls over HTTP to anvil add nothing the embedded EVM lacks.
    """
    # Plain eth_call with the calldata encoded by eth_abi: web3's contract-call path spends
    # more time encoding than py-evm spends executing, and an explicit sender saves
    # eth-tester an eth_accounts lookup per call.
    selector = function_signature_to_4byte_selector("verify(address,uint256,bytes32,bytes32[])")
    types = ["address", "uint256", "bytes32", "bytes32[]"]
    base = {"from": chain.addr("stranger"), "to": chain.DataAnchors.address}

    def on_chain(batch: int, leaf: bytes, proof: list[bytes]) -> bool:
        data = selector + encode(types, [operator, batch, leaf, proof])
        (ok,) = decode(["bool"], chain.w3.eth.call({**base, "data": data}))
        return bool(ok)

    for n in range(1, 258):
        leaves, tree = tree_of(n)
        assert len(tree) == n
        tx(da.anchor(n, tree.root, n), "operator")
        if n <= 32:
            indices = list(range(n))
        else:
            rng = random.Random(n)
            fixed = {0, 1, n // 2, n - 2, n - 1}
            indices = sorted(fixed | set(rng.sample(sorted(set(range(n)) - fixed), 3)))
        for i in indices:
            proof = tree.proof(i)
            assert verify_proof(leaves[i], proof, tree.root)
            assert on_chain(n, leaves[i], proof), (n, i)

        i = indices[len(indices) // 2]
        proof = tree.proof(i)
        leaf = leaves[i]
        if proof:
            k = n % len(proof)
            proof = [*proof[:k], proof[k][:-1] + bytes([proof[k][-1] ^ 1]), *proof[k + 1 :]]
        else:
            leaf = leaf[:-1] + bytes([leaf[-1] ^ 1])
        assert not verify_proof(leaf, proof, tree.root)
        assert not on_chain(n, leaf, proof), (n, i, "tampered")
        if n > 1:
            assert not on_chain(n - 1, leaves[i], tree.proof(i)), (n, i, "batch")
    assert da.latestBatchId(operator).call() == 257
    # the shortcut above and web3's contract call agree
    leaves, tree = tree_of(257)
    assert da.verify(operator, 257, leaves[100], tree.proof(100)).call()
    assert on_chain(257, leaves[100], tree.proof(100))
