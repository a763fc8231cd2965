"""The leaf store: message leaves and sealed batches, durable in one SQLite file.

Durability rules this module enforces (the same patterns as the voucher store,
:mod:`blendsm.broker._store`; see :mod:`blendsm.broker._anchors` for the whole protocol):

* A leaf is on disk before :meth:`AsyncLeafStore.add` returns (``journal_mode=WAL``,
  ``synchronous=FULL``): the broker awaits it before it PUBACKs a QoS 1 publish. QoS 0
  leaves go through :meth:`AsyncLeafStore.add_nowait`, into the same group commit, not
  awaited. Concurrent adds share one transaction (one fsync), each caller resuming once its
  own row is durable.
* A batch is sealed write-ahead: its leaves are chosen and hashed, then the batch row (root,
  leaf count) is written in state ``intent`` with the first slice of leaves' batch id and
  positions, and the other slices follow, each its own transaction, all before any
  transaction is signed (:mod:`blendsm.broker._leaf_seal`, which says why slices and how a
  seal stopped half way is undone). So a batch never gets other leaves and its id and root
  never change once it is anchored.
* At most one batch is open (``intent`` or ``sent``) at a time.
* A leaf is stored ``handed = 0``, set to 1 (lazily) once its message reached the fan-out,
  so a re-send of one never handed on is delivered (:mod:`blendsm.broker._handoff`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from blendsm.broker._anchor_records import Batch, LeafRow, ProofRecord
from blendsm.broker._durable import (
    AsyncDurableStore,
    GroupCommit,
    open_on_worker,
)
from blendsm.broker._leaf_proofs import LeafProofs
from blendsm.broker._leaf_schema import (
    APPLICATION_ID,
    SCHEMA_V1,
    SCHEMA_VERSION,
    V1_TO_V2,
    V2_TO_V3,
)
from blendsm.broker._leaf_seal import (
    SealPlan,
    hash_part,
    place_slice,
    plan_steps,
    run_steps,
    step,
    undo_unfinished,
)
from blendsm.broker._sqlite import DurableStore
from blendsm.broker._tree_cache import TreeCache

__all__ = [
    "APPLICATION_ID",
    "NOWAIT_GROUP",
    "NOWAIT_LINGER",
    "SCHEMA_VERSION",
    "AsyncLeafStore",
    "LeafStore",
]

_OPEN_STATES = ("intent", "sent")

_MARK = "UPDATE leaves SET handed = 1 WHERE leaf = ?"


class LeafStore(DurableStore):
    """Blocking leaf and batch store (one SQLite file); use it from one thread (the async
    facade guarantees that)."""

    _STATE_TABLE = "batches"
    _STATE_KEY = "batch_id"
    _STATE_NOUN = "batch"

    def __init__(
        self, path: str | Path, *, tree_cache: int = 8, tree_cache_leaves: int = 1 << 18
    ) -> None:
        super().__init__(
            path,
            kind="leaf store",
            application_id=APPLICATION_ID,
            schema_version=SCHEMA_VERSION,
            schema=SCHEMA_V1 + V1_TO_V2 + V2_TO_V3,
            migrations={1: V1_TO_V2, 2: V2_TO_V3},
        )
        # Added after schema 1 shipped; idempotent, and older brokers ignore it: the sold
        # leaves of one topic are found without scanning every unsold leaf before them.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS leaves_unbatched_by_topic"
            " ON leaves (topic, leaf_index) WHERE batch_id IS NULL"
        )
        self.proofs = LeafProofs(self._db, self._write, TreeCache(tree_cache, tree_cache_leaves))
        """Proofs of anchored messages, and the recent batches' trees they come from."""
        self._sealing: SealPlan | None = None  # a seal placing its leaves, or stopped doing so
        undone = self._write(lambda: undo_unfinished(self._db))
        if undone is not None:
            logging.getLogger("blendsm.broker.anchors").warning(
                "anchors: batch %d was sealed only in part (the broker stopped during its"
                " seal): undone, its leaves are pending again",
                undone,
            )

    # -- leaves --------------------------------------------------------------

    def add_many(self, rows: Sequence[LeafRow], handed: Sequence[bytes] = ()) -> list[bool]:
        """Store every row in ONE transaction (one fsync); per row, True if it was new
        (a leaf already stored, e.g. a QoS 1 retransmission, is kept once). ``handed``
        leaves are marked handed on in the same transaction: a new row of this group is
        stored marked (its mark usually rides with it), the others are updated."""
        for row in rows:
            row.check()
        if not rows:
            return []

        def body() -> list[bool]:
            marked = set(handed)
            new: list[bool] = []
            for r in rows:
                stored = (
                    self._db.execute(
                        "INSERT INTO leaves"
                        " (topic, device, sequence, leaf, envelope, received_at, handed)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (leaf) DO NOTHING",
                        (
                            r.topic,
                            r.device,
                            r.sequence.to_bytes(8, "big"),
                            r.leaf,
                            r.envelope,
                            r.received_at,
                            1 if r.leaf in marked else 0,
                        ),
                    ).rowcount
                    == 1
                )
                new.append(stored)
                if stored:
                    marked.discard(r.leaf)
            if marked:  # rows of earlier groups, or already stored
                self._db.executemany(_MARK, [(leaf,) for leaf in marked])
            return new

        return self._write(body)

    def mark_handed(self, leaves: Sequence[bytes]) -> None:
        """These leaves' messages were handed to the fan-out (one transaction)."""
        self._write(lambda: self._db.executemany(_MARK, [(leaf,) for leaf in leaves]))

    def handed_state(self, leaf: bytes) -> int | None:
        """``leaves.handed`` of ``leaf`` (0 or 2: never handed on; 1: handed on), None if it
        is not stored."""
        row = self._db.execute("SELECT handed FROM leaves WHERE leaf = ?", (leaf,)).fetchone()
        return None if row is None else int(row[0])

    def report_unhanded(self) -> int:
        """At a start: how many leaves an earlier run stored and never handed on (left at 0,
        e.g. killed in between); they are set to 2 so each is counted once."""
        return int(
            self._write(
                lambda: self._db.execute("UPDATE leaves SET handed = 2 WHERE handed = 0").rowcount
            )
        )

    def pending(self) -> tuple[int, float | None]:
        """``(count, received_at of the oldest)`` of the leaves not in any batch yet."""
        count, oldest = self._db.execute(
            "SELECT count(*), min(received_at) FROM leaves WHERE batch_id IS NULL"
        ).fetchone()
        return int(count), oldest

    def pending_by_topic(self) -> dict[str, int]:
        """Leaves not in any batch yet, counted per topic (one scan of the unbatched index)."""
        rows = self._db.execute(
            "SELECT topic, count(*) FROM leaves WHERE batch_id IS NULL GROUP BY topic"
        ).fetchall()
        return {t: int(n) for t, n in rows}

    def leaf_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM leaves").fetchone()[0])

    def high_sequences(self, limit: int) -> list[tuple[bytes, str, int]]:
        """``(device, topic, highest sequence)`` of the ``limit`` (device, topic) pairs stored
        most recently, least recent first: the broker's duplicate window at start-up (one
        scan). Big-endian 8-byte blobs compare like the numbers they hold."""
        rows = self._db.execute(
            "SELECT device, topic, max(sequence), max(leaf_index) AS last FROM leaves"
            " GROUP BY device, topic ORDER BY last DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(bytes(d), t, int.from_bytes(s, "big")) for d, t, s, _ in reversed(rows)]

    def high_sequence(self, device: bytes, topic: str) -> int | None:
        """The highest sequence stored for ``device`` on ``topic``, None if none."""
        row = self._db.execute(
            "SELECT sequence FROM leaves WHERE topic = ? AND device = ?"
            " ORDER BY sequence DESC LIMIT 1",
            (topic, device),
        ).fetchone()
        return None if row is None else int.from_bytes(row[0], "big")

    # -- batches -------------------------------------------------------------

    def open_batch(self) -> Batch | None:
        """The batch in state ``intent`` or ``sent``, if any (at most one exists); not one
        whose seal is still placing its leaves, or stopped doing so (never anchored)."""
        row = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " WHERE state IN ('intent', 'sent') ORDER BY batch_id LIMIT 1"
        ).fetchone()
        if row is None or (self._sealing is not None and row[0] == self._sealing.batch_id):
            return None
        return Batch(*row)

    def batch(self, batch_id: int) -> Batch | None:
        row = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " WHERE batch_id = ?",
            (batch_id,),
        ).fetchone()
        return None if row is None else Batch(*row)

    def batches(self) -> list[Batch]:
        """Every batch, in id order (for audits and tests)."""
        rows = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " ORDER BY batch_id"
        ).fetchall()
        return [Batch(*r) for r in rows]

    def last_batch_id(self) -> int:
        """The highest batch id ever sealed here (failed ones included), 0 if none."""
        return int(self._db.execute("SELECT coalesce(max(batch_id), 0) FROM batches").fetchone()[0])

    def seal_times(self, limit: int) -> list[float]:
        """When the last ``limit`` batches were sealed (any state), newest first: the
        anchorer's hourly root budget survives a restart."""
        rows = self._db.execute(
            "SELECT created_at FROM batches ORDER BY batch_id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [float(r[0]) for r in rows]

    def seal_batch(
        self, max_leaves: int, chain_latest: int = 0, now: float | None = None
    ) -> Batch | None:
        """Seal the oldest unbatched leaves (at most ``max_leaves``) into a new batch, or
        None if there are none. Its id is ``max(last local id, chain_latest) + 1``
        (``chain_latest`` is the operator's ``latestBatchId`` on chain). Write-ahead: the
        batch row (state ``intent``) and every leaf's batch id and position commit together,
        before anything is sent. Refused (StoreError) while another batch is open."""
        return self.seal_sold_first(max_leaves, chain_latest, now, {})[0]

    def seal_sold_first(
        self,
        max_leaves: int,
        chain_latest: int,
        now: float | None,
        sold: Mapping[str, float],
    ) -> tuple[Batch | None, bool]:
        """:meth:`seal_batch`, but the leaves of sold topics go first: those of topic ``t``
        received at or before ``sold[t]`` (its last delivery), oldest first; the room left
        takes the oldest other leaves (a root costs the same gas however many it covers).
        Also says whether sold leaves were left out (the batch was full of them). All slices
        at once here; the async store lets leaf adds in between (:mod:`._leaf_seal`)."""
        plan = self.plan_seal(max_leaves, chain_latest, now, sold)
        if plan is None:
            return None, False
        while plan.tree is None:
            hash_part(plan)
        while not plan.done:
            self.place_slice(plan)
        return plan.batch, plan.more_sold

    def plan_steps(
        self,
        max_leaves: int,
        chain_latest: int,
        now: float | None,
        sold: Mapping[str, float],
    ) -> Generator[None, None, SealPlan | None]:
        """The steps that choose the next batch's leaves (:func:`._leaf_seal.plan_steps`),
        nothing written; run them on this store's thread. A seal this store left unfinished
        (a slice failed, or was never run) is undone first."""
        if self._sealing is not None:
            self._write(lambda: undo_unfinished(self._db))
            self._sealing = None
        at = time.time() if now is None else now
        return plan_steps(self._db, max_leaves, chain_latest, at, sold)

    def plan_seal(
        self,
        max_leaves: int,
        chain_latest: int,
        now: float | None,
        sold: Mapping[str, float],
    ) -> SealPlan | None:
        """The next batch chosen, nothing hashed or written yet (None: no leaf pending)."""
        return run_steps(self.plan_steps(max_leaves, chain_latest, now, sold))

    def place_slice(self, plan: SealPlan) -> None:
        """Place the plan's next slice of leaves in one transaction (the first also writes
        the batch row); the batch is open for anchoring once the last one committed. A slice
        that fails undoes the whole seal at once, so its placed leaves are pending again
        (counted, and sealed by the next root) rather than parked until the next seal or
        start; if the undo fails too, those two do it."""
        self._sealing = plan
        try:
            self._write(lambda: place_slice(self._db, plan))
        except Exception:
            try:
                self._write(lambda: undo_unfinished(self._db))
                self._sealing = None
            except Exception as undo:  # the next seal or the next open undoes it
                logging.getLogger("blendsm.broker.anchors").error(
                    "anchors: batch %d: undoing a failed seal failed: %r", plan.batch_id, undo
                )
            raise
        if plan.done and plan.tree is not None:
            self._sealing = None
            self.trees.put(plan.batch_id, plan.tree)

    def mark_sent(self, batch_id: int, tx_hash: bytes) -> None:
        """The anchor transaction is about to be broadcast as ``tx_hash`` (write-ahead).
        Valid again from ``sent`` (a resend after reconciling signs a new transaction)."""
        self._write(lambda: self._move(batch_id, _OPEN_STATES, "sent", "tx_hash = ?", (tx_hash,)))

    def mark_confirmed(
        self,
        batch_id: int,
        tx_hash: bytes | None,
        block_number: int | None,
        gas_used: int | None = None,
    ) -> None:
        """The batch's root is on chain (deep enough); its proofs may be handed out."""
        self._write(
            lambda: self._move(
                batch_id,
                (*_OPEN_STATES, "confirmed"),
                "confirmed",
                "tx_hash = coalesce(?, tx_hash), block_number = ?, gas_used = ?, error = NULL",
                (tx_hash, block_number, gas_used),
            )
        )

    def mark_failed(self, batch_id: int, error: str) -> None:
        """The batch id cannot carry this root on chain (taken by another root, or passed):
        fail it and return its leaves to the pool, to be sealed into a new batch."""

        def body() -> None:
            self._move(batch_id, _OPEN_STATES, "failed", "error = ?", (error,))
            self._db.execute(
                "UPDATE leaves SET batch_id = NULL, position = NULL WHERE batch_id = ?",
                (batch_id,),
            )
            self.trees.forget(batch_id)

        self._write(body)

    # -- proofs (:mod:`blendsm.broker._leaf_proofs`) -----------------------------

    @property
    def trees(self) -> TreeCache:
        """Recent batches' trees, for proofs (bounded by trees and by leaves)."""
        return self.proofs.trees

    def proof_for(self, topic: str, device: bytes | None, sequence: int) -> ProofRecord | None:
        """The proof of the message ``sequence`` on ``topic`` (by ``device`` if given, else
        the first such message stored), None unless it is in a confirmed batch."""
        return self.proofs.proof_for(topic, device, sequence)

    def proof_for_leaf(self, leaf: bytes) -> ProofRecord | None:
        """The proof of the message whose leaf hash is ``leaf``, None unless anchored."""
        return self.proofs.proof_for_leaf(leaf)


# --------------------------------------------------------------------------- async facade

NOWAIT_LINGER: Final = 0.02
"""Seconds QoS 0 leaves (``add_nowait``) may wait to share a commit: the profile in
docs/benchmarks.md found about 1.5 leaves per fsync without it. A crash can lose that window of
QoS 0 leaves, which ``add_nowait`` never promised to keep."""
NOWAIT_GROUP: Final = 256
"""Queued leaves that commit at once, lingering or not."""
MARK_LINGER: Final = 0.05
"""Seconds handed-on marks wait for a leaves' commit to ride with (then commit on their own)."""


class AsyncLeafStore(AsyncDurableStore[LeafStore]):
    """Asyncio facade: every call runs on one dedicated thread that owns the connection;
    :meth:`add` group-commits (concurrent adds share one transaction)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        store: LeafStore,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(executor, store)
        self.log = logger or logging.getLogger("blendsm.broker.anchors")
        self._adds: GroupCommit[LeafRow, bool] = GroupCommit(
            self._commit_adds,
            task_name="blendsm-leaves-group-commit",
            linger=NOWAIT_LINGER,
            group_size=NOWAIT_GROUP,
            on_committed=self._committed,
            on_lost=self._lost,
        )
        self.on_durable: Callable[[int], None] | None = None
        """Called on the loop with the number of NEW leaves after each group commit."""
        self._marks: list[bytes] = []  # handed-on marks: they ride with the next leaves' commit
        self._marking: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | Path, logger: logging.Logger | None = None) -> AsyncLeafStore:
        executor, store = await open_on_worker(lambda: LeafStore(path), "blendsm-leaves")
        return cls(executor, store, logger)

    @property
    def linger(self) -> float:
        """Seconds a group of only not-awaited (QoS 0) leaves may wait for more before its
        commit; an awaited add or ``NOWAIT_GROUP`` queued leaves commit at once."""
        return self._adds.linger

    @linger.setter
    def linger(self, seconds: float) -> None:
        self._adds.linger = seconds

    @property
    def lost(self) -> int:
        """Not-awaited (QoS 0) leaves whose transaction failed; logged, counted here."""
        return self._adds.lost

    async def add(self, row: LeafRow) -> bool:
        """Store ``row``; returns once the transaction holding it committed (True if new)."""
        row.check()  # bad input fails its caller alone, not a group
        return await self._adds.add(row)

    def add_nowait(self, row: LeafRow) -> None:
        """Queue ``row`` for the next group commit without waiting (call on the loop)."""
        row.check()
        self._adds.add_nowait(row)

    def _committed(self, results: list[bool]) -> None:
        if self.on_durable is not None:
            self.on_durable(sum(results))

    def _lost(self, group: int, exc: Exception) -> None:
        self.log.error("anchors: could not store %d leaves: %s", group, exc)

    async def drain(self) -> None:
        """Commit every queued add now (no lingering) and wait for it (or its failure)."""
        await self._adds.drain()

    def mark_handed_soon(self, leaves: Sequence[bytes]) -> None:
        """Record that ``leaves`` were handed on: in the next leaves' commit, or on their
        own within :data:`MARK_LINGER` (not awaited)."""
        self._marks += leaves
        if self._marking is None or self._marking.done():
            self._marking = asyncio.get_running_loop().create_task(
                self._mark_later(), name="blendsm-leaves-handed"
            )

    async def _commit_adds(self, rows: list[LeafRow]) -> list[bool]:
        marks, self._marks = self._marks, []  # their rows are in this group or committed
        return await self._run(self._store.add_many, rows, marks)

    async def _mark_later(self, delay: float = MARK_LINGER) -> None:
        await asyncio.sleep(delay)
        await self.drain()  # queued leaves (a QoS 0 one may linger) take the marks along
        if self._adds.pending:
            # Leaves queued since the drain: a mark left may be for one of them, so the
            # marks ride with their commit (``_commit_adds``), due within the linger.
            return
        await self._write_marks()

    async def _write_marks(self) -> None:
        """Write the marks left (every leaf queued so far is committed)."""
        marks, self._marks = self._marks, []
        if marks:
            try:
                await self._run(self._store.mark_handed, marks)
            except Exception as exc:  # a lost mark: one re-send may be delivered again
                self.log.error("anchors: could not mark %d leaves handed on: %s", len(marks), exc)

    async def _finish_writes(self) -> None:
        if self._marking is not None:
            self._marking.cancel()
        await self._adds.drain_all()
        await self._write_marks()

    async def handed_state(self, leaf: bytes) -> int | None:
        return await self._run(self._store.handed_state, leaf)

    async def report_unhanded(self) -> int:
        return await self._run(self._store.report_unhanded)

    async def add_many(self, rows: Sequence[LeafRow]) -> list[bool]:
        return await self._run(self._store.add_many, list(rows))

    async def pending(self) -> tuple[int, float | None]:
        return await self._run(self._store.pending)

    async def leaf_count(self) -> int:
        return await self._run(self._store.leaf_count)

    async def pending_by_topic(self) -> dict[str, int]:
        return await self._run(self._store.pending_by_topic)

    async def seal_times(self, limit: int) -> list[float]:
        return await self._run(self._store.seal_times, limit)

    async def seal_sold_first(
        self, max_leaves: int, chain_latest: int, now: float | None, sold: Mapping[str, float]
    ) -> tuple[Batch | None, bool]:
        """The blocking seal, a job per slice on the store's thread: the leaf adds queued
        meanwhile (QoS 1 messages wait for theirs) commit between two slices."""
        store = self._store
        steps = await self._run(store.plan_steps, max_leaves, chain_latest, now, sold)
        while not (stepped := await self._run(step, steps))[0]:
            pass
        plan = stepped[1]
        if plan is None:
            return None, False
        while plan.tree is None:
            await self._run(hash_part, plan)
        while not plan.done:
            await self._run(store.place_slice, plan)
        return plan.batch, plan.more_sold

    async def high_sequences(self, limit: int) -> list[tuple[bytes, str, int]]:
        return await self._run(self._store.high_sequences, limit)

    async def high_sequence(self, device: bytes, topic: str) -> int | None:
        return await self._run(self._store.high_sequence, device, topic)

    async def open_batch(self) -> Batch | None:
        return await self._run(self._store.open_batch)

    async def batch(self, batch_id: int) -> Batch | None:
        return await self._run(self._store.batch, batch_id)

    async def batches(self) -> list[Batch]:
        return await self._run(self._store.batches)

    async def last_batch_id(self) -> int:
        return await self._run(self._store.last_batch_id)

    async def seal_batch(
        self, max_leaves: int, chain_latest: int = 0, now: float | None = None
    ) -> Batch | None:
        return (await self.seal_sold_first(max_leaves, chain_latest, now, {}))[0]

    async def mark_sent(self, batch_id: int, tx_hash: bytes) -> None:
        await self._run(self._store.mark_sent, batch_id, tx_hash)

    async def mark_confirmed(
        self,
        batch_id: int,
        tx_hash: bytes | None,
        block_number: int | None,
        gas_used: int | None = None,
    ) -> None:
        await self._run(self._store.mark_confirmed, batch_id, tx_hash, block_number, gas_used)

    async def mark_failed(self, batch_id: int, error: str) -> None:
        await self._run(self._store.mark_failed, batch_id, error)

    async def proof_for(
        self, topic: str, device: bytes | None, sequence: int
    ) -> ProofRecord | None:
        return await self._run(self._store.proof_for, topic, device, sequence)

    async def proof_for_leaf(self, leaf: bytes) -> ProofRecord | None:
        return await self._run(self._store.proof_for_leaf, leaf)
