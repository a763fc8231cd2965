"""The durable voucher store: vouchers survive a kill, amounts stay monotonic and uint256,
and every voucher is claimed on chain at most once, across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blendsm.broker._store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    AsyncVoucherStore,
    VoucherStore,
)
from blendsm.device_sdk import UINT256_MAX, Voucher
from blendsm.errors import BlendsmError, StoreError

SIG = bytes(range(65))

#: TEST ONLY: the broker key whose lane the store keeps (any address).
LANE = "0x" + "ab" * 20


def cid(n: int) -> bytes:
    return n.to_bytes(32, "big")


def v(channel: int, amount: int, sig: bytes = SIG) -> Voucher:
    return Voucher(cid(channel), LANE, amount, sig)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "vouchers.sqlite"


@pytest.fixture
def store(db: Path) -> Iterator[VoucherStore]:
    with VoucherStore(db, lane=LANE) as s:
        yield s


# -- opening ---------------------------------------------------------------------------


def test_pragmas_and_schema_version(store: VoucherStore, db: Path) -> None:
    conn = store._db
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    # No column holds an amount as INTEGER (64-bit would truncate a uint256).
    for table in ("channels", "claims"):
        for _, name, decl, *_ in conn.execute(f"PRAGMA table_info({table})"):
            if "amount" in name or "claimed" in name:
                assert decl == "BLOB", (table, name, decl)


def test_the_wal_stays_small_and_is_rewritten_in_place(store: VoucherStore, db: Path) -> None:
    """Each commit rewrites a few pages, so the WAL is checkpointed every 128 pages and then
    rewritten in place (an fsync that does not change the file's size costs about a third
    less CPU); with SQLite's default of 1000 pages it grew to ~4 MB after every start."""
    for i in range(1, 601):
        store.accept_many([(v(i % 7, i), None), (v(7 + i % 5, i), None)], [(cid(i % 7), i)])
    wal = db.with_name(db.name + "-wal")
    # the header, 128 frames, and the last commit's pages past the mark (a few)
    assert wal.stat().st_size <= 32 + (128 + 8) * (4096 + 24)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 128


def test_reopen_keeps_data(db: Path) -> None:
    with VoucherStore(db, lane=LANE) as s:
        assert s.accept(v(1, 5))
    with VoucherStore(db, lane=LANE) as s:
        assert s.latest(cid(1)) == v(1, 5)


def test_newer_schema_refused(db: Path) -> None:
    VoucherStore(db, lane=LANE).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this broker supports"):
        VoucherStore(db, lane=LANE)


def test_foreign_sqlite_file_refused(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(StoreError, match="not a BlendSM voucher store"):
        VoucherStore(db, lane=LANE)
    # Untouched: still just the foreign table.
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_schema")] == ["other"]


def test_garbage_file_refused(db: Path) -> None:
    db.write_bytes(b"this is not sqlite at all\n" * 200)
    with pytest.raises(StoreError, match="not a readable SQLite database") as info:
        VoucherStore(db, lane=LANE)
    assert isinstance(info.value, BlendsmError)


def test_truncated_store_refused(db: Path) -> None:
    with VoucherStore(db, lane=LANE) as s:
        for i in range(200):
            s.accept(v(i, 1))
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # header kept, pages smashed
    with pytest.raises(StoreError, match="malformed"):
        VoucherStore(db, lane=LANE)


# -- vouchers --------------------------------------------------------------------------


def test_accept_is_strictly_monotonic(store: VoucherStore) -> None:
    assert store.latest(cid(1)) is None
    assert store.accept(v(1, 10))
    assert not store.accept(v(1, 10, b"\x01" * 65))  # equal: refused, first kept
    assert not store.accept(v(1, 9))
    assert store.latest(cid(1)) == v(1, 10)
    assert store.accept(v(1, 11, b"\x02" * 65), payout_delta_hint=1)
    assert store.latest(cid(1)) == v(1, 11, b"\x02" * 65)
    assert store.accept(v(2, 1))
    assert store.channels() == [cid(1), cid(2)]


def test_uint256_max_round_trip(store: VoucherStore, db: Path) -> None:
    assert store.accept(v(1, 2**64))
    assert store.accept(v(1, UINT256_MAX - 1))
    assert store.accept(v(1, UINT256_MAX))
    assert not store.accept(v(1, 2**255))  # byte order = numeric order, no string compare
    store.close()
    with VoucherStore(db, lane=LANE) as s:
        assert s.latest(cid(1)) == v(1, UINT256_MAX)


def test_order_is_numeric_not_lexical(store: VoucherStore) -> None:
    assert store.accept(v(1, 9))
    assert store.accept(v(1, 10))  # "10" < "9" as text; must still be newer
    assert store.accept(v(1, 256))
    assert not store.accept(v(1, 255))


async def test_async_concurrent_accepts_keep_max(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    try:
        amounts = list(range(1, 201))
        random.Random(7).shuffle(amounts)
        loop_thread = threading.get_ident()
        assert await store._run(threading.get_ident) != loop_thread  # SQLite off the loop
        results = await asyncio.gather(*(store.accept(v(1, a)) for a in amounts))
        assert any(results)
        assert await store.latest(cid(1)) == v(1, 200)
        assert await store.channels() == [cid(1)]
    finally:
        await store.close()


async def test_async_does_not_block_loop(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        for a in range(1, 21):
            assert await store.accept(v(1, a))
    finally:
        task.cancel()
        await store.close()
    assert ticks >= 20  # the loop kept running while SQLite fsynced


# -- crash safety ----------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from blendsm.broker._store import VoucherStore
    from blendsm.device_sdk import Voucher
    LANE = "0x" + "ab" * 20
    store = VoucherStore(sys.argv[1], lane=LANE)
    n = 0
    while True:
        n += 1
        ch = (n % 3).to_bytes(32, "big")
        assert store.accept(Voucher(ch, LANE, n, b"\\x11" * 65))
        print(f"ACK {n}", flush=True)
    """
)


def test_acked_vouchers_survive_sigkill(db: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) >= 60:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=10)
    acked += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("ACK ")]
    assert len(acked) >= 60, err
    assert proc.returncode == -signal.SIGKILL
    with VoucherStore(db, lane=LANE) as s:
        for ch in range(3):
            last_ack = max(n for n in acked if n % 3 == ch)
            latest = s.latest(cid(ch))
            assert latest is not None
            assert latest.cumulative_amount >= last_ack


# -- claims ----------------------------------------------------------------------------


def test_claim_lifecycle(store: VoucherStore) -> None:
    assert store.begin_claim(cid(1)) is None  # no voucher
    store.accept(v(1, 100))
    intent = store.begin_claim(cid(1))
    assert intent is not None
    assert (intent.amount, intent.state, intent.voucher) == (100, "intent", v(1, 100))
    assert store.begin_claim(cid(1)) is None  # one in flight per channel
    store.claim_sent(intent.intent_id, b"\xaa" * 32)
    store.claim_sent(intent.intent_id, b"\xaa" * 32)  # idempotent
    with pytest.raises(StoreError, match="cannot become 'sent'"):
        store.claim_sent(intent.intent_id, b"\xbb" * 32)
    assert [p.intent_id for p in store.pending_claims()] == [intent.intent_id]
    store.claim_confirmed(intent.intent_id, 100)
    assert store.pending_claims() == []
    assert store.claimed_onchain(cid(1)) == 100
    assert store.begin_claim(cid(1)) is None  # amount already covered
    store.accept(v(1, 150))
    nxt = store.begin_claim(cid(1))
    assert nxt is not None
    assert nxt.amount == 150


def test_no_claim_above_the_limit(store: VoucherStore) -> None:
    store.accept(v(1, 100))
    assert store.begin_claim(cid(1), limit=99) is None  # delivered less than the voucher
    intent = store.begin_claim(cid(1), limit=100)
    assert intent is not None
    assert intent.amount == 100


def test_no_second_intent_for_confirmed_amount(store: VoucherStore) -> None:
    store.accept(v(1, 100))
    intent = store.begin_claim(cid(1))
    assert intent is not None
    # Deposit cap: chain paid only 60 of 100; the same voucher is not claimed again.
    store.claim_confirmed(intent.intent_id, 60)
    assert store.claimed_onchain(cid(1)) == 60
    assert store.begin_claim(cid(1)) is None
    # claimed_onchain never goes down.
    store.accept(v(1, 120))
    again = store.begin_claim(cid(1))
    assert again is not None
    store.claim_confirmed(again.intent_id, 120)
    with pytest.raises(StoreError):
        store.claim_failed(again.intent_id, "late", 0.0)
    assert store.claimed_onchain(cid(1)) == 120


def test_claimed_onchain_never_goes_down(store: VoucherStore) -> None:
    """A late confirmation with an older on-chain amount (the same intent confirmed again by
    a reconciliation that read an older block) must not lower the recorded claim: a lower
    record would open a second claim for an amount already paid."""
    store.accept(v(1, 100))
    first = store.begin_claim(cid(1))
    assert first is not None
    store.claim_confirmed(first.intent_id, 100)
    store.accept(v(1, 150))
    second = store.begin_claim(cid(1))
    assert second is not None
    store.claim_confirmed(second.intent_id, 150)
    store.claim_confirmed(first.intent_id, 100)  # confirmed again, from an older reading
    assert store.claimed_onchain(cid(1)) == 150
    assert [b.claimed_onchain for b in store.balances()] == [150]
    assert store.begin_claim(cid(1)) is None  # 150 is paid: no second claim for it


def test_failed_claim_retries_after_retry_at(store: VoucherStore) -> None:
    store.accept(v(1, 100))
    intent = store.begin_claim(cid(1), now=1000.0)
    assert intent is not None
    store.claim_sent(intent.intent_id, b"\x01" * 32)
    store.claim_failed(intent.intent_id, "dropped", retry_at=1060.0)
    assert store.begin_claim(cid(1), now=1059.0) is None
    retry = store.begin_claim(cid(1), now=1060.0)
    assert retry is not None
    assert retry.amount == 100
    assert retry.intent_id != intent.intent_id


def test_unknown_intent(store: VoucherStore) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        store.claim_confirmed(42, 1)


def test_restart_resumes_pending_claims(db: Path) -> None:
    with VoucherStore(db, lane=LANE) as s:
        for ch in (1, 2, 3):
            s.accept(v(ch, 100 * ch))
        sent = s.begin_claim(cid(1))
        unsent = s.begin_claim(cid(2))  # crash may hit between broadcast and claim_sent
        done = s.begin_claim(cid(3))
        assert sent is not None
        assert unsent is not None
        assert done is not None
        s.claim_sent(sent.intent_id, b"\x01" * 32)
        s.claim_sent(done.intent_id, b"\x03" * 32)
        s.claim_confirmed(done.intent_id, 300)

    onchain = {cid(1): 100, cid(2): 0}  # chain: claim 1 mined, claim 2 never broadcast
    with VoucherStore(db, lane=LANE) as s:
        pending = s.pending_claims()
        assert [(p.channel_id, p.state, p.tx_hash) for p in pending] == [
            (cid(1), "sent", b"\x01" * 32),
            (cid(2), "intent", None),
        ]
        for channel in (1, 2, 3):
            assert s.begin_claim(cid(channel)) is None  # nothing new before reconciling
        for p in pending:  # the documented rule
            if onchain[p.channel_id] >= p.amount:
                s.claim_confirmed(p.intent_id, onchain[p.channel_id])
            else:
                s.claim_failed(p.intent_id, "not on chain after restart", retry_at=0.0)
        assert s.pending_claims() == []
        assert s.begin_claim(cid(1)) is None  # covered on chain: never claimed twice
        assert s.begin_claim(cid(3)) is None
        retry = s.begin_claim(cid(2))
        assert retry is not None
        assert retry.amount == 200


async def test_async_claims(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    try:
        await store.accept(v(1, 5))
        intent = await store.begin_claim(cid(1))
        assert intent is not None
        await store.claim_sent(intent.intent_id, b"\x05" * 32)
        assert len(await store.pending_claims()) == 1
        await store.claim_confirmed(intent.intent_id, 5)
        assert await store.claimed_onchain(cid(1)) == 5
        assert await store.begin_claim(cid(1)) is None
    finally:
        await store.close()


@pytest.fixture
def garbage_db(db: Path) -> Path:
    db.write_bytes(b"garbage" * 1000)
    return db


async def test_async_open_error_is_clear(garbage_db: Path) -> None:
    with pytest.raises(StoreError):
        await AsyncVoucherStore.open(garbage_db, lane=LANE)


def test_accept_latency(store: VoucherStore) -> None:
    n = 50
    start = time.perf_counter()
    for a in range(1, n + 1):
        store.accept(v(1, a))
    per_ms = (time.perf_counter() - start) / n * 1000
    print(f"accept() latency: {per_ms:.2f} ms (synchronous=FULL, WAL)")
    assert per_ms < 500


# -- group commit ----------------------------------------------------------------------


def test_accept_many_one_transaction(store: VoucherStore) -> None:
    assert store.accept(v(1, 10))
    before = store.commits
    batch = [
        (v(1, 5), None),  # below the stored 10
        (v(1, 12), 2),
        (v(2, 7), None),
        (v(1, 11), None),  # below 12, earlier in this batch
        (v(1, 12, b"\x03" * 65), None),  # equal to 12: refused, first kept
        (v(2, 9), 2),
        (v(1, 20), None),
    ]
    assert store.accept_many(batch) == [False, True, True, False, False, True, True]
    assert store.commits == before + 1
    assert store.latest(cid(1)) == v(1, 20)
    assert store.latest(cid(2)) == v(2, 9)
    assert store.accept_many([]) == []
    assert store.commits == before + 1


def test_accept_many_is_all_or_nothing(store: VoucherStore) -> None:
    with pytest.raises(ValueError, match="uint256"):
        store.accept_many([(v(1, 5), None), (v(2, 5), -1)])  # bad hint: nothing stored
    assert store.channels() == []


def test_balances(store: VoucherStore) -> None:
    for ch, amount in ((1, 100), (2, 50), (3, 70)):
        store.accept(v(ch, amount))
    intent = store.begin_claim(cid(2))
    assert intent is not None
    store.claim_confirmed(intent.intent_id, 50)
    assert [(b.channel_id, b.amount, b.claimed_onchain) for b in store.balances()] == [
        (cid(1), 100, 0),
        (cid(2), 50, 50),
        (cid(3), 70, 0),
    ]
    assert [b.channel_id for b in store.balances(unclaimed_only=True)] == [cid(1), cid(3)]
    picked = store.balances([cid(3), cid(9), cid(2)])
    assert [(b.channel_id, b.unclaimed) for b in picked] == [(cid(2), 0), (cid(3), 70)]
    assert store.balances([]) == []
    many = [cid(n) for n in range(1200)]  # more ids than one IN (...) chunk
    assert len(store.balances(many)) == 3


async def test_async_group_commit(db: Path) -> None:
    """200 concurrent accepts over 5 channels: right maxima, right per-caller results, and
    far fewer fsyncs than vouchers."""
    store = await AsyncVoucherStore.open(db, lane=LANE)
    try:
        rng = random.Random(11)
        calls = [(ch, rng.randrange(1, 60)) for ch in range(5) for _ in range(40)]
        rng.shuffle(calls)
        before = store.commits
        results = await asyncio.gather(*(store.accept(v(ch, a), a) for ch, a in calls))
        commits = store.commits - before
        # Calls are queued in gather's order, so each is newer iff above all before it.
        best: dict[int, int] = {}
        expected = []
        for ch, a in calls:
            expected.append(a > best.get(ch, 0))
            best[ch] = max(best.get(ch, 0), a)
        assert results == expected
        for ch in range(5):
            assert await store.latest(cid(ch)) == v(ch, best[ch])
        assert 1 <= commits <= 10, commits
    finally:
        await store.close()


async def test_async_group_commit_failure_reaches_every_caller(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    try:
        calls = 0

        def broken(vouchers: object) -> list[bool]:
            nonlocal calls
            calls += 1
            raise StoreError("disk on fire")

        store._store.accept_many = broken  # type: ignore[method-assign]
        outcomes = await asyncio.gather(
            *(store.accept(v(ch, 1)) for ch in range(10)), return_exceptions=True
        )
        assert calls == 1
        assert all(isinstance(o, StoreError) for o in outcomes)
        del store._store.accept_many  # the class's method again
        assert await store.accept(v(1, 1))  # the queue recovers
    finally:
        await store.close()


async def test_async_accept_bad_input_fails_alone(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    try:
        good, bad = await asyncio.gather(
            store.accept(v(1, 1)), store.accept(v(2, 1), -5), return_exceptions=True
        )
        assert good is True
        assert isinstance(bad, ValueError)
        assert await store.channels() == [cid(1)]
    finally:
        await store.close()


async def test_async_close_waits_for_queued_accepts(db: Path) -> None:
    store = await AsyncVoucherStore.open(db, lane=LANE)
    tasks = [asyncio.create_task(store.accept(v(1, a))) for a in range(1, 31)]
    await asyncio.sleep(0)
    await store.close()
    assert all(t.done() for t in tasks)
    with VoucherStore(db, lane=LANE) as s:
        assert s.latest(cid(1)) == v(1, 30)


# -- delivered value (schema 2) ---------------------------------------------------------

_SCHEMA_1 = """
CREATE TABLE channels (
    channel_id      BLOB PRIMARY KEY CHECK (length(channel_id) = 32),
    amount          BLOB NOT NULL CHECK (length(amount) = 32),
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
"""The schema version 1 brokers wrote (released before delivered value was stored)."""


def _u(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_a_version_1_store_is_migrated_and_seeds_delivered_from_the_onchain_claim(
    db: Path,
) -> None:
    with contextlib.closing(sqlite3.connect(db)) as old:
        old.executescript(_SCHEMA_1)
        old.executemany(
            "INSERT INTO channels (channel_id, amount, signature, accepted_at, claimed_onchain)"
            " VALUES (?, ?, ?, 0, ?)",
            [(cid(1), _u(100), SIG, _u(30)), (cid(2), _u(50), SIG, _u(0))],
        )
        old.execute(
            "INSERT INTO claims (channel_id, amount, signature, state, created_at, updated_at)"
            " VALUES (?, ?, ?, 'sent', 0, 0)",
            (cid(1), _u(30), SIG),
        )
        old.execute(f"PRAGMA application_id={APPLICATION_ID}")
        old.execute("PRAGMA user_version=1")
        old.commit()
    with VoucherStore(db, lane=LANE) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        # Known delivered: what was claimed (the rule); the 70 above it stays credit.
        assert store.delivered() == [(cid(1), 30), (cid(2), 0)]
        assert store.latest(cid(1)) == v(1, 100)
        assert [i.amount for i in store.pending_claims()] == [30]
        store.record_delivered([(cid(1), 40)])
    with VoucherStore(db, lane=LANE) as store:  # opened again: already version 2, nothing re-seeded
        assert store.delivered() == [(cid(1), 40), (cid(2), 0)]


def test_a_failed_migration_leaves_version_1_untouched(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as old:
        old.executescript(_SCHEMA_1)
        old.execute("CREATE TABLE delivered (x)")  # in the way: the step fails
        old.execute(f"PRAGMA application_id={APPLICATION_ID}")
        old.execute("PRAGMA user_version=1")
        old.commit()
    with pytest.raises(StoreError, match="upgrade from schema version 1"):
        VoucherStore(db, lane=LANE)
    with contextlib.closing(sqlite3.connect(db)) as old:
        assert old.execute("PRAGMA user_version").fetchone()[0] == 1


def test_delivered_value_only_rises(store: VoucherStore) -> None:
    store.record_delivered([(cid(1), 50), (cid(2), 7)])
    store.record_delivered([(cid(1), 40)])  # a stale snapshot never lowers it
    assert store.delivered() == [(cid(1), 50), (cid(2), 7)]
    store.record_delivered([])
    assert store.delivered() == [(cid(1), 50), (cid(2), 7)]


def test_delivered_value_rides_in_the_voucher_batch_transaction(store: VoucherStore) -> None:
    before = store.commits
    assert store.accept_many([(v(1, 100), None)], [(cid(1), 20), (cid(3), 5)]) == [True]
    assert store.commits == before + 1
    assert store.delivered() == [(cid(1), 20), (cid(3), 5)]
    with pytest.raises(ValueError, match="uint256"):  # all or nothing, delivered included
        store.accept_many([(v(1, 200), None)], [(cid(1), 30), (cid(2), -1)])
    assert store.delivered() == [(cid(1), 20), (cid(3), 5)]
    assert store.latest(cid(1)) == v(1, 100)


def test_a_claim_intent_records_its_delivered_limit(store: VoucherStore) -> None:
    store.accept(v(1, 100))
    assert store.begin_claim(cid(1), limit=120) is not None
    assert store.delivered() == [(cid(1), 120)]  # a claim is never above the stored value
