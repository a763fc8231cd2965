"""Anchoring message leaves against the real DataAnchors contract (embedded py-evm and
anvil): batches by count and by time, one transaction per batch, proofs that verify off
and on chain, exactly-once anchoring across a crash, and a node that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import enrol, eventually, running

from blendsm.broker._anchor_records import AnchorRecord, LeafRow
from blendsm.broker._anchors import AnchorConfig, Anchorer
from blendsm.broker._leaf_store import AsyncLeafStore, LeafStore
from blendsm.contracts import Marketplace, Role, connect, disconnect, test_account
from blendsm.device_sdk import (
    AnchorNotice,
    Envelope,
    EnvelopeSigner,
    MessageDomain,
    ProofRequest,
    Refusal,
    decode_anchor_notice,
    decode_any_notice,
    encode_anchor_notice,
    encode_notice,
    message_leaf,
    verify_proof,
)
from blendsm.errors import ConfigError, StoreError

BOTH = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

MakeMp = Callable[[str], Marketplace]
NEVER = 10**6  # a batch_seconds no test reaches
TOPIC = "sensors/berlin/temp"


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncLeafStore]:
    s = await AsyncLeafStore.open(tmp_path / "leaves.sqlite3")
    yield s
    await s.close()


async def enrol_operator(chain: Any, mp: MakeMp) -> str:
    """DataAnchors.anchor needs an active Operator: apply and let the oracle approve."""
    return await enrol(mp, chain, "operator", Role.OPERATOR)


def signer(chain: Any, label: str = "device") -> EnvelopeSigner:
    """A device signing with a TEST-ONLY key (derived from its label)."""
    domain = MessageDomain(int(chain.w3.eth.chain_id), chain.deployment.address("Registry"))
    return EnvelopeSigner(bytes(test_account(label).key), domain)


def messages(
    dev: EnvelopeSigner, count: int, start: int = 1, topic: str = TOPIC
) -> list[tuple[str, Envelope, bytes]]:
    out = []
    for seq in range(start, start + count):
        env = dev.sign(topic, f'{{"t": {seq}}}'.encode(), seq, 1_700_000_000_000 + seq)
        out.append((topic, env, message_leaf(dev.domain, topic, env)))
    return out


def anchorer(store: AsyncLeafStore, mp: MakeMp | Marketplace, **kw: Any) -> Anchorer:
    """An anchorer whose leaves all trigger roots (``unsold_batch_seconds=0``: these tests are
    about batching and proofs; which leaves are sold is tests/broker/test_anchor_budget.py)."""
    kw.setdefault("batch_seconds", NEVER)
    kw.setdefault("unsold_batch_seconds", 0)
    kw.setdefault("root_spacing_seconds", 0)  # the pacing: tests/broker/test_anchor_budget.py
    kw.setdefault("max_leaves_per_root", kw.get("batch_max_leaves", 1000))  # roots of N leaves
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_max", 0.2)
    options = {k: kw.pop(k) for k in ("on_anchored", "logger", "seller_of", "clock") if k in kw}
    market = mp if isinstance(mp, Marketplace) else mp("operator")
    return Anchorer(store, market, AnchorConfig(**kw), **options)


def anchored_events(chain: Any) -> list[Any]:
    return list(chain.DataAnchors.events.Anchored().get_logs(from_block=0))


async def add_all(a: Anchorer, msgs: list[tuple[str, Envelope, bytes]]) -> None:
    await asyncio.gather(*(a.add(t, e, leaf) for t, e, leaf in msgs))


async def check_proofs(
    chain: Any,
    a: Anchorer,
    msgs: list[tuple[str, Envelope, bytes]],
    on_chain_every: int = 1,
) -> set[int]:
    """Every message has a proof that verifies off chain, and (every ``on_chain_every``-th)
    on chain through DataAnchors.verify. Returns the batch ids seen."""
    operator = a.operator
    batches: set[int] = set()
    on_chain = []
    for i, (topic, env, leaf) in enumerate(msgs):
        p = await a.proof(topic, env.sequence, env.device_address)
        assert p is not None, f"message {env.sequence} has no proof"
        assert p.leaf == leaf
        assert p.envelope == env.encode()
        assert p.device == env.device_address
        assert verify_proof(p.leaf, p.proof, p.root)
        assert (await a.proof_by_leaf(leaf)) == p
        batches.add(p.batch_id)
        if i % on_chain_every == 0 or i == len(msgs) - 1:
            on_chain.append((p.batch_id, p.leaf, p.proof))
    anchors = a.marketplace.anchors
    for start in range(0, len(on_chain), 50):  # a few calls in flight, not a thousand
        chunk = on_chain[start : start + 50]
        assert all(await asyncio.gather(*(anchors.verify(operator, *c) for c in chunk)))
    return batches


# --- the store ----------------------------------------------------------------------------


def _row(i: int) -> LeafRow:
    return LeafRow(TOPIC, bytes(19) + bytes([1]), i, i.to_bytes(32, "big"), b"env", 1.0 + i)


def test_handed_marks_ride_with_their_rows(tmp_path: Path) -> None:
    """A mark for a row of the same group is stored with the row; a mark for a row stored
    earlier, or for a copy already stored, is an update in the same transaction."""
    with LeafStore(tmp_path / "leaves.sqlite3") as s:
        assert s.add_many([_row(1), _row(2)], [_row(1).leaf]) == [True, True]
        assert (s.handed_state(_row(1).leaf), s.handed_state(_row(2).leaf)) == (1, 0)
        commits = s.commits
        assert s.add_many([_row(3), _row(2), _row(3)], [_row(2).leaf, _row(3).leaf]) == [
            True,
            False,
            False,
        ]
        assert s.commits == commits + 1
        assert [s.handed_state(_row(i).leaf) for i in (1, 2, 3)] == [1, 1, 1]
        assert s.leaf_count() == 3


def test_store_schema_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "leaves.sqlite3"
    with LeafStore(path) as s:
        assert s.add_many([_row(1), _row(2), _row(1)]) == [True, True, False]
        assert s.pending() == (2, 2.0)
    with LeafStore(path) as s:  # reopened: same rows
        assert s.leaf_count() == 2
        mode = s._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    foreign = tmp_path / "foreign.sqlite3"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE x (y)")
    db.close()
    with pytest.raises(StoreError, match="not a BlendSM leaf store"):
        LeafStore(foreign)
    with pytest.raises(StoreError, match="topic"):
        LeafStore(path).add_many([LeafRow("", bytes(20), 1, bytes(32), b"", 0.0)])


def test_store_seal_is_write_ahead_and_single(tmp_path: Path) -> None:
    with LeafStore(tmp_path / "l.sqlite3") as s:
        assert s.seal_batch(10) is None  # nothing pending
        s.add_many([_row(i) for i in range(1, 8)])
        b1 = s.seal_batch(5, chain_latest=41)
        assert b1 is not None
        assert (b1.batch_id, b1.leaf_count, b1.state) == (42, 5, "intent")
        with pytest.raises(StoreError, match="still open"):
            s.seal_batch(5)
        assert s.proof_for_leaf(_row(1).leaf) is None  # not anchored yet
        s.mark_sent(42, b"\x11" * 32)
        s.mark_confirmed(42, b"\x22" * 32, 7, 60_000)
        p = s.proof_for(TOPIC, None, 3)
        assert p is not None
        assert p.index == 2
        assert p.batch_id == 42
        assert p.tx_hash == b"\x22" * 32
        assert verify_proof(p.leaf, p.proof, p.root)
        b2 = s.seal_batch(5)  # local id beats a stale chain_latest
        assert b2 is not None
        assert (b2.batch_id, b2.leaf_count) == (43, 2)
        s.mark_failed(43, "taken")  # leaves go back to the pool, the id is never reused
        assert s.pending() == (2, 7.0)
        b3 = s.seal_batch(5)
        assert b3 is not None
        assert (b3.batch_id, b3.leaf_count) == (44, 2)
        assert [b.state for b in s.batches()] == ["confirmed", "failed", "intent"]
        with pytest.raises(StoreError, match="cannot become"):
            s.mark_failed(42, "confirmed stays confirmed")


def test_the_tree_cache_is_bounded_by_leaves_and_proofs_survive_eviction(tmp_path: Path) -> None:
    """A root may cover 2**20 leaves (about 130 MB of tree): eight cached trees are bounded
    by their leaves too; the proof of an evicted tree's leaf comes from its chunk's rows and
    leaves the cache as it was (:mod:`blendsm.broker._leaf_proofs`)."""
    with LeafStore(tmp_path / "l.sqlite3", tree_cache_leaves=10) as s:
        s.add_many([_row(i) for i in range(1, 19)])
        for batch_id in (1, 2, 3):
            assert s.seal_batch(6) is not None
            s.mark_confirmed(batch_id, b"\x22" * 32, batch_id)
        assert s.trees.batch_ids() == [3]  # two trees (12 leaves) would pass 10
        assert s.trees.leaves == 6
        p = s.proof_for(TOPIC, None, 2)  # batch 1: from its one chunk, not cached
        assert p is not None
        assert p.batch_id == 1
        assert verify_proof(p.leaf, p.proof, p.root)
        assert s.trees.batch_ids() == [3]
        assert s.proofs.leaves_hashed == 6


@pytest.mark.parametrize("sold_first", [False, True])
def test_a_seal_of_more_leaves_than_one_statement_places_every_leaf(
    tmp_path: Path, sold_first: bool
) -> None:
    """A seal updates its leaves 512 at a time (the event loop gets its turn between): one
    run of indexes by ranges, a sold-first choice (not one run) row by row. Every leaf must
    land at its place in the tree either way, the last slice's included."""
    other = "sensors/paris/temp"
    rows = [_row(i) if i % 2 else dataclasses.replace(_row(i), topic=other) for i in range(1, 1301)]
    with LeafStore(tmp_path / "l.sqlite3") as s:
        s.add_many(rows)
        sold = {TOPIC: 10_000.0} if sold_first else {}
        batch, more_sold = s.seal_sold_first(1100, 0, None, sold)
        assert batch is not None
        assert (batch.leaf_count, more_sold) == (1100, False)
        s.mark_confirmed(batch.batch_id, b"\x22" * 32, 1)
        s.trees.forget(batch.batch_id)  # proofs from the rows' positions, not the seal's tree
        # sold first: the 650 odd (sold) ones, then the oldest 450 others
        chosen = sorted(
            [i for i in range(1, 1301) if i % 2] + [i for i in range(2, 1301, 2)][:450]
            if sold_first
            else range(1, 1101)
        )
        for position in (0, 511, 512, 513, 1023, 1024, 1099):
            sequence = chosen[position]
            p = s.proof_for(TOPIC if sequence % 2 else other, None, sequence)
            assert p is not None
            assert p.index == position
            assert verify_proof(p.leaf, p.proof, p.root)


def test_a_sold_first_seal_over_many_topics_takes_the_oldest_sold_leaves(tmp_path: Path) -> None:
    """The candidates of a sold-first seal are cut back to the oldest ``max + 1`` as the topics
    are read (a root may take 100,000 leaves: one list of every topic's would not be bounded);
    the root still gets the oldest sold leaves, and says more were left."""
    rows = [dataclasses.replace(_row(i), topic=f"t/{i % 5}") for i in range(1, 21)]
    with LeafStore(tmp_path / "l.sqlite3") as s:
        s.add_many(rows)
        sold = {f"t/{t}": 10_000.0 for t in range(5)}  # 4 rows a topic, cut back twice
        batch, more_sold = s.seal_sold_first(3, 0, None, sold)
        assert batch is not None
        assert (batch.leaf_count, more_sold) == (3, True)
        s.mark_confirmed(batch.batch_id, b"\x22" * 32, 1)
        for position, sequence in enumerate((1, 2, 3)):
            p = s.proof_for(f"t/{sequence % 5}", None, sequence)
            assert p is not None
            assert p.index == position
        assert s.pending() == (17, 5.0)  # leaf 4 (received at 5.0) waits


async def test_group_commit_and_nowait(store: AsyncLeafStore) -> None:
    before = store.commits
    results = await asyncio.gather(*(store.add(_row(i)) for i in range(1, 101)))
    assert all(results)
    assert store.commits - before < 10  # 100 adds, a handful of fsyncs
    store.add_nowait(_row(101))
    await store.drain()
    assert await store.pending() == (101, 2.0)
    with pytest.raises(StoreError):
        await store.add(LeafRow(TOPIC, b"short", 1, bytes(32), b"", 0.0))


def test_config_checks() -> None:
    with pytest.raises(ConfigError):
        AnchorConfig(batch_max_leaves=0)
    with pytest.raises(ConfigError, match="max_leaves_per_root"):
        AnchorConfig(max_leaves_per_root=0)
    with pytest.raises(ConfigError, match="root_spacing_seconds"):
        AnchorConfig(root_spacing_seconds=-1)
    with pytest.raises(ConfigError):
        AnchorConfig(batch_seconds=0)
    with pytest.raises(ConfigError, match="pause_seconds"):
        AnchorConfig(pause_seconds=-0.1)


# --- on chain -----------------------------------------------------------------------------


@BOTH
async def test_batches_by_count_and_proofs(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    operator = await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 1000)
    records: list[AnchorRecord] = []
    a = anchorer(store, mp, batch_max_leaves=300, on_anchored=records.append)
    async with running(a):
        await add_all(a, msgs)
        await eventually(lambda: a.batches_anchored == 3)
        await asyncio.sleep(0.05)
        assert a.batches_anchored == 3  # 100 leaves wait for the clock (or anchor_now)
        assert await a.proof(TOPIC, 1000) is None
        rest = await a.anchor_now()
    assert [r.leaf_count for r in records] == [300, 300, 300, 100]
    assert [r.leaf_count for r in rest] == [100]
    assert [r.batch_id for r in records] == [1, 2, 3, 4]
    events = anchored_events(chain)
    assert len(events) == 4  # one transaction per batch
    assert [bytes(e["args"]["root"]) for e in events] == [r.root for r in records]
    assert all(e["args"]["broker"] == operator for e in events)
    assert [bytes(e["transactionHash"]) for e in events] == [r.tx_hash for r in records]
    assert a.leaves == 1000
    assert a.last_batch_id == 4
    assert a.failures == 0
    # All 1000 verify off chain; on chain all of them on anvil, every 10th on py-evm (~9 ms
    # a call there, 1000 would take the test past 10 s).
    on_chain_every = 1 if chain.kind == "anvil" else 10
    assert await check_proofs(chain, a, msgs, on_chain_every) == {1, 2, 3, 4}
    assert await chain_latest(mp, operator) == 4
    # The notice the broker broadcasts for a record round-trips.
    r = records[0]
    notice = r.notice()
    assert notice == AnchorNotice(r.batch_id, r.root, r.leaf_count, r.tx_hash)
    assert decode_anchor_notice(encode_anchor_notice(notice)) == notice


async def chain_latest(mp: MakeMp, operator: str) -> int:
    return await mp("operator").anchors.latest_batch_id(operator)


@BOTH
async def test_batches_by_time(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 5)
    # The anchorer's own clock, so a loaded CPU cannot age the batch; counting its reads
    # tells when the anchorer has looked at the time (and sealed, had the batch been due).
    now, reads = [1_800_000_000.0], [0]

    def clock() -> float:
        reads[0] += 1
        return now[0]

    a = anchorer(store, mp, batch_seconds=0.4, batch_max_leaves=1000, clock=clock)
    async with running(a):
        await add_all(a, msgs[:3])
        a.add_nowait(*msgs[3])  # QoS 0: queued for the same group commit
        await a.add(*msgs[4])
        now[0] += 0.39
        seen = reads[0]
        # A round reads the clock at its top, for the time check, and after a seal: six
        # reads span a whole round that saw the new time, so a due batch would be sealed.
        await eventually(lambda: reads[0] >= seen + 6, what="the anchorer read its clock")
        assert await store.batches() == []  # the oldest leaf is 0.39 s old: not yet
        assert a.batches_anchored == 0
        now[0] += 0.01
        await eventually(lambda: a.batches_anchored == 1, within=30, what="a batch by age")
    assert len(anchored_events(chain)) == 1
    assert await check_proofs(chain, a, msgs) == {1}


@BOTH
async def test_gas_per_batch_of_1000(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 2000)
    a = anchorer(store, mp, batch_max_leaves=1000)
    await add_all(a, msgs)
    records = await a.anchor_now()
    assert [r.leaf_count for r in records] == [1000, 1000]
    per_batch = a.gas_used / 2
    print(
        f"\n[{chain.kind}] anchor gas: {per_batch:.0f} per batch of 1000,"
        f" {per_batch / 1000:.1f} per message"
    )
    assert 30_000 < per_batch < 150_000  # one SSTORE-heavy call, independent of the batch size
    assert per_batch / 1000 < 150


@BOTH
@pytest.mark.parametrize("crash", ["before_seal", "sealed", "sent_not_broadcast", "mined"])
async def test_crash_recovery_exactly_once(
    chain: Any, mp: MakeMp, tmp_path: Path, crash: str
) -> None:
    operator = await enrol_operator(chain, mp)
    path = tmp_path / "leaves.sqlite3"
    dev = signer(chain)
    msgs = messages(dev, 50)
    first = await AsyncLeafStore.open(path)
    a = anchorer(first, mp, batch_max_leaves=40)
    await add_all(a, msgs)
    mined_tx: bytes | None = None
    if crash != "before_seal":
        batch = await first.seal_batch(40, await chain_latest(mp, operator))
        assert batch is not None
        assert batch.batch_id == 1
        if crash == "sent_not_broadcast":
            await first.mark_sent(1, b"\xab" * 32)  # hash recorded, then the process died
        if crash == "mined":
            call = a.marketplace.anchors.contract.functions.anchor(1, batch.root, 40)

            async def record(tx_hash: bytes) -> None:
                await first.mark_sent(1, tx_hash)

            tx_hash = await a.transactor.submit(call, before_send=record)
            await a.transactor.wait(tx_hash)
            mined_tx = bytes(tx_hash)
    # The process "dies": nothing is stopped or closed. A new one opens the same file.
    second = await AsyncLeafStore.open(path)
    try:
        fresh = Marketplace(mp("operator").w3, chain.deployment, chain.accounts["operator"])
        records: list[AnchorRecord] = []
        b = anchorer(second, fresh, batch_max_leaves=40, on_anchored=records.append)
        async with running(b):
            await eventually(lambda: b.batches_anchored == 1)
            await b.anchor_now()
        events = anchored_events(chain)
        assert [(e["args"]["batchId"], e["args"]["leafCount"]) for e in events] == [
            (1, 40),
            (2, 10),
        ]  # no batch anchored twice, none with other leaves
        assert [r.batch_id for r in records] == [1, 2]
        if mined_tx is not None:
            assert records[0].tx_hash == mined_tx  # found from the Anchored log
        assert await check_proofs(chain, b, msgs, on_chain_every=7) == {1, 2}  # no leaf lost
        assert [x.state for x in await second.batches()] == ["confirmed", "confirmed"]
    finally:
        await second.close()
        await first.close()


@BOTH
async def test_batch_id_taken_on_chain(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    """Someone anchored another root under our sealed batch id (a second broker with the
    same key): that batch fails and its leaves are anchored in a new one, none lost."""
    operator = await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 20)
    a = anchorer(store, mp, batch_max_leaves=100)
    await add_all(a, msgs)
    batch = await store.seal_batch(100, await chain_latest(mp, operator))
    assert batch is not None
    await mp("operator").anchors.anchor(batch.batch_id, b"\x99" * 32, 3)
    records = await a.anchor_now()
    assert [(r.batch_id, r.leaf_count) for r in records] == [(2, 20)]
    assert [x.state for x in await store.batches()] == ["failed", "confirmed"]
    assert await check_proofs(chain, a, msgs) == {2}


@BOTH
async def test_a_batch_just_sealed_skips_the_look_ups_and_survives_a_race(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    """The batch an anchorer has just sealed is sent without ``anchorOf`` and
    ``latestBatchId`` first; when another root took its id meanwhile (a second broker with
    the same key), the reverted estimate sends it down the full path: it fails, and its leaves
    are anchored in the next batch, none lost, nothing raised."""
    operator = await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 20)
    a = anchorer(store, mp, batch_max_leaves=100)
    await add_all(a, msgs)
    anchors = a.marketplace.anchors
    latest_of, anchor_of = anchors.latest_batch_id, anchors.anchor_of
    looked_up: list[int] = []
    other = mp("operator").anchors  # a root under the same key, as a second broker sends it

    async def racing_latest(broker: str) -> int:  # the real view; the race right after it
        latest = await latest_of(broker)
        if not looked_up:
            await other.anchor(latest + 1, b"\x99" * 32, 3)
        looked_up.append(latest)
        return latest

    async def counted_anchor_of(broker: str, batch_id: int) -> Any:
        looked_up.append(-batch_id)
        return await anchor_of(broker, batch_id)

    anchors.latest_batch_id = racing_latest  # type: ignore[method-assign]
    anchors.anchor_of = counted_anchor_of  # type: ignore[method-assign]
    records = await a.anchor_now()
    assert [(r.batch_id, r.leaf_count) for r in records] == [(2, 20)]
    assert [x.state for x in await store.batches()] == ["failed", "confirmed"]
    # seal 1 (chain at 0, then raced to 1); its send reverts, anchorOf(1) shows the other
    # root; seal 2 (chain at 1); sent at once; its receipt's Anchored event, no anchorOf(2).
    assert looked_up == [0, -1, 1]
    assert await check_proofs(chain, a, msgs) == {2}
    assert await chain_latest(mp, operator) == 2


@BOTH
async def test_the_anchored_event_of_a_receipt_names_the_root_of_its_batch_only(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    """After the send, the anchorer reads root and leaf count from the receipt's ``Anchored``
    event instead of asking ``anchorOf``: only the event of this operator's batch counts."""
    operator = await enrol_operator(chain, mp)
    a = anchorer(store, mp, batch_max_leaves=5)
    await add_all(a, messages(signer(chain), 5))
    (record,) = await a.anchor_now()
    assert record.tx_hash is not None
    receipt = await a.marketplace.w3.eth.get_transaction_receipt(record.tx_hash)
    anchors = a.marketplace.anchors
    assert anchors.anchored_in(receipt, operator, record.batch_id) == (record.root, 5)
    assert anchors.anchored_in(receipt, operator, record.batch_id + 1) is None
    assert anchors.anchored_in(receipt, chain.addr("stranger"), record.batch_id) is None
    assert anchors.anchored_in({"logs": []}, operator, record.batch_id) is None
    info = await anchors.anchor_of(operator, record.batch_id)
    assert info is not None
    assert (info.root, info.leaf_count, info.block_number) == (record.root, 5, record.block)


async def test_a_background_anchor_pauses_between_its_chain_calls(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    """The background loop spreads a root's chain calls (deliveries run in the pauses);
    ``anchor_now`` (shutdown, demos) does not pause."""
    await enrol_operator(chain, mp)
    msgs = messages(signer(chain), 4)
    loop = asyncio.get_running_loop()
    anchored: list[float] = []
    a = anchorer(
        store,
        mp,
        batch_max_leaves=3,
        pause_seconds=0.3,
        on_anchored=lambda _record: anchored.append(loop.time()),
    )
    first_call: list[float] = []
    seal_view = a.marketplace.anchors.latest_batch_id

    async def observed(operator: str) -> int:  # the real view, its first call timed
        first_call.append(loop.time())
        return await seal_view(operator)

    a.marketplace.anchors.latest_batch_id = observed  # type: ignore[method-assign]
    async with running(a):
        await add_all(a, msgs[:3])
        await eventually(lambda: a.batches_anchored == 1, within=30)
    # Seal: 2 pauses (after the chain's latest id, after the seal); anchor of the batch just
    # sealed: 3 (after the write-ahead mark, the send, the receipt).
    assert anchored[0] - first_call[0] >= 5 * 0.3 - 0.01
    await a.add(*msgs[3])
    slow = anchorer(store, a.marketplace, batch_max_leaves=3, pause_seconds=1.0)
    records = await asyncio.wait_for(slow.anchor_now(), 4.5)  # 5 pauses would be 5 s
    assert [r.leaf_count for r in records] == [1]


@BOTH
async def test_not_an_operator_retries(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    msgs = messages(signer(chain), 3)
    a = anchorer(store, mp, batch_max_leaves=3)
    async with running(a):
        await add_all(a, msgs)
        await eventually(lambda: a.failures >= 2)  # DataAnchorsNotOperator: backing off
        assert a.batches_anchored == 0
        await enrol_operator(chain, mp)
        await eventually(lambda: a.batches_anchored == 1)
    assert len(anchored_events(chain)) == 1


@BOTH
async def test_proof_lookup_by_device(chain: Any, mp: MakeMp, store: AsyncLeafStore) -> None:
    await enrol_operator(chain, mp)
    d1, d2 = signer(chain, "device"), signer(chain, "device2")
    m1, m2 = messages(d1, 3), messages(d2, 3)
    a = anchorer(store, mp)
    await add_all(a, m1 + m2)
    await a.add(*m1[0])  # a retransmission: stored once
    await a.anchor_now()
    p1 = await a.proof(TOPIC, 2, d1.address)
    p2 = await a.proof(TOPIC, 2, d2.device)
    assert p1 is not None
    assert p2 is not None
    assert (p1.leaf, p2.leaf) == (m1[1][2], m2[1][2])
    assert p1.leaf_count == 6
    assert await a.proof(TOPIC, 2, "0xnot-hex") is None
    assert await a.proof(TOPIC, 99) is None
    assert await a.proof("other/topic", 2) is None
    assert await a.proof_by_leaf(b"\x00" * 32) is None
    # What the broker answers on the control topics.
    answer = await a.answer(ProofRequest("q1", topic=TOPIC, sequence=2, device=d2.address))
    assert answer == p2.notice("q1")
    assert decode_any_notice(encode_notice(answer)) == answer
    assert await a.answer(ProofRequest("q2", leaf=m1[1][2])) == p1.notice("q2")
    missing = await a.answer(ProofRequest("q3", topic=TOPIC, sequence=99))
    assert isinstance(missing, Refusal)
    assert (missing.code, missing.request_id) == ("proof_unavailable", "q3")


@ANVIL
async def test_chain_down_then_back(
    chain: Any, mp: MakeMp, store: AsyncLeafStore, tcp_proxy: Any
) -> None:
    await enrol_operator(chain, mp)
    assert chain.anvil is not None
    proxy = tcp_proxy(chain.anvil.port)
    await proxy.start()
    w3 = connect(f"http://127.0.0.1:{proxy.port}", request_timeout=2.0)
    w3.provider.exception_retry_configuration = None  # fail fast: the anchorer retries
    try:
        operator = Marketplace(w3, chain.deployment, chain.accounts["operator"])
        a = anchorer(store, operator, batch_max_leaves=10)
        msgs = messages(signer(chain), 25)
        await proxy.stop()  # the node goes away
        async with running(a):
            await add_all(a, msgs)  # leaves keep accumulating, durably
            await eventually(lambda: a.failures >= 2)
            assert a.batches_anchored == 0
            assert await store.leaf_count() == 25
            await proxy.start()  # same port: the node is back
            await eventually(lambda: a.batches_anchored == 2)
            await a.anchor_now()
        assert [e["args"]["leafCount"] for e in anchored_events(chain)] == [10, 10, 5]
        assert await check_proofs(chain, a, msgs) == {1, 2, 3}
    finally:
        with contextlib.suppress(Exception):
            await proxy.stop()
        await disconnect(w3)


async def test_qos0_leaves_linger_to_share_a_commit(store: AsyncLeafStore) -> None:
    """QoS 0 leaves (nobody waits on them) linger to share one commit; without a linger each
    commits on its own, nobody draining. Counted per leaf, not per tick of the clock: each
    arrival first waits until the one before it is durable (or, lingering, is not)."""
    durable: list[int] = []
    store.on_durable = durable.append
    store.linger = 0.0
    before = store.commits
    for i in range(1, 11):
        store.add_nowait(_row(i))
        await eventually(lambda n=i: sum(durable) == n, what=f"leaf {i} durable without a drain")
    assert store.commits - before == 10  # one commit per arrival: none lingered
    store.linger = 60.0  # longer than the test may take
    before = store.commits
    for i in range(100, 110):
        store.add_nowait(_row(i))
        await asyncio.sleep(0.01)  # leaves arriving one by one, as QoS 0 traffic does
    assert (store.commits - before, sum(durable)) == (0, 10)  # all ten linger
    await store.drain()
    assert store.commits - before == 1  # drain commits the lingering group at once
    assert sum(durable) == 20
    assert await store.leaf_count() == 20


async def test_an_awaited_add_never_waits_for_the_linger(store: AsyncLeafStore) -> None:
    store.linger = 60.0  # longer than the test may take
    store.add_nowait(_row(1))
    async with asyncio.timeout(10):
        assert await store.add(_row(2)) is True  # a PUBACK waits on this: committed now
    assert await store.leaf_count() == 2  # the lingering QoS 0 leaf went with it
    full_group = asyncio.Event()
    store.on_durable = lambda new: full_group.set() if new == 256 else None
    for i in range(3, 3 + 256):  # a full group commits without waiting either
        store.add_nowait(_row(i))
    async with asyncio.timeout(10):
        await full_group.wait()
    assert await store.leaf_count() == 258
