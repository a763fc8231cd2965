"""The publisher's bounded, durable SQLite outbox."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from blendsm.device_sdk import OutboxFullError
from blendsm.device_sdk._outbox import SqliteOutbox
from blendsm.errors import ConfigError, StoreError

DEVICE = "0x" + "ab" * 20


def test_fifo_survives_reopen_and_ids_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path, DEVICE)
    ids = [box.put("t", b"m%d" % i, 1, False, i + 1) for i in range(3)]
    assert [m.data for m in box.after(0, 10)] == [b"m0", b"m1", b"m2"]
    assert [m.sequence for m in box.after(ids[0], 10)] == [2, 3]
    box.delete(ids)
    assert box.count == 0
    assert box.size == 0
    box.put("t", b"kept", 2, True, 4)
    box.close()  # no ack: still queued after a restart
    box = SqliteOutbox(path, DEVICE)
    (kept,) = box.after(0, 10)
    assert (kept.data, kept.qos, kept.retain, kept.sequence) == (b"kept", 2, True, 4)
    assert kept.id > max(ids)  # AUTOINCREMENT: the sender's cursor only grows
    assert box.count == 1
    box.close()


def test_wal_and_full_sync(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.sqlite3", DEVICE)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    box.close()


def test_bounds_refuse_new_and_keep_old(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.sqlite3", DEVICE, max_messages=2, max_bytes=100)
    box.put("t", b"a", 1, False, 1)
    box.put("t", b"b", 1, False, 2)
    with pytest.raises(OutboxFullError, match="2 messages"):
        box.put("t", b"c", 1, False, 3)
    assert [m.data for m in box.after(0, 10)] == [b"a", b"b"]
    box.close()
    box = SqliteOutbox(tmp_path / "p.sqlite3", DEVICE, max_bytes=10)
    with pytest.raises(OutboxFullError, match="bytes"):
        box.put("topic", b"123456", 1, False, 1)
    box.close()


def test_refuses_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    SqliteOutbox(path, DEVICE).close()
    with pytest.raises(ConfigError, match="belongs to device"):
        SqliteOutbox(path, "0x" + "cd" * 20)
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(StoreError, match="not a BlendSM outbox"):
        SqliteOutbox(other, DEVICE)
    with pytest.raises(ConfigError):
        SqliteOutbox(tmp_path / "z.sqlite3", DEVICE, max_messages=0)
