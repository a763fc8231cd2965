"""Sealing a batch: which leaves a root covers, its tree, and their places, written in slices.

Why slices: a seal sets every covered leaf's batch and position, about 3-4 us a leaf (0.44 s
for a 100,000-leaf root), on the leaf store's one thread, where every leaf add waits. A QoS 1
market message is delivered and acknowledged only once its leaf is durable, so in one
transaction each root stalled every QoS 1 publisher for the whole seal. Now the leaves are
chosen (reads, no transaction, :data:`READ_PAGE` rows per job) and hashed first, then placed :data:`SEAL_SLICE` at a time, one
transaction each; the async store runs each slice as its own job on the thread, so the leaf
adds queued meanwhile commit between two slices. The tree is built the same way, a chunk of
1,024 leaves per job (:meth:`~blendsm.device_sdk.MerkleTree.joined` puts them together): what
a leaf add waits for is one chunk or one slice, about 1-2 ms, not the whole seal.

Why it is still write-ahead: the first slice's transaction also writes the batch row (id,
root, leaf count, chunk roots) in state ``intent``, and nothing is signed before the last
slice committed (the anchorer awaits the whole seal). A seal that stopped between two slices
(the broker died, a write failed) left a batch with fewer placed leaves than its count. It
was never sent, so it is undone: its leaves go back to the pool and its row is deleted (at
once after a failed write, when the store opens after a death, and by the next seal if
neither could: :func:`undo_unfinished`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar, cast

from blendsm.broker._anchor_records import Batch
from blendsm.broker._durable import let_the_loop_in
from blendsm.broker._leaf_proofs import CHUNK_LEAVES, CHUNK_LEVEL, chunk_roots
from blendsm.device_sdk import MerkleTree
from blendsm.errors import StoreError

__all__ = [
    "READ_PAGE",
    "SEAL_SLICE",
    "SealPlan",
    "hash_part",
    "place_slice",
    "plan_steps",
    "run_steps",
    "step",
    "undo_unfinished",
]

SEAL_SLICE: Final = 512
"""Leaves placed per transaction of a seal: about 2 ms, then the queued leaf adds commit."""
READ_PAGE: Final = 2048
"""Leaf rows a seal reads per step while it chooses them: about 2 ms."""

_R = TypeVar("_R")

_INT63: Final = 2**63 - 1


@dataclass(slots=True)
class SealPlan:
    """A batch chosen, being hashed, then placed: ``rows`` are (leaf_index, leaf) in position
    order; ``parts`` the trees of its first chunks of :data:`CHUNK_LEAVES` leaves hashed so
    far, ``tree`` the whole tree once they all are; ``placed`` how many leaves are written."""

    batch_id: int
    at: float
    rows: list[tuple[int, bytes]]
    more_sold: bool
    run: bool
    """The rows are one run of leaf indexes: placed by range, not row by row."""
    parts: list[MerkleTree] = field(default_factory=list)
    tree: MerkleTree | None = None
    placed: int = 0

    @property
    def batch(self) -> Batch:
        """The batch as its row is written (its tree must be built)."""
        if self.tree is None:
            raise StoreError(f"seal of batch {self.batch_id}: its tree is not built yet")
        return Batch(self.batch_id, self.tree.root, len(self.rows), "intent", None, self.at)

    @property
    def done(self) -> bool:
        return self.placed >= len(self.rows)


def plan_steps(
    db: sqlite3.Connection,
    max_leaves: int,
    chain_latest: int,
    at: float,
    sold: Mapping[str, float],
) -> Generator[None, None, SealPlan | None]:
    """Choose the next batch's leaves (sold ones first: those of topic ``t`` received at or
    before ``sold[t]``, oldest first; the room left to the oldest others); its plan, or None
    if no leaf is pending. Reads only, :data:`READ_PAGE` rows at a time: the generator stops
    after each page (run each step as a job of its own, :func:`run_steps` for all at once).
    Refused while a batch is open."""
    if max_leaves < 1:
        raise StoreError("seal_batch: max_leaves must be >= 1")
    if db.execute("SELECT 1 FROM batches WHERE state IN ('intent', 'sent') LIMIT 1").fetchone():
        raise StoreError("seal_batch: a batch is still open; resolve it first")
    chosen: list[tuple[int, bytes]] = []
    for topic, until in sold.items():
        after, wanted = -1, max_leaves + 1
        while wanted:
            page = db.execute(
                "SELECT leaf_index, leaf FROM leaves WHERE topic = ? AND batch_id IS NULL"
                " AND received_at <= ? AND leaf_index > ? ORDER BY leaf_index LIMIT ?",
                (topic, until, after, min(READ_PAGE, wanted)),
            ).fetchall()
            chosen += page
            if len(page) < min(READ_PAGE, wanted):
                break
            wanted -= len(page)
            after = page[-1][0]
            yield
        if len(chosen) > 2 * (max_leaves + 1):  # memory: keep the oldest max + 1
            chosen.sort()
            del chosen[max_leaves + 1 :]
    chosen.sort()
    more_sold = len(chosen) > max_leaves
    rows = chosen[:max_leaves]
    if len(rows) < max_leaves:
        taken = {r[0] for r in rows}
        others: list[tuple[int, bytes]] = []
        after = -1
        while len(rows) + len(others) < max_leaves:
            yield
            page = db.execute(
                "SELECT leaf_index, leaf FROM leaves WHERE batch_id IS NULL AND leaf_index > ?"
                " ORDER BY leaf_index LIMIT ?",
                (after, READ_PAGE),
            ).fetchall()
            others += [r for r in page if r[0] not in taken]
            if len(page) < READ_PAGE:
                break
            after = page[-1][0]
        rows += others[: max_leaves - len(rows)]
        rows.sort()
    if not rows:
        return None
    last = int(db.execute("SELECT coalesce(max(batch_id), 0) FROM batches").fetchone()[0])
    batch_id = max(last, chain_latest) + 1
    if batch_id > _INT63:
        raise StoreError(f"seal_batch: batch id {batch_id} does not fit the store")
    run = rows[-1][0] - rows[0][0] + 1 == len(rows)  # sorted and distinct: one run of indexes
    return SealPlan(batch_id, at, rows, more_sold, run)


def run_steps(steps: Generator[None, None, _R]) -> _R:
    """Run a step generator to its end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return cast(_R, end.value)


def step(steps: Generator[None, None, _R]) -> tuple[bool, _R | None]:
    """One step of a step generator: (True, its result) once it ended, else (False, None)."""
    try:
        next(steps)
    except StopIteration as end:
        return True, cast(_R, end.value)
    return False, None


def hash_part(plan: SealPlan) -> None:
    """Hash the plan's next chunk of :data:`CHUNK_LEAVES` leaves (about 1 ms); after the last,
    join the parts into the batch's tree (:meth:`MerkleTree.joined`). No store access."""
    start = len(plan.parts) * CHUNK_LEAVES
    chunk = plan.rows[start : start + CHUNK_LEAVES]
    plan.parts.append(MerkleTree([r[1] for r in chunk], pause=let_the_loop_in))
    if start + len(chunk) >= len(plan.rows):
        plan.tree = MerkleTree.joined(plan.parts, CHUNK_LEVEL)
        plan.parts = []


def place_slice(db: sqlite3.Connection, plan: SealPlan) -> None:
    """Write the next :data:`SEAL_SLICE` leaves' batch and position (and, first, the batch
    row); run inside one write transaction, once the tree is built. StoreError if a leaf was
    taken meanwhile."""
    batch = plan.batch  # StoreError while the tree is not built
    tree = cast(MerkleTree, plan.tree)  # built: plan.batch raised otherwise
    if plan.placed == 0:
        db.execute(
            "INSERT INTO batches"
            " (batch_id, root, leaf_count, state, created_at, updated_at, chunk_roots)"
            " VALUES (?, ?, ?, 'intent', ?, ?, ?)",
            (
                batch.batch_id,
                batch.root,
                batch.leaf_count,
                batch.created_at,
                batch.created_at,
                chunk_roots(tree),
            ),
        )
    start = plan.placed
    part = plan.rows[start : start + SEAL_SLICE]
    if plan.run:  # a range UPDATE takes half the time of one per row
        first = plan.rows[0][0]
        placed = db.execute(
            "UPDATE leaves SET batch_id = ?, position = leaf_index - ?"
            " WHERE leaf_index BETWEEN ? AND ? AND batch_id IS NULL",
            (batch.batch_id, first, part[0][0], part[-1][0]),
        ).rowcount
    else:
        cursor = db.executemany(
            "UPDATE leaves SET batch_id = ?, position = ? WHERE leaf_index = ?"
            " AND batch_id IS NULL",
            [(batch.batch_id, start + i, r[0]) for i, r in enumerate(part)],
        )
        placed = cursor.rowcount
    if placed != len(part):
        raise StoreError(
            f"seal of batch {batch.batch_id}: {placed} of {len(part)} leaves were still free"
        )
    plan.placed = start + len(part)


def undo_unfinished(db: sqlite3.Connection) -> int | None:
    """Undo a seal that did not place all its leaves (run inside a write transaction): the
    open batch whose placed leaves fall short of its count gets its leaves back in the pool
    and its row deleted. Its id, or None if there was none."""
    row = db.execute(
        "SELECT batch_id, leaf_count FROM batches WHERE state = 'intent' ORDER BY batch_id LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    batch_id, count = row
    placed = db.execute("SELECT count(*) FROM leaves WHERE batch_id = ?", (batch_id,)).fetchone()
    if placed[0] == count:
        return None
    db.execute("UPDATE leaves SET batch_id = NULL, position = NULL WHERE batch_id = ?", (batch_id,))
    db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
    return int(batch_id)
