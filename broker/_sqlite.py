"""Opening the broker's durable SQLite files: WAL, fsync on every commit, a tagged schema.

The voucher store and the leaf store hold money and evidence, so both open their file the
same strict way: ``journal_mode=WAL`` and ``synchronous=FULL`` (a commit is on disk when it
returns), an ``application_id`` so a foreign file is refused rather than written into, and a
``user_version`` so a file from a newer broker is refused rather than guessed at. A file from
an older broker is brought up to date by its store's ``migrations``, each step in one
transaction, before anything else reads it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Self, TypeVar

from blendsm.errors import StoreError

__all__ = ["DurableStore", "open_durable"]

_T = TypeVar("_T")


def open_durable(
    path: Path,
    *,
    kind: str,
    application_id: int,
    schema_version: int,
    schema: str,
    migrations: Mapping[int, str] | None = None,
) -> sqlite3.Connection:
    """Open (creating it with ``schema`` in one transaction when empty) the ``kind`` store at
    ``path``; StoreError, naming ``kind`` and the path, if it is not ours or unreadable.
    ``migrations[n]`` is the SQL that takes a version ``n`` file to ``n + 1``.

    The connection has ``isolation_level=None``: callers issue ``BEGIN IMMEDIATE`` themselves
    so every read-check-write runs under the write lock."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except sqlite3.Error as exc:
        raise StoreError(f"{kind} {path}: cannot open: {exc}") from exc
    try:
        _configure(db, f"{kind} {path}")
        _migrate(db, kind, path, application_id, schema_version, schema, migrations or {})
    except BaseException:
        db.close()
        raise
    return db


def _configure(db: sqlite3.Connection, where: str) -> None:
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{where}: not a readable SQLite database ({exc}); refusing to touch it"
        ) from exc
    if str(mode).lower() != "wal":
        raise StoreError(f"{where}: journal_mode is {mode!r}, need 'wal'")


def _migrate(
    db: sqlite3.Connection,
    kind: str,
    path: Path,
    application_id: int,
    schema_version: int,
    schema: str,
    migrations: Mapping[int, str],
) -> None:
    where = f"{kind} {path}"
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{where}: unreadable: {exc}") from exc
    if version == 0 and app_id == 0 and tables == 0:
        _run(db, schema, f"PRAGMA application_id={application_id}", schema_version)
        return
    if app_id != application_id:
        raise StoreError(
            f"{where}: not a BlendSM {kind}"
            f" (application_id {app_id:#x}, expected {application_id:#x}); refusing to touch it"
        )
    if version > schema_version:
        raise StoreError(
            f"{where}: schema version {version} is newer than this"
            f" broker supports ({schema_version}); upgrade the broker, do not downgrade"
        )
    if version < 1:
        raise StoreError(f"{where}: schema version {version} is invalid")
    while version < schema_version:
        step = migrations.get(version)
        if step is None:
            raise StoreError(
                f"{where}: schema version {version} cannot be upgraded to {schema_version}"
            )
        try:
            _run(db, step, None, version + 1)
        except sqlite3.Error as exc:
            raise StoreError(
                f"{where}: upgrade from schema version {version} failed: {exc}"
            ) from exc
        version += 1


def _run(db: sqlite3.Connection, script: str, pragma: str | None, version: int) -> None:
    """Run ``script`` (and ``pragma``) and set ``user_version`` in ONE transaction, so a crash
    leaves the file at the old version or the new one, never between."""
    db.execute("BEGIN IMMEDIATE")
    try:
        # Not executescript: it would COMMIT; one by one keeps it one transaction.
        for statement in filter(None, (s.strip() for s in script.split(";"))):
            db.execute(statement)
        if pragma is not None:
            db.execute(pragma)
        db.execute(f"PRAGMA user_version={version}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class DurableStore:
    """Base of the blocking stores: one durable SQLite connection, used from one thread (their
    async facades guarantee that), write transactions that are on disk when they return, and
    the checked state transitions of their write-ahead rows (claims, batches)."""

    def __init__(
        self,
        path: str | Path,
        *,
        kind: str,
        application_id: int,
        schema_version: int,
        schema: str,
        migrations: Mapping[int, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.commits = 0
        """Write transactions committed so far (each one fsync); for tests and metrics."""
        self._db = open_durable(
            self.path,
            kind=kind,
            application_id=application_id,
            schema_version=schema_version,
            schema=schema,
            migrations=migrations,
        )
        self._db.execute(f"PRAGMA wal_autocheckpoint={int(self._WAL_PAGES)}")

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL back into the file)."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    _WAL_PAGES: ClassVar[int] = 1000
    """Pages the WAL may hold before a commit checkpoints it back into the file (SQLite's
    ``wal_autocheckpoint``; 1000 is its default). Why a store would lower it: a commit's
    ``fdatasync`` costs more CPU while the WAL file grows (its size changes, so the file
    system journals it) than once the WAL is rewritten in place after a checkpoint: 300 us a
    voucher commit against 195 on this machine, and a 1000-page WAL grows for the first 4 MB
    after every start. A store whose commits rewrite the same few pages (the voucher store)
    checkpoints little and gains; one that appends (the leaf store) copies more per
    checkpoint and loses (16.4 -> 20 us a leaf at 128 pages), so it keeps the default."""
    _STATE_TABLE: ClassVar[str] = ""
    """Table of the rows that move through a state machine (``intent -> sent -> ...``)."""
    _STATE_KEY: ClassVar[str] = ""
    """Its primary key column."""
    _STATE_NOUN: ClassVar[str] = "row"
    """What one row is called in errors."""

    def _move(
        self,
        key: int,
        allowed: tuple[str, ...],
        target: str,
        assignments: str,
        params: tuple[object, ...],
    ) -> None:
        """Move row ``key`` from one of the ``allowed`` states to ``target``, setting
        ``assignments`` (SQL, with ``params``) too; StoreError if it is missing or in another
        state. Call inside :meth:`_write`, so the check and the update are one transaction."""
        table, column, noun = self._STATE_TABLE, self._STATE_KEY, self._STATE_NOUN
        row = self._db.execute(f"SELECT state FROM {table} WHERE {column} = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"{noun} {key} does not exist")
        if row[0] not in allowed:
            raise StoreError(f"{noun} {key} is {row[0]!r}, cannot become {target!r}")
        self._db.execute(
            f"UPDATE {table} SET state = ?, updated_at = ?, {assignments} WHERE {column} = ?",
            (target, time.time(), *params, key),
        )

    def _write(self, body: Callable[[], _T]) -> _T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction; committed (fsynced) on return."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self.commits += 1
        return result
