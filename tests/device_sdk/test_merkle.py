"""Merkle proofs as OpenZeppelin ``MerkleProof.verify`` checks them."""

from __future__ import annotations

import pytest
from eth_utils.crypto import keccak

from blendsm.device_sdk import MerkleTree, hash_pair, leaf_hash, process_proof, verify_proof
from blendsm.errors import WireError


def leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(salt + i.to_bytes(8, "big")) for i in range(n)]


def oz_process_proof(leaf: bytes, proof: list[bytes]) -> bytes:
    """Independent transcription of OZ 5 processProof / commutativeKeccak256 (uint order)."""
    computed = leaf
    for element in proof:
        a, b = int.from_bytes(computed, "big"), int.from_bytes(element, "big")
        computed = keccak(computed + element if a < b else element + computed)
    return computed


def test_leaf_hash_is_double_keccak() -> None:
    data = b'{"topic":"t","seq":1}'
    assert leaf_hash(data) == keccak(keccak(data))
    assert leaf_hash(b"") == keccak(keccak(b""))


def test_hash_pair_is_commutative_and_sorted() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(min(a, b) + max(a, b))
    assert hash_pair(a, a) == keccak(a + a)


def test_single_leaf_tree() -> None:
    (leaf,) = leaves(1)
    tree = MerkleTree([leaf])
    assert tree.root == leaf
    assert tree.proof(0) == []
    assert verify_proof(leaf, [], tree.root)
    assert len(tree) == 1


def test_layout_carries_odd_node_up() -> None:
    l0, l1, l2 = leaves(3)
    tree = MerkleTree([l0, l1, l2])
    assert tree.root == hash_pair(hash_pair(l0, l1), l2)
    assert tree.proof(0) == [l1, l2]
    assert tree.proof(2) == [hash_pair(l0, l1)]
    a, b, c, d, e = leaves(5)
    five = MerkleTree([a, b, c, d, e])
    assert five.root == hash_pair(hash_pair(hash_pair(a, b), hash_pair(c, d)), e)
    assert five.proof(4) == [hash_pair(hash_pair(a, b), hash_pair(c, d))]
    assert five.proof(0) == [b, hash_pair(c, d), e]


@pytest.mark.parametrize("n", range(1, 258))
def test_every_leaf_of_every_size_verifies(n: int) -> None:
    ls = leaves(n, salt=n.to_bytes(2, "big"))
    tree = MerkleTree(ls)
    assert tree.leaves == ls
    depth = (n - 1).bit_length()
    for i, leaf in enumerate(ls):
        proof = tree.proof(i)
        assert len(proof) <= depth
        assert verify_proof(leaf, proof, tree.root)
        assert oz_process_proof(leaf, proof) == tree.root
        assert process_proof(leaf, proof) == tree.root


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 9, 33, 100])
def test_tampering_fails(n: int) -> None:
    ls = leaves(n)
    tree = MerkleTree(ls)
    outsider = leaf_hash(b"not in the tree")
    for i, leaf in enumerate(ls):
        proof = tree.proof(i)
        assert not verify_proof(outsider, proof, tree.root)
        assert not verify_proof(leaf, proof, outsider)
        assert not verify_proof(ls[(i + 1) % n], proof, tree.root)
        for k in range(len(proof)):
            flipped = [*proof]
            flipped[k] = bytes([proof[k][0] ^ 1]) + proof[k][1:]
            assert not verify_proof(leaf, flipped, tree.root)
            assert not verify_proof(leaf, proof[:k] + proof[k + 1 :], tree.root)
        assert not verify_proof(leaf, [*proof, outsider], tree.root)
        if len(proof) >= 2 and proof[0] != proof[1]:
            assert not verify_proof(leaf, [proof[1], proof[0], *proof[2:]], tree.root)


def test_order_of_leaves_matters() -> None:
    ls = leaves(4)
    assert MerkleTree(ls).root != MerkleTree([ls[0], ls[2], ls[1], ls[3]]).root


def test_negative_index_and_out_of_range() -> None:
    tree = MerkleTree(leaves(5))
    assert tree.proof(-1) == tree.proof(4)
    for bad in (5, -6):
        with pytest.raises(IndexError):
            tree.proof(bad)


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "00" * 32])
def test_malformed_nodes_raise_wire_error(bad: object) -> None:
    good = leaves(2)
    with pytest.raises(WireError):
        MerkleTree([good[0], bad])  # type: ignore[list-item]
    with pytest.raises(WireError):
        verify_proof(bad, [good[1]], good[0])  # type: ignore[arg-type]
    with pytest.raises(WireError):
        verify_proof(good[0], [bad], good[0])  # type: ignore[list-item]
    with pytest.raises(WireError):
        verify_proof(good[0], [good[1]], bad)  # type: ignore[arg-type]


def test_empty_tree_is_refused() -> None:
    with pytest.raises(WireError, match="at least one leaf"):
        MerkleTree([])


def test_large_tree() -> None:
    n = 100_003
    ls = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    tree = MerkleTree(ls)
    for i in (0, 1, 65_535, 65_536, n // 2, n - 2, n - 1):
        proof = tree.proof(i)
        assert len(proof) <= 17
        assert verify_proof(ls[i], proof, tree.root)


@pytest.mark.parametrize("n", [1, 2, 3, 511, 512, 513, 514, 1025, 3001])
def test_a_tree_built_with_pauses_is_the_same_tree(n: int) -> None:
    """``pause`` (a store thread letting the event loop in) slices the hashing, never the
    pairs: same root and proofs as in one go, for sizes around the slice bounds."""
    from blendsm.device_sdk._merkle import PAUSE_EVERY

    pauses: list[int] = []
    paused = MerkleTree(leaves(n), pause=lambda: pauses.append(1))
    whole = MerkleTree(leaves(n))
    assert paused.root == whole.root
    for i in {0, n // 2, n - 1}:
        assert paused.proof(i) == whole.proof(i)
    # one pause between two slices of a level; a level of at most 2 x PAUSE_EVERY has none
    expected, size = 0, n
    while size > 1:
        expected += (size - 1) // (2 * PAUSE_EVERY)
        size = (size + 1) // 2
    assert len(pauses) == expected
    assert (len(pauses) > 0) == (n > 2 * PAUSE_EVERY)
