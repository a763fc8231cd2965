"""Proofs of anchored messages from the leaf store's rows, at a bounded cost per proof.

Why a bound: a proof needs its batch's Merkle tree. The newest trees are cached
(:mod:`~blendsm.broker._tree_cache`), but a root may cover up to 2**20 leaves, and rebuilding
an evicted tree cost about 4-5 us a leaf on the leaf store's thread (0.5 s for a 100,000-leaf
root), with every leaf add, so every QoS 1 PUBACK, waiting behind it. Any client may ask for
the proof of any old message, several at a time.

So a seal also stores the batch's *chunk roots*: the tree's nodes :data:`CHUNK_LEVEL` levels
above the leaves, one per :data:`CHUNK_LEAVES` leaves (32 bytes per 1,024 leaves). The proof
of a batch whose tree is not cached reads the leaves of its own chunk only, builds that
chunk's tree and the tree over the chunk roots, and joins their proofs
(:meth:`~blendsm.device_sdk.MerkleTree.level` says why they join): at most 1,023 + 1,023
hashes, about 2 ms, whatever the batch's size. Both trees are checked against what was
anchored (the chunk's root against its stored chunk root, the chunk roots' tree against the
batch's root), so an altered store raises instead of handing out a proof that fails on chain.

A batch sealed before the chunk roots existed (leaf store schema 2) has none: its first proof
rebuilds the whole tree, as before, and stores them, so an old batch is rebuilt once at most.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Final, TypeVar

from blendsm.broker._anchor_records import UINT64_MAX, ProofRecord
from blendsm.broker._durable import fetch_pausing, let_the_loop_in
from blendsm.broker._tree_cache import TreeCache
from blendsm.device_sdk import MerkleTree, checksum_address
from blendsm.errors import StoreError

__all__ = ["CHUNK_LEAVES", "CHUNK_LEVEL", "LeafProofs", "chunk_roots"]

CHUNK_LEVEL: Final = 10
"""Levels above the leaves at which a sealed batch's nodes are stored (its chunk roots)."""
CHUNK_LEAVES: Final = 1 << CHUNK_LEVEL
"""Leaves under one chunk root: the most a proof of an uncached batch reads and hashes, and
also the most chunk roots a 2**20-leaf batch has."""

_T = TypeVar("_T")

_PROOF_SELECT: Final = (
    "SELECT l.topic, l.sequence, l.device, l.leaf, l.batch_id, l.position, l.envelope,"
    " b.root, b.leaf_count, b.tx_hash, b.block_number, CAST(b.chunk_roots AS BLOB)"
    " FROM leaves l JOIN batches b ON b.batch_id = l.batch_id"
    " WHERE b.state = 'confirmed' AND "
)


def chunk_roots(tree: MerkleTree) -> bytes:
    """The chunk roots of ``tree`` as stored with its batch: its nodes :data:`CHUNK_LEVEL`
    levels up, concatenated (a tree of at most :data:`CHUNK_LEAVES` leaves: its root)."""
    return b"".join(tree.level(CHUNK_LEVEL))


class LeafProofs:
    """The proof side of one leaf store: its tree cache and the proof lookups. Runs on the
    store's thread, with its connection; ``write`` is the store's transaction wrapper."""

    def __init__(
        self,
        db: sqlite3.Connection,
        write: Callable[[Callable[[], Any]], Any],
        trees: TreeCache,
    ) -> None:
        self._db = db
        self._write = write
        self.trees = trees
        """Recent batches' trees (bounded by trees and by leaves)."""
        self.leaves_hashed = 0
        """Leaves whose tree was built again to answer a proof (chunks, and whole trees of
        batches sealed without chunk roots): what proofs of uncached batches cost."""

    def proof_for(self, topic: str, device: bytes | None, sequence: int) -> ProofRecord | None:
        """The proof of the message ``sequence`` on ``topic`` (by ``device`` if given, else
        the first such message stored), None unless it is in a confirmed batch."""
        if not 0 <= sequence <= UINT64_MAX:
            return None
        sql = _PROOF_SELECT + "l.topic = ? AND l.sequence = ?"
        params: tuple[object, ...] = (topic, sequence.to_bytes(8, "big"))
        if device is not None:
            sql += " AND l.device = ?"
            params += (device,)
        row = self._db.execute(sql + " ORDER BY l.leaf_index LIMIT 1", params).fetchone()
        return None if row is None else self._proof(row)

    def proof_for_leaf(self, leaf: bytes) -> ProofRecord | None:
        """The proof of the message whose leaf hash is ``leaf``, None unless anchored."""
        row = self._db.execute(_PROOF_SELECT + "l.leaf = ?", (leaf,)).fetchone()
        return None if row is None else self._proof(row)

    def _proof(self, row: Any) -> ProofRecord:
        topic, seq, device, leaf, batch_id, position, envelope, root, count, tx, block, chunks = row
        tree = self.trees.get(batch_id)
        if tree is not None:
            path = tree.proof(position)
            if tree.root != root:  # the store was altered behind our back: never hand it out
                raise StoreError(f"batch {batch_id}: stored leaves do not give the anchored root")
        elif chunks is None:
            path = self._rebuilt(batch_id, root).proof(position)
        else:
            path = self._from_chunks(batch_id, root, count, chunks, position)
        return ProofRecord(
            topic=topic,
            sequence=int.from_bytes(seq, "big"),
            device=checksum_address(device),
            leaf=leaf,
            proof=tuple(path),
            batch_id=batch_id,
            root=root,
            tx_hash=tx,
            index=position,
            leaf_count=count,
            block=block,
            envelope=envelope,
        )

    def _from_chunks(
        self, batch_id: int, root: bytes, count: int, chunks: bytes, position: int
    ) -> list[bytes]:
        """The proof of leaf ``position`` from its chunk's leaves and the chunk roots."""
        expected = -(-count // CHUNK_LEAVES)
        if len(chunks) != 32 * expected:
            raise StoreError(
                f"batch {batch_id}: {len(chunks)} bytes of chunk roots for {count} leaves"
            )
        nodes = [chunks[i : i + 32] for i in range(0, len(chunks), 32)]
        upper = MerkleTree(nodes, pause=let_the_loop_in)
        if upper.root != root:
            raise StoreError(f"batch {batch_id}: stored chunk roots do not give the anchored root")
        index = position >> CHUNK_LEVEL
        first = index << CHUNK_LEVEL
        last = min(first + CHUNK_LEAVES, count) - 1
        rows = fetch_pausing(
            self._db.execute(
                "SELECT leaf FROM leaves WHERE batch_id = ? AND position BETWEEN ? AND ?"
                " ORDER BY position",
                (batch_id, first, last),
            )
        )
        if len(rows) != last - first + 1:
            raise StoreError(f"batch {batch_id}: {len(rows)} stored leaves in chunk {index}")
        self.leaves_hashed += len(rows)
        part = MerkleTree([r[0] for r in rows], pause=let_the_loop_in)
        if part.root != nodes[index]:
            raise StoreError(f"batch {batch_id}: stored leaves do not give chunk root {index}")
        return part.proof(position - first) + upper.proof(index)

    def _rebuilt(self, batch_id: int, root: bytes) -> MerkleTree:
        """The whole tree of a batch sealed without chunk roots, rebuilt from its rows; its
        chunk roots are stored, so this batch is not rebuilt again, and it is cached."""
        rows = fetch_pausing(
            self._db.execute(
                "SELECT leaf FROM leaves WHERE batch_id = ? ORDER BY position", (batch_id,)
            )
        )
        self.leaves_hashed += len(rows)
        tree = MerkleTree([r[0] for r in rows], pause=let_the_loop_in)
        if tree.root != root:  # the store was altered behind our back: never hand it out
            raise StoreError(f"batch {batch_id}: stored leaves do not give the anchored root")
        stored = chunk_roots(tree)
        self._write(
            lambda: self._db.execute(
                "UPDATE batches SET chunk_roots = ? WHERE batch_id = ?", (stored, batch_id)
            )
        )
        self.trees.put(batch_id, tree)
        return tree
