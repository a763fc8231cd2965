"""The leaf store's ``handed`` flag: whether a stored leaf's message reached the fan-out, so a
device's re-send of one that never did is delivered (``blendsm.broker._handoff``). On disk,
across a close, and upgraded from a schema 1 file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from blendsm.broker._anchor_records import LeafRow
from blendsm.broker._leaf_schema import SCHEMA_V1
from blendsm.broker._leaf_store import (
    APPLICATION_ID,
    MARK_LINGER,
    SCHEMA_VERSION,
    AsyncLeafStore,
    LeafStore,
)

A = b"\xaa" * 20


def _row(sequence: int) -> LeafRow:
    return LeafRow("t", A, sequence, sequence.to_bytes(32, "big"), b"envelope", float(sequence))


def _leaf(sequence: int) -> bytes:
    return sequence.to_bytes(32, "big")


def test_a_leaf_is_stored_not_handed_marked_later_and_a_start_counts_the_rest_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "leaves.sqlite3"
    with LeafStore(path) as store:
        store.add_many([_row(1), _row(2), _row(3)])
        assert [store.handed_state(_leaf(i)) for i in (1, 2, 3)] == [0, 0, 0]
        assert store.handed_state(_leaf(4)) is None  # not stored
        store.mark_handed([_leaf(1), _leaf(3)])
        store.add_many([_row(1)])  # a copy stored again does not reset its flag
        assert [store.handed_state(_leaf(i)) for i in (1, 2, 3)] == [1, 0, 1]
    with LeafStore(path) as store:  # a restart: 2 was never handed on
        assert store.report_unhanded() == 1
        assert store.handed_state(_leaf(2)) == 2  # still deliverable, counted once
        assert store.report_unhanded() == 0
        store.mark_handed([_leaf(2)])  # its device re-sent it: delivered now
        assert store.handed_state(_leaf(2)) == 1
        before = store.commits
        store.add_many([_row(4), _row(5)], handed=[_leaf(4)])  # marks ride with the rows
        assert store.commits - before == 1
        assert [store.handed_state(_leaf(i)) for i in (4, 5)] == [1, 0]


def test_a_schema_1_file_is_upgraded_and_its_leaves_count_as_handed_on(tmp_path: Path) -> None:
    path = tmp_path / "leaves.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V1)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA user_version=1")
        db.execute(
            "INSERT INTO leaves (topic, device, sequence, leaf, envelope, received_at)"
            " VALUES ('t', ?, ?, ?, x'00', 1.0)",
            (A, (1).to_bytes(8, "big"), _leaf(1)),
        )
    db.close()
    with LeafStore(path) as store:
        assert store.handed_state(_leaf(1)) == 1
        assert store.report_unhanded() == 0
        store.add_many([_row(2)])
        assert store.handed_state(_leaf(2)) == 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    db.close()


async def test_marks_follow_their_rows_commit_within_the_linger_and_at_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "leaves.sqlite3"
    store = await AsyncLeafStore.open(path)
    try:
        store.add_nowait(_row(1))  # a QoS 0 leaf, still lingering: its row goes first
        store.mark_handed_soon([_leaf(1)])
        for _ in range(int(5 / MARK_LINGER)):  # committed within the linger, not only at close
            if await store.handed_state(_leaf(1)) == 1:
                break
            await asyncio.sleep(MARK_LINGER)
        assert await store.handed_state(_leaf(1)) == 1
        store.add_nowait(_row(2))
        store.mark_handed_soon([_leaf(2)])  # then the broker stops
    finally:
        await store.close()
    with LeafStore(path) as blocking:
        assert blocking.handed_state(_leaf(2)) == 1
        assert blocking.report_unhanded() == 0
