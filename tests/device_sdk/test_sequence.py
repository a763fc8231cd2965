"""Crash-safe per-topic sequence numbers (block reservations, never reused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blendsm.device_sdk._sequence import SequenceAllocator
from blendsm.errors import ConfigError, StoreError

DEVICE = "0x" + "ab" * 20


def test_per_topic_increasing_and_reserved_ahead(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    seq = SequenceAllocator(path, DEVICE, block=4)
    assert [seq.next("a") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert seq.next("b") == 1
    # Written ahead: every number handed out is below its topic's reservation.
    assert json.loads(path.read_text())["reserved"] == {"a": 9, "b": 5}


def test_restart_without_close_skips_but_never_reuses(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    first = SequenceAllocator(path, DEVICE, block=4)
    used = [first.next("t") for _ in range(6)]  # "crash": no close()
    second = SequenceAllocator(path, DEVICE, block=4)
    assert second.next("t") == 9 > max(used)


def test_clean_close_keeps_exact_counters(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    seq = SequenceAllocator(path, DEVICE, block=100)
    seq.next("t")
    seq.next("t")
    seq.close()
    with pytest.raises(StoreError):
        seq.next("t")
    assert SequenceAllocator(path, DEVICE).next("t") == 3


def test_refuses_corrupt_or_foreign_state(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        SequenceAllocator(path, DEVICE)
    path.write_text(json.dumps({"format": 1, "device": DEVICE, "reserved": {"t": -1}}))
    with pytest.raises(StoreError, match="corrupt"):
        SequenceAllocator(path, DEVICE)
    path.write_text(json.dumps({"format": 1, "device": "0x" + "cd" * 20, "reserved": {}}))
    with pytest.raises(ConfigError, match="belongs to device"):
        SequenceAllocator(path, DEVICE)
    with pytest.raises(ConfigError):
        SequenceAllocator(tmp_path / "x.json", DEVICE, block=0)
