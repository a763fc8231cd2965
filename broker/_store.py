"""The broker's durable voucher and claim store (one SQLite file).

Money rules this module enforces:

* Lanes (issue 14): a store belongs to one broker, which meters and claims one lane of each
  channel, its own broker key (``lane``). Every row names its lane and rows are keyed by
  (channel, lane); every method works on the store's own lane only, and a voucher naming
  another lane is refused (the voucher intake refuses it first, ``wrong_lane``). Rows of a
  file from before lanes belong to the operator's own lane (``legacy_lane``), named once when
  the file is opened; rows of another lane (the broker key changed) are kept, never dropped,
  and :meth:`VoucherStore.other_lanes` reports what they hold.

* A voucher counts only once :meth:`VoucherStore.accept` has returned: the row is
  committed with ``journal_mode=WAL`` and ``synchronous=FULL``, so the WAL is fsynced
  before the call returns and the voucher survives a crash of the broker or the host.
* A voucher is accepted only if its cumulative amount is strictly higher than the
  channel's latest (vouchers are cumulative, a newer one supersedes every older one).
* The accepted vouchers above the channel's claim are kept too, at most ``keep`` per
  channel, because the latest may be above the value delivered (a buyer's vouchers can run
  ahead of the broker's count, e.g. after a kill): a claim uses the HIGHEST voucher whose
  amount is within delivered value (:meth:`VoucherStore.begin_claim`). Pruned, in the
  transaction that makes them so: those covered on chain; those below the highest voucher
  within the stored delivered value (it is claimable, and delivered value only rises, so
  they can never be the best claim again); over ``keep``, the newest but one (the oldest
  ones are the next to become claimable; the latest is where a channel ends).
* Amounts are uint256, beyond SQLite's 64-bit INTEGER, so they are stored as 32-byte
  big-endian BLOBs: ``memcmp`` order equals numeric order, so SQL can compare them.
* The value delivered on each channel (the meter's ``charged``) is stored too, so a restart
  never mistakes an undelivered prepayment for delivered value. It is written with each
  voucher batch, with each claim intent, periodically and at stop, never per delivery: after
  a kill it may lag the truth (by the deliveries since the last write), which only ever makes
  the broker claim less, never charge a buyer for what it did not get. It only rises.
* Each voucher is claimed on chain exactly once, via an intent row written *before*
  the transaction is broadcast (write-ahead), moved through
  ``intent -> sent -> confirmed | failed``.

The claim-intent ledger (write-ahead claims and their reconciliation after a restart) is
:mod:`blendsm.broker._claim_ledger`, a base of :class:`VoucherStore`.

:class:`AsyncVoucherStore` is the facade for the asyncio broker: every blocking SQLite
call (fsync included) runs on one dedicated worker thread, never on the event loop, and
that thread owns the connection. Its :meth:`~AsyncVoucherStore.accept` group-commits:
vouchers from concurrent callers queue up while a transaction is in flight and the next
one stores them all (:meth:`VoucherStore.accept_many`), so one fsync covers many vouchers;
each caller still returns only once its own voucher is durable.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blendsm.broker._claim_ledger import ClaimLedger
from blendsm.broker._durable import AsyncDurableStore, GroupCommit, open_on_worker
from blendsm.broker._store_records import (
    ChannelBalance,
    ClaimIntent,
    ClaimState,
    _int,
    _lane_bytes,
    _u256,
)
from blendsm.broker._voucher_schema import (
    APPLICATION_ID,
    LANE_TABLES,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
)
from blendsm.device_sdk import Voucher, checksum_address

__all__ = [
    "APPLICATION_ID",
    "KEEP_VOUCHERS",
    "SCHEMA_VERSION",
    "AsyncVoucherStore",
    "ChannelBalance",
    "ClaimIntent",
    "ClaimState",
    "VoucherStore",
]

KEEP_VOUCHERS = 64
"""Default cap of the accepted vouchers kept per channel above its claim (see the rules)."""

_IN_CHUNK = 500


class VoucherStore(ClaimLedger):
    """Blocking store; use it from one thread (the async facade guarantees that)."""

    _STATE_TABLE = "claims"
    _STATE_KEY = "intent_id"
    _STATE_NOUN = "claim intent"
    _WAL_PAGES = 128  # each commit rewrites a few pages: a small WAL, rewritten in place

    def __init__(
        self,
        path: str | Path,
        *,
        lane: str,
        legacy_lane: str | None = None,
        keep: int = KEEP_VOUCHERS,
    ) -> None:
        if keep < 2:
            raise ValueError(f"keep {keep}: need room for a claimable voucher and the latest")
        self.keep = keep
        """At most this many accepted vouchers are kept per channel."""
        self._lane = _lane_bytes(lane)
        self.lane: str = checksum_address(self._lane)
        """This broker's lane (its broker key): the only one it stores, meters and claims."""
        legacy = self._lane if legacy_lane is None else _lane_bytes(legacy_lane)
        super().__init__(
            path,
            kind="voucher store",
            application_id=APPLICATION_ID,
            schema_version=SCHEMA_VERSION,
            schema=SCHEMA,
            migrations=MIGRATIONS,
        )
        self._name_legacy_rows(legacy)

    def _name_legacy_rows(self, legacy: bytes) -> None:
        """Rows migrated from before lanes belong to the operator's own lane: name it."""

        def body() -> None:
            for table in LANE_TABLES:
                self._db.execute(f"UPDATE {table} SET lane = ? WHERE lane = x''", (legacy,))

        if self._db.execute("SELECT 1 FROM channels WHERE lane = x'' LIMIT 1").fetchone() or (
            self._db.execute("SELECT 1 FROM delivered WHERE lane = x'' LIMIT 1").fetchone()
        ):
            self._write(body)

    def other_lanes(self) -> list[tuple[bytes, str, int]]:
        """``(channel, lane, unclaimed)`` of rows of lanes other than this broker's with
        vouchers above their claim (kept after a broker key change; never claimed here)."""
        rows = self._db.execute(
            "SELECT channel_id, lane, amount, claimed_onchain FROM channels"
            " WHERE lane != ? AND amount > claimed_onchain ORDER BY 1, 2",
            (self._lane,),
        )
        return [(r[0], checksum_address(r[1]), _int(r[2]) - _int(r[3])) for r in rows]

    # -- vouchers ------------------------------------------------------------

    def accept(self, voucher: Voucher, payout_delta_hint: int | None = None) -> bool:
        """Store ``voucher`` if it is strictly newer than the channel's; True if stored.

        The caller has verified the signature. Once this returns True the voucher is on
        disk and may count. ``payout_delta_hint`` (what the metering expected this voucher
        to add) is kept for audit only and never decides acceptance.
        """
        return self.accept_many([(voucher, payout_delta_hint)])[0]

    def accept_many(
        self,
        vouchers: Sequence[tuple[Voucher, int | None]],
        delivered: Sequence[tuple[bytes, int]] = (),
    ) -> list[bool]:
        """:meth:`accept` each ``(voucher, payout_delta_hint)`` in order, in ONE transaction.

        Why: one fsync for the whole batch instead of one per voucher. The per-row rule is
        :meth:`accept`'s, applied in sequence: several vouchers of one channel end with the
        highest, and each reports True only if it was newer than everything before it. All
        or nothing: on an error nothing of the batch is stored. ``delivered`` values
        (``(channel_id, charged)``) are recorded in the same transaction
        (:meth:`record_delivered`), so they cost no fsync of their own.
        """
        for voucher, _hint in vouchers:
            if voucher.lane != self.lane:  # fail closed: this broker meters one lane only
                raise ValueError(f"voucher for lane {voucher.lane}, this store is {self.lane}")
        rows = [
            (
                voucher.channel_id,
                _u256(voucher.cumulative_amount),
                voucher.signature,
                None if hint is None else _u256(hint),
            )
            for voucher, hint in vouchers
        ]
        values = [(channel_id, _u256(charged)) for channel_id, charged in delivered]
        if not rows:
            if values:
                self.record_delivered(delivered)
            return []

        def body() -> list[bool]:
            now = time.time()
            self._record_delivered(values, now)
            stored = [self._accept_row(*row, now) for row in rows]
            for channel_id in dict.fromkeys(
                row[0] for row, ok in zip(rows, stored, strict=True) if ok
            ):
                self._prune(channel_id)
            return stored

        return self._write(body)

    def _accept_row(
        self, channel_id: bytes, amount: bytes, signature: bytes, hint: bytes | None, now: float
    ) -> bool:
        accepted = (
            self._db.execute(
                "INSERT INTO channels"
                " (channel_id, lane, amount, signature, delta_hint, accepted_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (channel_id, lane) DO UPDATE SET amount = excluded.amount,"
                "  signature = excluded.signature, delta_hint = excluded.delta_hint,"
                "  accepted_at = excluded.accepted_at"
                " WHERE excluded.amount > channels.amount",
                (channel_id, self._lane, amount, signature, hint, now),
            ).rowcount
            == 1
        )
        if accepted:
            self._db.execute(
                "INSERT INTO vouchers (channel_id, lane, amount, signature, accepted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (channel_id, self._lane, amount, signature, now),
            )
        return accepted

    def _prune(self, channel_id: bytes) -> None:
        """Drop the channel's kept vouchers that can never be its best claim (module rules)."""
        self._db.execute(
            "DELETE FROM vouchers WHERE channel_id = ?1 AND lane = ?2"
            " AND (amount <= (SELECT claimed_onchain FROM channels"
            "   WHERE channel_id = ?1 AND lane = ?2)"
            "  OR amount < (SELECT max(amount) FROM vouchers WHERE channel_id = ?1 AND lane = ?2"
            "   AND amount <= (SELECT charged FROM delivered"
            "    WHERE channel_id = ?1 AND lane = ?2)))",
            (channel_id, self._lane),
        )
        count = self._db.execute(
            "SELECT count(*) FROM vouchers WHERE channel_id = ? AND lane = ?",
            (channel_id, self._lane),
        ).fetchone()[0]
        if count > self.keep:
            self._db.execute(
                "DELETE FROM vouchers WHERE channel_id = ?1 AND lane = ?3 AND amount IN ("
                " SELECT amount FROM vouchers WHERE channel_id = ?1 AND lane = ?3"
                "  AND amount < (SELECT amount FROM channels WHERE channel_id = ?1 AND lane = ?3)"
                "  ORDER BY amount DESC LIMIT ?2)",
                (channel_id, count - self.keep, self._lane),
            )

    def record_delivered(self, delivered: Iterable[tuple[bytes, int]]) -> None:
        """Record each channel's delivered value ``(channel_id, charged)``; a value below the
        stored one is ignored (delivered value only rises, and a stale snapshot must not
        lower it)."""
        values = [(channel_id, _u256(charged)) for channel_id, charged in delivered]
        if values:
            self._write(lambda: self._record_delivered(values, time.time()))

    def _record_delivered(self, values: Sequence[tuple[bytes, bytes]], now: float) -> None:
        self._db.executemany(
            "INSERT INTO delivered (channel_id, lane, charged, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (channel_id, lane) DO UPDATE SET charged = excluded.charged,"
            "  updated_at = excluded.updated_at WHERE excluded.charged > delivered.charged",
            [(channel_id, self._lane, charged, now) for channel_id, charged in values],
        )

    def delivered(self) -> list[tuple[bytes, int]]:
        """Every channel's stored delivered value, in id order (the meter's restart seed)."""
        rows = self._db.execute(
            "SELECT channel_id, charged FROM delivered WHERE lane = ? ORDER BY 1", (self._lane,)
        )
        return [(r[0], _int(r[1])) for r in rows]

    def latest(self, channel_id: bytes) -> Voucher | None:
        """The newest accepted voucher of the channel, or None."""
        row = self._db.execute(
            "SELECT amount, signature FROM channels WHERE channel_id = ? AND lane = ?",
            (channel_id, self._lane),
        ).fetchone()
        return None if row is None else Voucher(channel_id, self.lane, _int(row[0]), row[1])

    def accepted(self, channel_id: bytes) -> list[int]:
        """The amounts of the channel's kept vouchers (those a claim may still use), ascending."""
        rows = self._db.execute(
            "SELECT amount FROM vouchers WHERE channel_id = ? AND lane = ? ORDER BY amount",
            (channel_id, self._lane),
        )
        return [_int(r[0]) for r in rows]

    def channels(self) -> list[bytes]:
        """Every channel with an accepted voucher, in id order."""
        rows = self._db.execute(
            "SELECT channel_id FROM channels WHERE lane = ? ORDER BY 1", (self._lane,)
        )
        return [r[0] for r in rows]

    def claimed_onchain(self, channel_id: bytes) -> int:
        """The highest on-chain ``claimed`` we have confirmed for the channel (0 if none)."""
        row = self._db.execute(
            "SELECT claimed_onchain FROM channels WHERE channel_id = ? AND lane = ?",
            (channel_id, self._lane),
        ).fetchone()
        return 0 if row is None else _int(row[0])

    def balances(
        self, channel_ids: Iterable[bytes] | None = None, *, unclaimed_only: bool = False
    ) -> list[ChannelBalance]:
        """Latest amount and confirmed on-chain claim per channel, in id order.

        ``channel_ids`` limits the answer to those channels (unknown ones are left out);
        ``unclaimed_only`` keeps only channels whose latest voucher is above the claim.
        """
        sql = "SELECT channel_id, amount, claimed_onchain FROM channels WHERE lane = ?"
        if unclaimed_only:
            sql += " AND amount > claimed_onchain"
        if channel_ids is None:
            rows = self._db.execute(sql + " ORDER BY channel_id", (self._lane,)).fetchall()
        else:
            ids = list(dict.fromkeys(channel_ids))
            rows = []
            for start in range(0, len(ids), _IN_CHUNK):  # stay under SQLite's variable limit
                chunk = ids[start : start + _IN_CHUNK]
                rows += self._db.execute(
                    f"{sql} AND channel_id IN ({', '.join('?' * len(chunk))})",
                    (self._lane, *chunk),
                ).fetchall()
            rows.sort()
        return [ChannelBalance(r[0], _int(r[1]), _int(r[2])) for r in rows]


class AsyncVoucherStore(AsyncDurableStore[VoucherStore]):
    """Asyncio facade: every call runs on one dedicated thread that owns the connection.

    Open with ``await AsyncVoucherStore.open(path)``; the single-thread executor also
    serialises calls, so concurrent ``accept`` calls keep the maximum.
    """

    def __init__(self, executor: ThreadPoolExecutor, store: VoucherStore) -> None:
        super().__init__(executor, store)
        # Every accept is awaited, so a group never lingers: it commits as soon as it can.
        self._accepts: GroupCommit[tuple[Voucher, int | None], bool] = GroupCommit(
            lambda vouchers: self._run(self._store.accept_many, vouchers),
            task_name="blendsm-store-group-commit",
        )

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        lane: str,
        legacy_lane: str | None = None,
        keep: int = KEEP_VOUCHERS,
    ) -> AsyncVoucherStore:
        """Open (or create) the store of ``lane`` on a fresh worker thread."""
        store = await open_on_worker(
            lambda: VoucherStore(path, lane=lane, legacy_lane=legacy_lane, keep=keep),
            "blendsm-store",
        )
        opened = cls(*store)
        await opened.learn_thread()  # for urgent commits
        return opened

    @property
    def lane(self) -> str:
        """See :attr:`VoucherStore.lane`."""
        return self._store.lane

    async def other_lanes(self) -> list[tuple[bytes, str, int]]:
        """See :meth:`VoucherStore.other_lanes`."""
        return await self._run(self._store.other_lanes)

    async def accept(self, voucher: Voucher, payout_delta_hint: int | None = None) -> bool:
        """See :meth:`VoucherStore.accept`; concurrent calls share one transaction.

        Returns once the transaction holding this voucher committed (durable), with this
        voucher's own result; a failing transaction raises in every caller it held.
        """
        _u256(voucher.cumulative_amount)  # bad input fails its caller alone, not a batch
        if payout_delta_hint is not None:
            _u256(payout_delta_hint)
        return await self._accepts.add((voucher, payout_delta_hint))

    async def accept_many(
        self,
        vouchers: Sequence[tuple[Voucher, int | None]],
        delivered: Sequence[tuple[bytes, int]] = (),
    ) -> list[bool]:
        """See :meth:`VoucherStore.accept_many` (one transaction, not merged with others)."""
        return await self._run(self._store.accept_many, list(vouchers), list(delivered))

    async def record_delivered(self, delivered: Iterable[tuple[bytes, int]]) -> None:
        """See :meth:`VoucherStore.record_delivered`."""
        await self._run(self._store.record_delivered, list(delivered))

    async def delivered(self) -> list[tuple[bytes, int]]:
        """See :meth:`VoucherStore.delivered`."""
        return await self._run(self._store.delivered)

    async def _finish_writes(self) -> None:
        await self._accepts.drain_all()

    async def latest(self, channel_id: bytes) -> Voucher | None:
        """See :meth:`VoucherStore.latest`."""
        return await self._run(self._store.latest, channel_id)

    async def accepted(self, channel_id: bytes) -> list[int]:
        """See :meth:`VoucherStore.accepted`."""
        return await self._run(self._store.accepted, channel_id)

    async def channels(self) -> list[bytes]:
        """See :meth:`VoucherStore.channels`."""
        return await self._run(self._store.channels)

    async def claimed_onchain(self, channel_id: bytes) -> int:
        """See :meth:`VoucherStore.claimed_onchain`."""
        return await self._run(self._store.claimed_onchain, channel_id)

    async def balances(
        self, channel_ids: Iterable[bytes] | None = None, *, unclaimed_only: bool = False
    ) -> list[ChannelBalance]:
        """See :meth:`VoucherStore.balances`."""
        ids = None if channel_ids is None else list(channel_ids)
        return await self._run(lambda: self._store.balances(ids, unclaimed_only=unclaimed_only))

    async def begin_claim(
        self,
        channel_id: bytes,
        now: float | None = None,
        *,
        limit: int | None = None,
        min_gain: int = 0,
    ) -> ClaimIntent | None:
        """See :meth:`VoucherStore.begin_claim`."""
        return await self._run(
            lambda: self._store.begin_claim(channel_id, now, limit=limit, min_gain=min_gain)
        )

    async def claim_sent(self, intent_id: int, tx_hash: bytes) -> None:
        """See :meth:`VoucherStore.claim_sent`."""
        await self._run(self._store.claim_sent, intent_id, tx_hash)

    async def claim_confirmed(self, intent_id: int, claimed_onchain: int) -> None:
        """See :meth:`VoucherStore.claim_confirmed`."""
        await self._run(self._store.claim_confirmed, intent_id, claimed_onchain)

    async def claim_failed(self, intent_id: int, error: str, retry_at: float) -> None:
        """See :meth:`VoucherStore.claim_failed`."""
        await self._run(self._store.claim_failed, intent_id, error, retry_at)

    async def pending_claims(self) -> list[ClaimIntent]:
        """See :meth:`VoucherStore.pending_claims`."""
        return await self._run(self._store.pending_claims)
