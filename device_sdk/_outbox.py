"""The publisher's store-and-forward queue: signed envelopes on disk until the broker acks.

One SQLite file in WAL mode. A message is inserted (already signed: a resend is
byte-identical) before :meth:`Publisher.publish` returns, and deleted only after the
broker's PUBACK (QoS 1) or PUBCOMP (QoS 2). A crash of the device or of the broker in
between means a resend, never a loss; resends are recognisable by their sequence number.

Durability: ``synchronous=FULL``. In WAL mode ``NORMAL`` survives a process crash but may
lose the last commits on power loss or a kernel crash, the usual way a field device dies;
``publish`` promises the message is safe when it returns, so every insert fsyncs the WAL.
Deletes could be weaker (a lost delete only causes a detectable resend), but they are
batched by the sender, so their fsync is shared by many acks.

Bounded: by message count and by bytes (envelope + topic). When either bound would be
exceeded the insert is refused with :class:`OutboxFullError`; nothing already queued is
ever dropped to make room. Row ids use ``AUTOINCREMENT`` so an id is never reused (the
sender's cursor relies on ids only growing).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blendsm.errors import ConfigError, OutboxFullError, StoreError

__all__ = ["OutboxFullError", "OutboxMessage", "SqliteOutbox"]

_SCHEMA_VERSION: Final = 1
_APPLICATION_ID: Final = 0x42534D4F  # "BSMO"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    data: bytes
    qos: int
    retain: bool
    sequence: int


class SqliteOutbox:
    """A bounded, durable FIFO of wire-ready messages for one device. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str,
        *,
        max_messages: int = 10_000,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        for name, value in (("max_pending", max_messages), ("max_pending_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        self.path = Path(path)
        self.device = device
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open outbox {self.path}: {exc}") from exc
        self._db = db
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"outbox {self.path} is not a usable SQLite file: {exc}") from exc
        except BaseException:
            db.close()
            raise
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(data) + length(CAST(topic AS BLOB))), 0)"
            " FROM messages"
        ).fetchone()
        self._count: int = count
        self._bytes: int = size

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " topic TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
                " sequence INTEGER NOT NULL, data BLOB NOT NULL)"
            )
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT INTO meta VALUES ('device', ?)", (self.device,))
            db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("COMMIT")
            return
        if app_id != _APPLICATION_ID:
            raise StoreError(f"{self.path} is not a BlendSM outbox")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != _SCHEMA_VERSION:
            raise StoreError(f"outbox {self.path} has schema {version}, expected 1")
        row = db.execute("SELECT value FROM meta WHERE key='device'").fetchone()
        if row is None or row[0] != self.device:
            raise ConfigError(
                f"state_dir: outbox {self.path} belongs to device"
                f" {row[0] if row else '?'}, not {self.device}"
            )

    @property
    def count(self) -> int:
        """Messages queued (not yet acknowledged by the broker)."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes queued (envelopes + topics)."""
        return self._bytes

    def put(self, topic: str, data: bytes, qos: int, retain: bool, sequence: int) -> int:
        """Queue one message durably (fsync) and return its row id; OutboxFullError if a
        bound would be exceeded."""
        size = len(data) + len(topic.encode())
        with self._lock:
            if self._count + 1 > self.max_messages or self._bytes + size > self.max_bytes:
                raise OutboxFullError(self._count, self._bytes, self.max_messages, self.max_bytes)
            try:
                cur = self._db.execute(
                    "INSERT INTO messages (topic, qos, retain, sequence, data)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (topic, qos, int(retain), sequence, data),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot queue message in {self.path}: {exc}") from exc
            self._count += 1
            self._bytes += size
            rowid = cur.lastrowid
            assert rowid is not None
            return rowid

    def after(self, cursor: int, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` queued messages with ids above ``cursor``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, data, qos, retain, sequence FROM messages"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, limit),
            ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def delete(self, ids: list[int]) -> None:
        """Remove acknowledged messages (one transaction, one fsync)."""
        if not ids:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                freed = 0
                for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    n, size = db.execute(
                        "SELECT count(*),"
                        " coalesce(sum(length(data) + length(CAST(topic AS BLOB))), 0)"
                        f" FROM messages WHERE id IN ({marks})",
                        chunk,
                    ).fetchone()
                    db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                    removed += n
                    freed += size
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count -= removed
            self._bytes -= freed

    def close(self) -> None:
        with self._lock:
            self._db.close()
