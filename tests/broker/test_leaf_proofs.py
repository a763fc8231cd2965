"""Proofs of batches whose tree is not cached: one chunk's leaves hashed, not the batch's
(:mod:`blendsm.broker._leaf_proofs`), the same proof as the whole tree's, and never a proof
from a store altered behind the broker's back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from blendsm.broker._anchor_records import LeafRow
from blendsm.broker._leaf_proofs import CHUNK_LEAVES, CHUNK_LEVEL
from blendsm.broker._leaf_schema import APPLICATION_ID, SCHEMA_V1, SCHEMA_VERSION, V1_TO_V2
from blendsm.broker._leaf_store import LeafStore
from blendsm.device_sdk import MerkleTree, verify_proof
from blendsm.errors import StoreError, WireError

TOPIC = "sensors/berlin/temp"
DEVICE = bytes(19) + b"\x01"


def _row(i: int) -> LeafRow:
    return LeafRow(TOPIC, DEVICE, i, i.to_bytes(32, "big"), b"env", 1.0 + i)


def _leaves(n: int) -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(1, n + 1)]


@pytest.mark.parametrize("height", [1, 2, 3])
def test_a_level_joins_its_parts_proofs_into_the_whole_trees_proof(height: int) -> None:
    """Node j of ``level(h)`` is the root of leaves [j * 2**h, (j + 1) * 2**h), and a part's
    proof followed by the upper tree's is the whole tree's proof, for every leaf of every
    size up to 40 (odd last nodes at every level included)."""
    part = 1 << height
    for n in range(1, 41):
        leaves = _leaves(n)
        whole = MerkleTree(leaves)
        nodes = whole.level(height)
        assert nodes == [MerkleTree(leaves[j : j + part]).root for j in range(0, n, part)]
        upper = MerkleTree(nodes)
        assert upper.root == whole.root
        for i in range(n):
            chunk = MerkleTree(leaves[i - i % part : i - i % part + part])
            assert chunk.proof(i % part) + upper.proof(i // part) == whole.proof(i), (n, i)
        parts = [MerkleTree(leaves[j : j + part]) for j in range(0, n, part)]
        joined = MerkleTree.joined(parts, height)  # a seal builds its tree this way
        assert joined.root == whole.root
        assert [joined.proof(i) for i in range(n)] == [whole.proof(i) for i in range(n)]
        assert joined.level(height) == nodes
    assert MerkleTree(_leaves(3)).level(99) == [MerkleTree(_leaves(3)).root]
    with pytest.raises(WireError, match="every part but the last"):
        MerkleTree.joined([MerkleTree(_leaves(3)), MerkleTree(_leaves(4))], 2)
    with pytest.raises(ValueError, match="height"):
        MerkleTree(_leaves(3)).level(-1)


@pytest.mark.parametrize("n", [3000, 2 * CHUNK_LEAVES + 1, CHUNK_LEAVES])
def test_a_proof_of_an_uncached_batch_hashes_its_chunk_only(tmp_path: Path, n: int) -> None:
    """3,000 leaves (chunks of 1,024, 1,024 and 952), 2,049 (a last chunk of one leaf) and
    1,024 (one chunk): each proof is the whole tree's, verifies against the root, and costs
    its own chunk's leaves; rebuilding the tree would hash all n."""
    whole = MerkleTree(_leaves(n))
    with LeafStore(tmp_path / "l.sqlite3") as s:
        s.add_many([_row(i) for i in range(1, n + 1)])
        batch = s.seal_batch(n)
        assert batch is not None
        assert batch.root == whole.root
        s.mark_confirmed(batch.batch_id, b"\x22" * 32, 1)
        s.trees.forget(batch.batch_id)
        edges = {0, 1, 1023, 1024, 1025, 2047, 2048, n // 2, n - 2, n - 1}
        for position in sorted(p for p in edges if p < n):
            before = s.proofs.leaves_hashed
            p = s.proof_for(TOPIC, DEVICE, position + 1)
            assert p is not None
            assert p.index == position
            assert list(p.proof) == whole.proof(position)
            assert verify_proof(p.leaf, p.proof, p.root)
            first = position - position % CHUNK_LEAVES
            assert s.proofs.leaves_hashed - before == min(first + CHUNK_LEAVES, n) - first
        assert batch.batch_id not in s.trees  # answered from chunks: the cache was not churned


def _corrupt(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as db:
        db.execute(sql, params)
    db.close()


@pytest.mark.parametrize(
    "alteration",
    [
        ("UPDATE leaves SET leaf = ? WHERE position = 1500", b"\x77" * 32),
        ("UPDATE batches SET chunk_roots = substr(chunk_roots, 1, 32)",),
        ("UPDATE batches SET chunk_roots = ? || substr(chunk_roots, 33)", b"\x66" * 32),
        ("DELETE FROM leaves WHERE position = 1030",),
    ],
    ids=["a leaf", "chunk roots cut", "a chunk root", "a leaf gone"],
)
def test_a_store_altered_behind_our_back_gives_no_proof(
    tmp_path: Path, alteration: tuple[object, ...]
) -> None:
    """A proof that would fail on chain is never handed out: the chunk's root and the chunk
    roots' tree are checked against what was anchored."""
    path = tmp_path / "l.sqlite3"
    with LeafStore(path) as s:
        s.add_many([_row(i) for i in range(1, 3001)])
        batch = s.seal_batch(3000)
        assert batch is not None
        s.mark_confirmed(batch.batch_id, b"\x22" * 32, 1)
    sql, *params = alteration
    _corrupt(path, str(sql), *params)
    with LeafStore(path) as s, pytest.raises(StoreError, match=f"batch {batch.batch_id}"):
        s.proof_for(TOPIC, DEVICE, 1200)  # chunk 1 (positions 1024-2047)


def test_a_batch_sealed_by_schema_2_is_rebuilt_once_then_proved_from_its_chunks(
    tmp_path: Path,
) -> None:
    """A version 2 file has no chunk roots: the upgrade keeps its batches, their first proof
    rebuilds the whole tree and stores the chunk roots, and later proofs hash a chunk."""
    path = tmp_path / "leaves.sqlite3"
    n = 2500
    whole = MerkleTree(_leaves(n))
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V1 + V1_TO_V2)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA user_version=2")
        db.execute(
            "INSERT INTO batches (batch_id, root, leaf_count, state, tx_hash, block_number,"
            " created_at, updated_at) VALUES (1, ?, ?, 'confirmed', ?, 7, 1.0, 1.0)",
            (whole.root, n, b"\x22" * 32),
        )
        db.executemany(
            "INSERT INTO leaves (topic, device, sequence, leaf, envelope, received_at,"
            " batch_id, position) VALUES (?, ?, ?, ?, x'00', 1.0, 1, ?)",
            [
                (TOPIC, DEVICE, i.to_bytes(8, "big"), leaf, i - 1)
                for i, leaf in enumerate(_leaves(n), start=1)
            ],
        )
    db.close()
    with LeafStore(path) as s:
        p = s.proof_for(TOPIC, DEVICE, 2)
        assert p is not None
        assert list(p.proof) == whole.proof(1)
        assert s.proofs.leaves_hashed == n  # rebuilt once
        s.trees.forget(1)
        p = s.proof_for(TOPIC, DEVICE, 2400)
        assert p is not None
        assert list(p.proof) == whole.proof(2399)
        assert verify_proof(p.leaf, p.proof, whole.root)
        assert s.proofs.leaves_hashed == n + (n - 2 * CHUNK_LEAVES)  # then its last chunk
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        (stored,) = db.execute("SELECT chunk_roots FROM batches").fetchone()
        assert stored == b"".join(whole.level(CHUNK_LEVEL))
    db.close()
