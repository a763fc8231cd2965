"""Merkle trees whose proofs OpenZeppelin ``MerkleProof.verify`` accepts on chain.

OZ folds a proof with ``Hashes.commutativeKeccak256``: each pair is sorted (as unsigned
256-bit numbers, i.e. byte order) before hashing, so a proof needs no left/right flags.
We lay the tree out level by level in leaf order, pair neighbours (0,1), (2,3), ..., and
carry an odd last node up unchanged (it adds no proof element at that level). Leaf
``i`` stays at index ``i``, so the broker can hand out proofs by message position.

Leaves are double-hashed, ``keccak256(keccak256(data))``, as OZ ``StandardMerkleTree``
does: an inner node is the hash of 64 bytes and a leaf the hash of a 32-byte hash, so no
inner node can be passed off as a leaf (second-preimage attack) without breaking keccak.
Build trees only from :func:`leaf_hash` outputs for that guarantee to hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blendsm.errors import WireError

from ._keccak import keccak256

__all__ = [
    "MerkleTree",
    "hash_pair",
    "leaf_hash",
    "process_proof",
    "verify_proof",
]


def leaf_hash(data: bytes) -> bytes:
    """The double-hashed leaf for ``data`` (see the module docstring for why double)."""
    return keccak256(keccak256(data))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OZ ``Hashes.commutativeKeccak256``: keccak256 of the two nodes, smaller first."""
    return keccak256(a + b if a < b else b + a)


PAUSE_EVERY = 256
"""Hashes between two calls of a :class:`MerkleTree`'s ``pause`` (about 0.25 ms)."""


def _parents(nodes: list[bytes]) -> list[bytes]:
    """The parents of ``nodes``' pairs (an odd last node is the caller's)."""
    h = keccak256
    return [h(a + b if a < b else b + a) for a, b in zip(nodes[0::2], nodes[1::2], strict=False)]


def _check_node(node: object, what: str) -> bytes:
    if not isinstance(node, bytes) or len(node) != 32:
        got = f"{len(node)} bytes" if isinstance(node, bytes) else type(node).__name__
        raise WireError(f"{what} must be 32 bytes, got {got}")
    return node


class MerkleTree:
    """A tree over 32-byte leaf hashes; ``MerkleTree(leaves).proof(i)`` proves leaf ``i``.

    Built in O(n) hashes (~n - 1); all levels are kept, so a proof costs O(log n).
    One leaf gives ``root == leaf`` and an empty proof, as OZ verifies it.

    ``pause``, if given, is called after every :data:`PAUSE_EVERY` hashes. Why: the tree is
    pure Python (about 0.9 us a hash) and holds the GIL; built on a worker thread that shares
    a core with an event loop, 10,000 leaves kept the loop out for up to 5 ms at a time (the
    interpreter's switch interval). A pause that sleeps briefly lets it in.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes], *, pause: Callable[[], None] | None = None) -> None:
        if not leaves:
            raise WireError("a Merkle tree needs at least one leaf")
        level = [bytes(_check_node(leaf, f"leaf {i}")) for i, leaf in enumerate(leaves)]
        levels = [level]
        step = len(level) if pause is None else 2 * PAUSE_EVERY  # nodes hashed per slice
        while len(level) > 1:
            nxt: list[bytes] = []
            for start in range(0, len(level), step):  # slices of even length: pairs stay whole
                nxt += _parents(level[start : start + step])
                if pause is not None and start + step < len(level):
                    pause()
            if len(level) & 1:
                nxt.append(level[-1])
            levels.append(nxt)
            level = nxt
        self._levels: list[list[bytes]] = levels

    @classmethod
    def joined(cls, parts: Sequence[MerkleTree], height: int) -> MerkleTree:
        """The tree over the leaves of ``parts`` in order, each part but the last holding
        exactly ``2**height`` leaves (the last at most that): its levels up to ``height`` are
        the parts' own (see :meth:`level`), only the levels above are hashed. So a large tree
        can be built part by part, with other work in between."""
        if not parts:
            raise WireError("a Merkle tree needs at least one leaf")
        size = 1 << height
        if any(len(p) != size for p in parts[:-1]) or len(parts[-1]) > size:
            raise WireError(f"every part but the last must hold {size} leaves, the last at most")
        levels = [[node for p in parts for node in p.level(i)] for i in range(height + 1)]
        tree = cls.__new__(cls)
        tree._levels = levels[:-1] + MerkleTree(levels[-1])._levels
        return tree

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def root(self) -> bytes:
        """The 32-byte root to anchor on chain."""
        return self._levels[-1][0]

    @property
    def leaves(self) -> list[bytes]:
        """The leaf hashes, in the order given (a copy)."""
        return list(self._levels[0])

    def level(self, height: int) -> list[bytes]:
        """The nodes ``height`` levels above the leaves (a copy; past the top, ``[root]``).

        Node ``j`` there is the root of the tree over leaves ``j * 2**height`` up to
        ``(j + 1) * 2**height`` (fewer in the last): pairs never cross those bounds, and an
        odd last node is carried up the same way in the part as in the whole. So a proof can
        be put together from that part's tree and the tree over this level's nodes, which is
        how the broker answers proofs of old batches without rebuilding them."""
        if height < 0:
            raise ValueError(f"level height must be >= 0, got {height}")
        return list(self._levels[min(height, len(self._levels) - 1)])

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf ``index`` up to the root, for ``MerkleProof.verify``."""
        n = len(self._levels[0])
        if not -n <= index < n:
            raise IndexError(f"leaf index {index} out of range for {n} leaves")
        index %= n
        proof: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):  # else: odd last node, carried up with no sibling
                proof.append(level[sibling])
            index >>= 1
        return proof


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """OZ ``MerkleProof.processProof``: the root that ``proof`` leads to from ``leaf``."""
    node = _check_node(leaf, "leaf")
    for i, sibling in enumerate(proof):
        node = hash_pair(node, _check_node(sibling, f"proof element {i}"))
    return node


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """OZ ``MerkleProof.verify``: True if ``proof`` links ``leaf`` to ``root``.

    Malformed input (a node not 32 bytes) raises :class:`WireError` rather than
    returning False, since it cannot come from an honest broker.
    """
    return process_proof(leaf, proof) == _check_node(root, "root")
