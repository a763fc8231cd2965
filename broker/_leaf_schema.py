"""The leaf store's SQLite schema and the step that upgrades an older file.

Version 1: leaves (topic, device, sequence, leaf, envelope, time, batch and position) and
batches (root, leaf count, state of its anchor). Version 2: ``leaves.handed``, whether a stored
leaf's message reached the fan-out (:mod:`blendsm.broker._handoff`); rows of a version 1 file
were handed on before their PUBACK, as far as that broker knew, so they default to 1.
Version 3: ``batches.chunk_roots``, the sealed tree's nodes ten levels up, so a proof of an
old batch does not rebuild its whole tree (:mod:`blendsm.broker._leaf_proofs`); NULL for the
batches a version 2 broker sealed (their first proof rebuilds and stores them).
"""

from __future__ import annotations

__all__ = ["APPLICATION_ID", "SCHEMA_V1", "SCHEMA_VERSION", "V1_TO_V2", "V2_TO_V3"]

SCHEMA_VERSION = 3
"""``PRAGMA user_version`` of the schema below; a newer file is refused, not guessed at."""

APPLICATION_ID = 0x424C4C46
"""``PRAGMA application_id`` ("BLLF"), so another SQLite file (the voucher store) is told apart."""

SCHEMA_V1 = """
CREATE TABLE batches (
    batch_id     INTEGER PRIMARY KEY,
    root         BLOB NOT NULL CHECK (length(root) = 32),
    leaf_count   INTEGER NOT NULL CHECK (leaf_count > 0),
    state        TEXT NOT NULL CHECK (state IN ('intent', 'sent', 'confirmed', 'failed')),
    tx_hash      BLOB CHECK (tx_hash IS NULL OR length(tx_hash) = 32),
    block_number INTEGER,
    gas_used     INTEGER,
    error        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);

CREATE TABLE leaves (
    leaf_index   INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT NOT NULL,
    device       BLOB NOT NULL CHECK (length(device) = 20),
    sequence     BLOB NOT NULL CHECK (length(sequence) = 8),   -- uint64 big-endian
    leaf         BLOB NOT NULL UNIQUE CHECK (length(leaf) = 32),
    envelope     BLOB NOT NULL,
    received_at  REAL NOT NULL,
    batch_id     INTEGER REFERENCES batches (batch_id),
    position     INTEGER,
    CHECK ((batch_id IS NULL) = (position IS NULL))
);

CREATE INDEX leaves_unbatched ON leaves (leaf_index) WHERE batch_id IS NULL;
CREATE INDEX leaves_by_message ON leaves (topic, sequence, device);
CREATE UNIQUE INDEX leaves_by_batch ON leaves (batch_id, position) WHERE batch_id IS NOT NULL;
CREATE INDEX batches_open ON batches (state) WHERE state IN ('intent', 'sent');
"""

V1_TO_V2 = """
-- 0 stored, not known handed to the fan-out, 1 handed on, 2 found at 0 by a start (counted).
-- Version 1 rows were handed on before their PUBACK (as far as it knew). No semicolons here.
ALTER TABLE leaves ADD COLUMN handed INTEGER NOT NULL DEFAULT 1 CHECK (handed IN (0, 1, 2));
"""

V2_TO_V3 = """
-- The tree's nodes 10 levels above the leaves, 32 bytes each, concatenated (NULL: none).
ALTER TABLE batches ADD COLUMN chunk_roots BLOB;
"""
