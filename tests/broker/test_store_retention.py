"""Schema 3 of the voucher store: the accepted vouchers above a channel's claim are kept
(bounded), so a claim can use the highest one within delivered value instead of waiting for
the latest (which a buyer's vouchers may keep ahead of the broker's count forever)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from blendsm.broker._store import APPLICATION_ID, SCHEMA_VERSION, VoucherStore
from blendsm.device_sdk import Voucher
from blendsm.errors import StoreError

SIG = bytes(range(65))
V2_FILE = Path(__file__).parent / "data" / "vouchers-v2.sqlite3"
"""Written by the schema 2 broker (d1ed97b): channel 1 has latest 3000, 1000 claimed on
chain (a confirmed intent), delivered 2500; channel 2 has latest 500, delivered 500 and a
sent intent for 500."""

#: TEST ONLY: the broker key whose lane the store keeps (any address).
LANE = "0x" + "ab" * 20


def cid(n: int) -> bytes:
    return n.to_bytes(32, "big")


def sig(amount: int) -> bytes:
    return amount.to_bytes(65, "big")  # tells apart which voucher a claim carries


def v(channel: int, amount: int) -> Voucher:
    return Voucher(cid(channel), LANE, amount, sig(amount))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "vouchers.sqlite"


@pytest.fixture
def store(db: Path) -> Iterator[VoucherStore]:
    with VoucherStore(db, lane=LANE, keep=4) as s:
        yield s


def test_a_claim_uses_the_highest_voucher_within_the_limit(store: VoucherStore) -> None:
    for amount in (1000, 2000, 3000):
        assert store.accept(v(1, amount))
    intent = store.begin_claim(cid(1), limit=2500)
    assert intent is not None
    assert (intent.amount, intent.signature) == (2000, sig(2000))  # its own signature
    store.claim_confirmed(intent.intent_id, 2000)
    assert store.begin_claim(cid(1), limit=2500) is None  # 3000 is still credit
    again = store.begin_claim(cid(1), limit=3000)
    assert again is not None
    assert again.amount == 3000
    assert store.begin_claim(cid(2), limit=10**9) is None  # no voucher at all


def test_no_limit_claims_the_latest(store: VoucherStore) -> None:
    for amount in (1000, 2000, 3000):
        store.accept(v(1, amount))
    intent = store.begin_claim(cid(1))
    assert intent is not None
    assert intent.amount == 3000


def test_min_gain_leaves_a_small_claim_for_later(store: VoucherStore) -> None:
    for amount in (1000, 2000, 3000):
        store.accept(v(1, amount))
    assert store.begin_claim(cid(1), limit=2500, min_gain=2001) is None
    intent = store.begin_claim(cid(1), limit=2500, min_gain=2000)
    assert intent is not None
    assert intent.amount == 2000


def test_vouchers_below_the_claimable_one_are_pruned(store: VoucherStore) -> None:
    store.accept_many([(v(1, a), None) for a in (1000, 2000, 3000)], [(cid(1), 2500)])
    assert store.accepted(cid(1)) == [2000, 3000]  # 1000 can never be the best claim again
    store.record_delivered([(cid(1), 3000)])
    store.accept(v(1, 4000))
    assert store.accepted(cid(1)) == [3000, 4000]


def test_vouchers_covered_on_chain_are_pruned(store: VoucherStore) -> None:
    for amount in (1000, 2000, 3000):
        store.accept(v(1, amount))
    intent = store.begin_claim(cid(1), limit=2000)
    assert intent is not None
    store.claim_confirmed(intent.intent_id, 2000)
    assert store.accepted(cid(1)) == [3000]


def test_the_cap_keeps_the_oldest_above_delivered_and_the_latest(store: VoucherStore) -> None:
    """Over ``keep`` vouchers, the newest but one goes: the oldest ones are the next to become
    claimable as delivery catches up (dropping them instead would stall the claim again),
    and the latest is what a channel that stops being fed ends at."""
    for amount in range(100, 1001, 100):
        store.accept(v(1, amount))
    assert store.accepted(cid(1)) == [100, 200, 300, 1000]
    store.record_delivered([(cid(1), 250)])
    store.accept(v(1, 1100))  # 100 is obsolete now: 200 is claimable; room for 1000
    assert store.accepted(cid(1)) == [200, 300, 1000, 1100]
    intent = store.begin_claim(cid(1), limit=250)
    assert intent is not None
    assert intent.amount == 200
    assert store.latest(cid(1)) == v(1, 1100)


def test_retained_vouchers_survive_a_reopen(db: Path) -> None:
    with VoucherStore(db, lane=LANE) as store:
        for amount in (1000, 2000, 3000):
            store.accept(v(1, amount))
    with VoucherStore(db, lane=LANE) as store:
        assert store.accepted(cid(1)) == [1000, 2000, 3000]
        intent = store.begin_claim(cid(1), limit=2999)
        assert intent is not None
        assert intent.signature == sig(2000)


def test_keep_must_hold_the_claimable_and_the_latest(db: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        VoucherStore(db, lane=LANE, keep=1)


def test_a_real_version_2_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    shutil.copy(V2_FILE, path)
    with contextlib.closing(sqlite3.connect(path)) as old:
        assert old.execute("PRAGMA user_version").fetchone()[0] == 2
    with VoucherStore(path, lane=LANE) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        # Schema 2 kept only the latest voucher: that is what there is to keep.
        assert store.accepted(cid(1)) == [3000]
        assert store.accepted(cid(2)) == [500]
        assert store.delivered() == [(cid(1), 2500), (cid(2), 500)]
        assert [(i.channel_id, i.amount, i.state) for i in store.pending_claims()] == [
            (cid(2), 500, "sent")
        ]
        assert store.claimed_onchain(cid(1)) == 1000
        assert store.begin_claim(cid(1), limit=2500) is None  # 3000 is above delivered
        store.accept_many([(v(1, 4000), None)], [(cid(1), 3500)])
        intent = store.begin_claim(cid(1), limit=3500)
        assert intent is not None
        assert intent.amount == 3000  # the old latest, claimable now
    with VoucherStore(path, lane=LANE) as store:  # opened again: version 3, nothing re-seeded
        assert store.accepted(cid(1)) == [3000, 4000]


def test_a_failed_upgrade_leaves_version_2_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    shutil.copy(V2_FILE, path)
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute("CREATE TABLE vouchers (x)")  # in the way: the step fails
        old.commit()
    with pytest.raises(StoreError, match="upgrade from schema version 2"):
        VoucherStore(path, lane=LANE)
    with contextlib.closing(sqlite3.connect(path)) as old:
        assert old.execute("PRAGMA user_version").fetchone()[0] == 2
        assert old.execute("SELECT count(*) FROM channels").fetchone()[0] == 2


# --------------------------------------------------------------------------------- lanes

OPERATOR = "0x" + "0c" * 20  # TEST ONLY: the operator, whose lane older files belonged to


def test_a_version_3_store_is_migrated_to_the_operator_lane(tmp_path: Path) -> None:
    """Issue 14: rows from before lanes are kept, all of them, on the operator's own lane;
    a broker with its own key then keeps its lane apart and reports the operator's rows."""
    from blendsm.broker import _voucher_schema as schema

    path = tmp_path / "v3.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(schema._SCHEMA_V1 + schema._DELIVERED_TABLE + schema._VOUCHERS_TABLE)
        u = lambda n: n.to_bytes(32, "big")  # noqa: E731
        old.execute(
            "INSERT INTO channels (channel_id, amount, signature, accepted_at, claimed_onchain)"
            " VALUES (?, ?, ?, 0, ?)",
            (cid(1), u(100), sig(100), u(30)),
        )
        old.execute(
            "INSERT INTO vouchers (channel_id, amount, signature, accepted_at) VALUES (?, ?, ?, 0)",
            (cid(1), u(100), sig(100)),
        )
        old.execute(
            "INSERT INTO claims (channel_id, amount, signature, state, created_at, updated_at)"
            " VALUES (?, ?, ?, 'sent', 0, 0)",
            (cid(1), u(30), sig(30)),
        )
        old.execute(
            "INSERT INTO delivered (channel_id, charged, updated_at) VALUES (?, ?, 0)",
            (cid(1), u(80)),
        )
        old.execute(f"PRAGMA application_id={APPLICATION_ID}")
        old.execute("PRAGMA user_version=3")
        old.commit()
    operator_lane = Voucher(cid(1), OPERATOR, 100, sig(100)).lane
    with VoucherStore(path, lane=OPERATOR) as store:  # one broker: its lane is the operator's
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert store.latest(cid(1)) == Voucher(cid(1), OPERATOR, 100, sig(100))
        assert store.accepted(cid(1)) == [100]
        assert store.delivered() == [(cid(1), 80)]
        (pending,) = store.pending_claims()
        assert (pending.amount, pending.lane) == (30, operator_lane)
        assert pending.voucher.lane == operator_lane
        assert store.other_lanes() == []
    with VoucherStore(path, lane=LANE, legacy_lane=OPERATOR) as store:  # its own key now
        assert store.latest(cid(1)) is None
        assert store.delivered() == []
        assert store.other_lanes() == [(cid(1), operator_lane, 70)]
        assert store.accept(v(1, 10))  # its own lane starts at 0, apart from the operator's
        with pytest.raises(ValueError, match="lane"):
            store.accept(Voucher(cid(1), OPERATOR, 200, sig(200)))
        assert [b.amount for b in store.balances()] == [10]
