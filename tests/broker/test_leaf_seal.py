"""A seal places its leaves in slices, one transaction each (:mod:`blendsm.broker._leaf_seal`):
leaf adds commit between slices, and a seal stopped half way never becomes a batch to anchor."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from blendsm.broker._anchor_records import LeafRow
from blendsm.broker._leaf_seal import SEAL_SLICE, SealPlan, hash_part
from blendsm.broker._leaf_store import AsyncLeafStore, LeafStore
from blendsm.device_sdk import MerkleTree, verify_proof
from blendsm.errors import StoreError

TOPIC = "sensors/berlin/temp"
DEVICE = bytes(19) + b"\x01"
N = 3 * SEAL_SLICE + 100


def _row(i: int) -> LeafRow:
    return LeafRow(TOPIC, DEVICE, i, i.to_bytes(32, "big"), b"env", 1.0 + i)


def _placed(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT count(*) FROM leaves WHERE batch_id IS NOT NULL").fetchone()
    db.close()
    return int(count)


def _proves_every_leaf(s: LeafStore, n: int, batch_id: int) -> None:
    whole = MerkleTree([i.to_bytes(32, "big") for i in range(1, n + 1)])
    s.mark_confirmed(batch_id, b"\x22" * 32, 1)
    for position in (0, SEAL_SLICE - 1, SEAL_SLICE, n - 1):
        p = s.proof_for(TOPIC, DEVICE, position + 1)
        assert p is not None
        assert (p.batch_id, p.index, list(p.proof)) == (batch_id, position, whole.proof(position))
        assert verify_proof(p.leaf, p.proof, whole.root)


def _planned_and_hashed(s: LeafStore) -> SealPlan:
    """N leaves stored and a seal of them chosen and hashed, nothing placed yet."""
    s.add_many([_row(i) for i in range(1, N + 1)])
    plan = s.plan_seal(N, 0, None, {})
    assert plan is not None
    while plan.tree is None:
        hash_part(plan)  # a chunk of leaves per job
    return plan


def test_a_seal_stopped_between_slices_is_undone_when_the_store_opens(tmp_path: Path) -> None:
    """The broker died after the first slice: the batch row and a slice of placed leaves are
    on disk. On open the batch is undone (it was never sent), so it is not anchored with
    leaves missing; the next seal takes every leaf again, under the same id."""
    path = tmp_path / "leaves.sqlite3"
    with LeafStore(path) as s:
        plan = _planned_and_hashed(s)
        s.place_slice(plan)  # then the process dies
        assert not plan.done
    assert _placed(path) == SEAL_SLICE
    with LeafStore(path) as s:
        assert s.open_batch() is None
        assert s.batches() == []
        assert s.pending()[0] == N
        batch = s.seal_batch(N)
        assert batch is not None
        assert (batch.batch_id, batch.leaf_count) == (plan.batch.batch_id, N)
        _proves_every_leaf(s, N, batch.batch_id)


def test_a_failed_slice_leaves_nothing_to_anchor_and_the_next_seal_starts_over(
    tmp_path: Path,
) -> None:
    """A slice that cannot place its leaves (one was taken meanwhile: never by an honest
    broker) raises and undoes the half-placed batch at once: never open for anchoring, its
    leaves pending again; the next seal takes them all."""
    path = tmp_path / "leaves.sqlite3"
    with LeafStore(path) as s:
        plan = _planned_and_hashed(s)
        s.place_slice(plan)
        assert s.open_batch() is None  # placing: not to be anchored yet
        s._db.execute(
            "INSERT INTO batches (batch_id, root, leaf_count, state, created_at, updated_at)"
            " VALUES (99, ?, 1, 'failed', 0, 0)",
            (b"\x01" * 32,),
        )
        s._db.execute("UPDATE leaves SET batch_id = 99, position = 0 WHERE leaf_index = ?", (N,))
        s.place_slice(plan)
        s.place_slice(plan)
        with pytest.raises(StoreError, match="still free"):
            s.place_slice(plan)  # the last slice holds leaf N
        assert s.open_batch() is None
        assert [b.batch_id for b in s.batches()] == [99]  # the half-placed one undone at once
        assert s.pending()[0] == N - 1  # its placed leaves are pending again, counted
        s._db.execute("UPDATE leaves SET batch_id = NULL, position = NULL WHERE batch_id = 99")
        batch = s.seal_batch(N)  # undoes the half-placed one first
        assert batch is not None
        assert batch.leaf_count == N
        assert [b.batch_id for b in s.batches() if b.state == "intent"] == [batch.batch_id]
        _proves_every_leaf(s, N, batch.batch_id)


async def test_a_leaf_add_commits_between_the_slices_of_a_seal(tmp_path: Path) -> None:
    """A QoS 1 message waits for its leaf to be durable: an add queued while a seal places
    its leaves commits after the slice in progress, not after the whole seal."""
    path = tmp_path / "leaves.sqlite3"
    store = await AsyncLeafStore.open(path)
    try:
        n = 40 * SEAL_SLICE
        await store._run(store._store.add_many, [_row(i) for i in range(1, n + 1)])
        seal = asyncio.create_task(store.seal_batch(n))
        for _ in range(20_000):  # bounded: about 10 s
            if _placed(path):
                break
            await asyncio.sleep(0.0005)
        assert 0 < _placed(path) < n  # placing
        assert await store.add(_row(n + 1))
        assert not seal.done()
        batch = await seal
        assert batch is not None
        assert batch.leaf_count == n
        assert await store.pending() == (1, pytest.approx(2.0 + n))
    finally:
        await store.close()
