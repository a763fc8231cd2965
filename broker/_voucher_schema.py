"""The voucher store's SQLite schema and the steps that upgrade an older file.

Version 1: each channel's latest voucher and the claim intents. Version 2: each channel's
delivered value. Version 3: the accepted vouchers above a channel's claim (bounded), so a
claim can use the highest one within delivered value rather than only the latest. Version 4:
lanes (issue 14): every row names the lane (the broker key, 20 bytes) it belongs to, and
channels, vouchers and delivered value are keyed by (channel, lane). Rows of an older file
belong to the operator's own lane: the migration marks them with an empty lane, which the
store names (the operator address from the configuration) when it opens the file, in the
same way every time, so no row is ever dropped or guessed at.
"""

from __future__ import annotations

__all__ = ["APPLICATION_ID", "LANE_TABLES", "MIGRATIONS", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA_VERSION = 4
"""``PRAGMA user_version`` of the schema below; a newer file is refused, not guessed at."""

APPLICATION_ID = 0x424C534D
"""``PRAGMA application_id`` ("BLSM"), so a foreign SQLite file is told apart from ours."""

_SCHEMA_V1 = """
CREATE TABLE channels (
    channel_id      BLOB PRIMARY KEY CHECK (length(channel_id) = 32),
    amount          BLOB NOT NULL CHECK (length(amount) = 32),   -- latest cumulative, uint256 BE
    signature       BLOB NOT NULL,
    delta_hint      BLOB CHECK (delta_hint IS NULL OR length(delta_hint) = 32),
    accepted_at     REAL NOT NULL,
    claimed_onchain BLOB NOT NULL DEFAULT (zeroblob(32)) CHECK (length(claimed_onchain) = 32)
) WITHOUT ROWID;

CREATE TABLE claims (
    intent_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id      BLOB NOT NULL REFERENCES channels (channel_id),
    amount          BLOB NOT NULL CHECK (length(amount) = 32),
    signature       BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('intent', 'sent', 'confirmed', 'failed')),
    tx_hash         BLOB,
    error           TEXT,
    retry_at        REAL,
    claimed_onchain BLOB CHECK (claimed_onchain IS NULL OR length(claimed_onchain) = 32),
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);

CREATE INDEX claims_by_channel ON claims (channel_id, intent_id);
CREATE INDEX claims_open ON claims (state) WHERE state IN ('intent', 'sent');
"""

_DELIVERED_TABLE = """
CREATE TABLE delivered (
    channel_id      BLOB PRIMARY KEY CHECK (length(channel_id) = 32),
    charged         BLOB NOT NULL CHECK (length(charged) = 32),   -- delivered value, uint256 BE
    updated_at      REAL NOT NULL
) WITHOUT ROWID;
"""

_VOUCHERS_TABLE = """
CREATE TABLE vouchers (
    channel_id      BLOB NOT NULL REFERENCES channels (channel_id),
    amount          BLOB NOT NULL CHECK (length(amount) = 32),   -- cumulative, uint256 BE
    signature       BLOB NOT NULL,
    accepted_at     REAL NOT NULL,
    PRIMARY KEY (channel_id, amount)
) WITHOUT ROWID;
"""

_LANE = "lane BLOB NOT NULL CHECK (length(lane) IN (0, 20))"  # 0: the operator's, unnamed yet

_SCHEMA_V4 = f"""
CREATE TABLE channels (
    channel_id      BLOB NOT NULL CHECK (length(channel_id) = 32),
    {_LANE},
    amount          BLOB NOT NULL CHECK (length(amount) = 32),   -- latest cumulative, uint256 BE
    signature       BLOB NOT NULL,
    delta_hint      BLOB CHECK (delta_hint IS NULL OR length(delta_hint) = 32),
    accepted_at     REAL NOT NULL,
    claimed_onchain BLOB NOT NULL DEFAULT (zeroblob(32)) CHECK (length(claimed_onchain) = 32),
    PRIMARY KEY (channel_id, lane)
) WITHOUT ROWID;

CREATE TABLE claims (
    intent_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id      BLOB NOT NULL,
    {_LANE},
    amount          BLOB NOT NULL CHECK (length(amount) = 32),
    signature       BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('intent', 'sent', 'confirmed', 'failed')),
    tx_hash         BLOB,
    error           TEXT,
    retry_at        REAL,
    claimed_onchain BLOB CHECK (claimed_onchain IS NULL OR length(claimed_onchain) = 32),
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);

CREATE INDEX claims_by_channel ON claims (channel_id, lane, intent_id);
CREATE INDEX claims_open ON claims (state) WHERE state IN ('intent', 'sent');

CREATE TABLE delivered (
    channel_id      BLOB NOT NULL CHECK (length(channel_id) = 32),
    {_LANE},
    charged         BLOB NOT NULL CHECK (length(charged) = 32),   -- delivered value, uint256 BE
    updated_at      REAL NOT NULL,
    PRIMARY KEY (channel_id, lane)
) WITHOUT ROWID;

CREATE TABLE vouchers (
    channel_id      BLOB NOT NULL,
    {_LANE},
    amount          BLOB NOT NULL CHECK (length(amount) = 32),   -- cumulative, uint256 BE
    signature       BLOB NOT NULL,
    accepted_at     REAL NOT NULL,
    PRIMARY KEY (channel_id, lane, amount)
) WITHOUT ROWID;
"""

SCHEMA = _SCHEMA_V4

#: Version 3 -> 4: rebuild each table with its lane (empty: the operator's, named on open).
_TO_V4 = (
    """
ALTER TABLE channels RENAME TO channels_v3;
ALTER TABLE claims RENAME TO claims_v3;
ALTER TABLE delivered RENAME TO delivered_v3;
ALTER TABLE vouchers RENAME TO vouchers_v3;
DROP INDEX claims_by_channel;
DROP INDEX claims_open;
"""
    + _SCHEMA_V4
    + """;
INSERT INTO channels (channel_id, lane, amount, signature, delta_hint, accepted_at,
                      claimed_onchain)
    SELECT channel_id, x'', amount, signature, delta_hint, accepted_at, claimed_onchain
    FROM channels_v3;
INSERT INTO claims (intent_id, channel_id, lane, amount, signature, state, tx_hash, error,
                    retry_at, claimed_onchain, created_at, updated_at)
    SELECT intent_id, channel_id, x'', amount, signature, state, tx_hash, error, retry_at,
           claimed_onchain, created_at, updated_at
    FROM claims_v3;
INSERT INTO delivered (channel_id, lane, charged, updated_at)
    SELECT channel_id, x'', charged, updated_at FROM delivered_v3;
INSERT INTO vouchers (channel_id, lane, amount, signature, accepted_at)
    SELECT channel_id, x'', amount, signature, accepted_at FROM vouchers_v3;
DROP TABLE vouchers_v3;
DROP TABLE claims_v3;
DROP TABLE delivered_v3;
DROP TABLE channels_v3;
"""
)

#: The tables whose rows name a lane (an empty one until the store names it).
LANE_TABLES = ("channels", "claims", "delivered", "vouchers")

MIGRATIONS = {
    # A version 1 file never recorded delivered value. What is known to be delivered is what
    # was claimed on chain (the settler claims only delivered value): seeding from it may
    # under-claim, never charge a buyer for a prepayment it did not receive (the voucher
    # amount, which version 1 brokers used after a restart, could).
    1: _DELIVERED_TABLE
    + """;
INSERT INTO delivered (channel_id, charged, updated_at)
    SELECT channel_id, claimed_onchain, CAST(strftime('%s', 'now') AS REAL) FROM channels
""",
    # A version 2 file kept only each channel's latest voucher: it is the one to keep (if it
    # is above the claim); the older ones were never stored.
    2: _VOUCHERS_TABLE
    + """;
INSERT INTO vouchers (channel_id, amount, signature, accepted_at)
    SELECT channel_id, amount, signature, accepted_at FROM channels
    WHERE amount > claimed_onchain
""",
    3: _TO_V4,
}
