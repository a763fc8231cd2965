"""Read-only looks into a broker's SQLite stores (``vouchers.sqlite3``, ``leaves.sqlite3``)
and the on-chain events they must agree with: for crash tests, which check what survived a
SIGKILL against what the chain says."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

__all__ = [
    "anchor_logs",
    "anchored_sequences",
    "claim_logs",
    "confirmed_batches",
    "confirmed_claims",
    "leaf_sequences",
    "leaf_times",
    "open_claims",
    "stored_delivered",
    "stored_voucher",
]


def _query(db: Path, sql: str, *args: Any) -> list[Any]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return con.execute(sql, args).fetchall()


def stored_voucher(db: Path, channel: bytes) -> int:
    """The latest voucher amount the voucher store holds for ``channel`` (0: none)."""
    rows = _query(db, "SELECT amount FROM channels WHERE channel_id = ?", channel)
    return 0 if not rows else int.from_bytes(rows[0][0], "big")


def stored_delivered(db: Path, channel: bytes) -> int:
    """The delivered value the voucher store holds for ``channel`` (0: none), the ceiling of
    every claim."""
    rows = _query(db, "SELECT charged FROM delivered WHERE channel_id = ?", channel)
    return max((int.from_bytes(r[0], "big") for r in rows), default=0)


def confirmed_claims(db: Path, channel: bytes) -> int:
    """Claim intents of ``channel`` the voucher store has confirmed on chain."""
    rows = _query(
        db, "SELECT count(*) FROM claims WHERE channel_id = ? AND state = 'confirmed'", channel
    )
    return int(rows[0][0]) if rows else 0


def open_claims(db: Path, channel: bytes) -> int:
    """Claim intents of ``channel`` not yet decided (``intent`` or ``sent``)."""
    rows = _query(
        db,
        "SELECT count(*) FROM claims WHERE channel_id = ? AND state IN ('intent', 'sent')",
        channel,
    )
    return int(rows[0][0]) if rows else 0


def anchored_sequences(db: Path, topic: str) -> set[int]:
    """Sequences of ``topic``'s leaves that sit in a batch confirmed on chain."""
    rows = _query(
        db,
        "SELECT l.sequence FROM leaves l JOIN batches b ON l.batch_id = b.batch_id"
        " WHERE l.topic = ? AND b.state = 'confirmed'",
        topic,
    )
    return {int.from_bytes(r[0], "big") for r in rows}  # stored as uint64 BE blobs


def confirmed_batches(db: Path) -> dict[int, bytes]:
    """batch id -> Merkle root of every batch the leaf store has confirmed on chain."""
    rows = _query(db, "SELECT batch_id, root FROM batches WHERE state = 'confirmed'")
    return {int(r[0]): bytes(r[1]) for r in rows}


def claim_logs(chain: Any, channel: bytes) -> list[tuple[int, int]]:
    """(cumulative amount, payout) of every ``ChannelClaimed`` of ``channel``, in chain order."""
    logs = chain.PaymentChannels.events.ChannelClaimed().get_logs(
        from_block=chain.deployment.block, argument_filters={"channelId": channel}
    )
    return [(int(e["args"]["cumulativeAmount"]), int(e["args"]["payout"])) for e in logs]


def anchor_logs(chain: Any) -> list[tuple[int, bytes, int]]:
    """(batch id, root, leaf count) of every ``Anchored`` event, in chain order."""
    logs = chain.DataAnchors.events.Anchored().get_logs(from_block=chain.deployment.block)
    return [
        (int(e["args"]["batchId"]), bytes(e["args"]["root"]), int(e["args"]["leafCount"]))
        for e in logs
    ]


def leaf_sequences(db: Path, topic: str) -> set[int]:
    """Sequences of every leaf of ``topic`` the leaf store holds (anchored or not)."""
    rows = _query(db, "SELECT sequence FROM leaves WHERE topic = ?", topic)
    return {int.from_bytes(r[0], "big") for r in rows}


def leaf_times(db: Path, topic: str) -> dict[int, float]:
    """sequence -> wall-clock time the broker stored it, for every leaf of ``topic``."""
    rows = _query(db, "SELECT sequence, received_at FROM leaves WHERE topic = ?", topic)
    return {int.from_bytes(r[0], "big"): float(r[1]) for r in rows}
