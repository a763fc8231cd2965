"""The voucher store's claim-intent ledger: each voucher claimed on chain exactly once.

Why write-ahead: a claim transaction that is broadcast and then forgotten (the broker killed
before it recorded the hash) must never be broadcast a second time for the same amount, and a
claim must never be for more than the value delivered on the channel. So an intent row is
committed *before* the transaction is broadcast and moves through
``intent -> sent -> confirmed | failed``; it records the delivered value it was bounded by.

Reconciliation after a restart (:meth:`ClaimLedger.pending_claims`): for every open
intent (``intent`` or ``sent``; an ``intent`` row may have been broadcast just before
the crash), read the transaction receipt if ``tx_hash`` is known, and the channel's
on-chain ``claimed``. If on-chain ``claimed >= intent.amount`` the claim is done: call
:meth:`~ClaimLedger.claim_confirmed`. Otherwise, once the transaction is known to be
reverted or dropped, call :meth:`~ClaimLedger.claim_failed`; only then may
:meth:`~ClaimLedger.begin_claim` open a new intent. Never submit a second claim for an
amount already covered on chain; :meth:`~ClaimLedger.begin_claim` refuses to (it also
refuses while an intent is open, so one channel has at most one claim in flight).
Even a duplicate broadcast could not pay twice (the contract pays only the delta over
``claimed``), but it would burn gas and double count in our books.

Apart from :mod:`blendsm.broker._store` (vouchers in, kept and pruned) so each stays readable;
:class:`ClaimLedger` is a base of :class:`~blendsm.broker._store.VoucherStore`, on the same
connection and thread, and every method works on the store's own lane.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from blendsm.broker._sqlite import DurableStore
from blendsm.broker._store_records import ClaimIntent, _int, _u256
from blendsm.device_sdk import checksum_address

__all__ = ["OPEN_STATES", "ClaimLedger"]

OPEN_STATES = ("intent", "sent")
"""Claim intents not settled yet: at most one per channel and lane."""


class ClaimLedger(DurableStore):
    """Claim intents of one lane (see the module docstring); :class:`VoucherStore` supplies
    the lane and the two voucher-side steps a claim touches."""

    _lane: bytes
    lane: str

    if TYPE_CHECKING:  # VoucherStore's, declared here for the type checker only

        def _record_delivered(self, values: Sequence[tuple[bytes, bytes]], now: float) -> None: ...

        def _prune(self, channel_id: bytes) -> None: ...

    def begin_claim(
        self,
        channel_id: bytes,
        now: float | None = None,
        *,
        limit: int | None = None,
        min_gain: int = 0,
    ) -> ClaimIntent | None:
        """Record an intent to claim the channel's best voucher, or None if nothing to do.

        The best voucher is the highest kept one above the on-chain claim whose amount is
        within ``limit`` (the value delivered on the channel: nobody is charged for what
        they did not get, and a prepaid voucher waits until deliveries reach it); without
        ``limit``, the latest. None when: there is none; it would add less than
        ``min_gain`` over the on-chain claim (a threshold that amortises gas); an intent
        is still open (reconcile it first); this exact voucher amount was already
        confirmed once (a deposit-capped claim waits for a newer voucher); or the last
        failure's ``retry_at`` is still ahead. The intent is committed before it is
        returned, so it is durable before any transaction is broadcast, and with it
        ``limit`` as the channel's delivered value: a claim is never above the stored
        delivered value, even after a kill.
        """
        at = time.time() if now is None else now
        known = None if limit is None else _u256(limit)

        def body() -> ClaimIntent | None:
            row = self._db.execute(
                "SELECT claimed_onchain FROM channels WHERE channel_id = ? AND lane = ?",
                (channel_id, self._lane),
            ).fetchone()
            if row is None:
                return None
            sql = (
                "SELECT amount, signature FROM vouchers"
                " WHERE channel_id = ? AND lane = ? AND amount > ?"
            )
            params: tuple[bytes, ...] = (channel_id, self._lane, row[0])
            if known is not None:
                sql, params = sql + " AND amount <= ?", (*params, known)
            best = self._db.execute(sql + " ORDER BY amount DESC LIMIT 1", params).fetchone()
            if best is None or _int(best[0]) - _int(row[0]) < min_gain:
                return None
            amount, signature = best[0], best[1]
            last = self._db.execute(
                "SELECT state, retry_at FROM claims WHERE channel_id = ? AND lane = ?"
                " ORDER BY intent_id DESC LIMIT 1",
                (channel_id, self._lane),
            ).fetchone()
            if last is not None and (
                last[0] in OPEN_STATES
                or (last[0] == "failed" and last[1] is not None and last[1] > at)
            ):
                return None
            done = self._db.execute(
                "SELECT 1 FROM claims WHERE channel_id = ? AND lane = ? AND amount = ?"
                " AND state = 'confirmed'",
                (channel_id, self._lane, amount),
            ).fetchone()
            if done is not None:
                return None
            if known is not None:
                self._record_delivered([(channel_id, known)], at)
            cur = self._db.execute(
                "INSERT INTO claims"
                " (channel_id, lane, amount, signature, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'intent', ?, ?)",
                (channel_id, self._lane, amount, signature, at, at),
            )
            assert cur.lastrowid is not None
            return ClaimIntent(
                cur.lastrowid, channel_id, _int(amount), signature, "intent", None, at, self.lane
            )

        return self._write(body)

    def claim_sent(self, intent_id: int, tx_hash: bytes) -> None:
        """The claim transaction was broadcast as ``tx_hash`` (repeat with the same hash is a no-op)."""

        def body() -> None:
            row = self._db.execute(
                "SELECT state, tx_hash FROM claims WHERE intent_id = ?", (intent_id,)
            ).fetchone()
            if row is not None and row[0] == "sent" and row[1] == tx_hash:
                return
            self._move(intent_id, ("intent",), "sent", "tx_hash = ?", (tx_hash,))

        self._write(body)

    def claim_confirmed(self, intent_id: int, claimed_onchain: int) -> None:
        """The lane's on-chain ``laneClaimed`` is now ``claimed_onchain``; the intent is done.

        Valid from ``intent`` too (reconciliation may find a claim broadcast just before
        a crash). The channel's recorded on-chain amount only ever rises.
        """
        claimed = _u256(claimed_onchain)

        def body() -> None:
            self._move(
                intent_id,
                (*OPEN_STATES, "confirmed"),
                "confirmed",
                "claimed_onchain = ?",
                (claimed,),
            )
            (channel_id, lane) = self._db.execute(
                "SELECT channel_id, lane FROM claims WHERE intent_id = ?", (intent_id,)
            ).fetchone()
            self._db.execute(
                "UPDATE channels SET claimed_onchain = ? WHERE channel_id = ? AND lane = ?"
                " AND claimed_onchain < ?",
                (claimed, channel_id, lane, claimed),
            )
            self._prune(channel_id)

        self._write(body)

    def claim_failed(self, intent_id: int, error: str, retry_at: float) -> None:
        """The claim reverted or was dropped; a new intent may start at ``retry_at``."""
        self._write(
            lambda: self._move(
                intent_id, OPEN_STATES, "failed", "error = ?, retry_at = ?", (error, retry_at)
            )
        )

    def pending_claims(self) -> list[ClaimIntent]:
        """Open intents (``intent`` or ``sent``) to reconcile after a restart, oldest first."""
        rows = self._db.execute(
            "SELECT intent_id, channel_id, amount, signature, state, tx_hash, created_at, lane"
            " FROM claims WHERE state IN ('intent', 'sent') ORDER BY intent_id"
        ).fetchall()
        return [
            ClaimIntent(r[0], r[1], _int(r[2]), r[3], r[4], r[5], r[6], checksum_address(r[7]))
            for r in rows
        ]
