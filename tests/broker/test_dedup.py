"""White-box tests of the duplicate-envelope window (blendsm.broker._dedup), the leaf store
queries that seed it, and its config field."""

from __future__ import annotations

from pathlib import Path

import pytest

from blendsm.broker import parse_config
from blendsm.broker._anchor_records import LeafRow
from blendsm.broker._dedup import WINDOW, DedupWindow
from blendsm.broker._leaf_store import AsyncLeafStore, LeafStore
from blendsm.errors import ConfigError

A = b"\xaa" * 20
B = b"\xbb" * 20


def test_each_sequence_is_admitted_once() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 5)
    assert not window.admit(A, "t", 5)
    assert window.admit(A, "t", 6)
    assert not window.admit(A, "t", 6)
    assert not window.admit(A, "t", 5)


def test_pairs_are_independent() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 1)
    assert window.admit(B, "t", 1)
    assert window.admit(A, "u", 1)
    assert not window.admit(B, "t", 1)
    assert len(window) == 3


def test_a_late_arrival_within_the_window_is_admitted_once() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 100)
    assert window.admit(A, "t", 100 + WINDOW - 1)  # 100 is now the oldest in the window
    assert window.admit(A, "t", 150)
    assert not window.admit(A, "t", 150)
    assert not window.admit(A, "t", 100)
    assert window.admit(A, "t", 101)
    assert not window.admit(A, "t", 101)


def test_older_than_the_window_is_refused_as_a_replay() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 10)
    assert window.admit(A, "t", 10 + WINDOW)  # 10 falls out
    assert not window.admit(A, "t", 10)
    assert window.admit(A, "t", 11)  # still inside, never seen


def test_a_jump_past_the_window_forgets_the_bits_but_not_the_mark() -> None:
    window = DedupWindow(10)
    for seq in range(1, 5):
        assert window.admit(A, "t", seq)
    assert window.admit(A, "t", 10_000)  # e.g. a device skipping a reserved block after a crash
    assert not window.admit(A, "t", 10_000)
    assert not window.admit(A, "t", 4)  # far below: refused
    assert window.admit(A, "t", 9_999)


def test_forget_lets_the_same_sequence_in_again() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 1)
    assert window.admit(A, "t", 2)
    window.forget(A, "t", 1)
    assert window.admit(A, "t", 1)
    assert not window.admit(A, "t", 1)
    assert not window.admit(A, "t", 2)
    window.forget(B, "t", 1)  # unknown pair: nothing to undo


def test_a_seed_refuses_everything_up_to_the_mark() -> None:
    window = DedupWindow(10)
    window.seed(A, "t", 50)
    assert not window.admit(A, "t", 50)
    assert not window.admit(A, "t", 49)
    assert not window.admit(A, "t", 1)
    assert window.admit(A, "t", 51)


def test_a_seed_merges_with_what_is_in_memory() -> None:
    window = DedupWindow(10)
    assert window.admit(A, "t", 60)
    window.seed(A, "t", 50)  # below the mark: 50 and under refused, 51..59 still open
    assert not window.admit(A, "t", 50)
    assert window.admit(A, "t", 55)
    assert not window.admit(A, "t", 60)
    window.seed(A, "t", 70)  # above: everything up to 70 refused
    assert not window.admit(A, "t", 65)
    assert window.admit(A, "t", 71)


def test_the_cap_evicts_the_least_recently_used_pair_and_marks_the_window_incomplete() -> None:
    window = DedupWindow(2)
    assert window.admit(A, "t", 1)
    assert window.admit(B, "t", 1)
    assert window.admit(A, "t", 2)  # A is now the most recent
    assert window.known(A, "u")  # nothing forgotten yet: an unknown pair is new
    assert window.admit(A, "u", 1)  # evicts (B, "t")
    assert len(window) == 2
    assert window.evicted == 1
    assert not window.complete
    assert not window.known(B, "t")  # must be looked up before admitting
    assert window.known(A, "t")
    assert not window.known(B, "new")


def test_seed_all_keeps_the_order_and_the_truncation() -> None:
    window = DedupWindow(5)
    window.seed_all([(A, "t", 3), (B, "t", 4)], truncated=False)
    assert window.complete
    assert not window.admit(B, "t", 4)
    assert window.admit(B, "t", 5)
    other = DedupWindow(5)
    other.seed_all([(A, "t", 3)], truncated=True)
    assert not other.complete
    assert not other.known(B, "t")


def test_max_pairs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pairs"):
        DedupWindow(0)


# --------------------------------------------------------------------------- leaf store seed


def _row(device: bytes, topic: str, sequence: int, n: int) -> LeafRow:
    return LeafRow(topic, device, sequence, n.to_bytes(32, "big"), b"envelope", 1.0 + n)


def test_leaf_store_gives_the_high_sequences_of_the_most_recent_pairs(tmp_path: Path) -> None:
    store = LeafStore(tmp_path / "leaves.sqlite3")
    try:
        assert store.high_sequences(10) == []
        assert store.high_sequence(A, "t") is None
        store.add_many(
            [
                _row(A, "t", 255, 1),
                _row(A, "t", 256, 2),  # big-endian blobs: 256 > 255
                _row(B, "t", 7, 3),
                _row(A, "u", 2**63, 4),
                _row(A, "t", 3, 5),  # (A, "t") stored most recently, its mark stays 256
            ]
        )
        assert store.high_sequences(10) == [(B, "t", 7), (A, "u", 2**63), (A, "t", 256)]
        assert store.high_sequences(2) == [(A, "u", 2**63), (A, "t", 256)]
        assert store.high_sequence(A, "t") == 256
        assert store.high_sequence(B, "t") == 7
        assert store.high_sequence(B, "u") is None
    finally:
        store.close()


async def test_async_leaf_store_answers_the_same(tmp_path: Path) -> None:
    store = await AsyncLeafStore.open(tmp_path / "leaves.sqlite3")
    try:
        store.add_nowait(_row(A, "t", 9, 1))  # queued: a look-up drains first
        await store.drain()
        assert await store.high_sequences(5) == [(A, "t", 9)]
        assert await store.high_sequence(A, "t") == 9
    finally:
        await store.close()


# --------------------------------------------------------------------------- config


def test_config_field_default_and_validation() -> None:
    assert parse_config({}).payments.dedup_max_pairs == 100_000
    parsed = parse_config({"payments": {"dedup_max_pairs": 3}})
    assert parsed.payments.dedup_max_pairs == 3
    with pytest.raises(ConfigError, match=r"payments.dedup_max_pairs: must be >= 1, got 0"):
        parse_config({"payments": {"dedup_max_pairs": 0}})
    with pytest.raises(ConfigError, match=r"payments.dedup_max_pairs: must be int"):
        parse_config({"payments": {"dedup_max_pairs": "many"}})
