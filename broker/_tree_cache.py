"""The Merkle trees of recent batches, kept for proofs, bounded by trees and by leaves.

Why a bound on leaves: a tree keeps about 130 bytes per leaf, and a root may cover up to
2**20 leaves (``anchoring.max_leaves_per_root``), so eight cached trees alone did not bound
the memory. The newest tree is always kept (the one a fresh anchor's proofs come from); an
evicted tree is rebuilt from the leaf rows when a proof needs it.
"""

from __future__ import annotations

from collections import OrderedDict

from blendsm.device_sdk import MerkleTree

__all__ = ["TreeCache"]


class TreeCache:
    """Up to ``max_trees`` trees and ``max_leaves`` leaves in all, least recently used out."""

    def __init__(self, max_trees: int = 8, max_leaves: int = 1 << 18) -> None:
        self.max_trees = max_trees
        self.max_leaves = max_leaves
        self._trees: OrderedDict[int, MerkleTree] = OrderedDict()
        self.leaves = 0
        """Leaves of the trees held."""

    def __contains__(self, batch_id: int) -> bool:
        return batch_id in self._trees

    def batch_ids(self) -> list[int]:
        """The batches whose trees are held, least recently used first."""
        return list(self._trees)

    def get(self, batch_id: int) -> MerkleTree | None:
        """The batch's tree if held (it becomes the most recently used)."""
        tree = self._trees.get(batch_id)
        if tree is not None:
            self._trees.move_to_end(batch_id)
        return tree

    def put(self, batch_id: int, tree: MerkleTree) -> None:
        """Hold ``tree`` as the most recently used; evict past either bound."""
        self.forget(batch_id)
        trees = self._trees
        trees[batch_id] = tree
        self.leaves += len(tree)
        while len(trees) > 1 and (len(trees) > self.max_trees or self.leaves > self.max_leaves):
            self.leaves -= len(trees.popitem(last=False)[1])

    def forget(self, batch_id: int) -> None:
        """Drop the batch's tree (its batch failed: the leaves go to another)."""
        tree = self._trees.pop(batch_id, None)
        if tree is not None:
            self.leaves -= len(tree)
