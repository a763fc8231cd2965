"""What anchoring may cost the operator (docs/integrity.md): the Anchorer against the real
DataAnchors contract on the embedded chain, counting the anchor transactions it sends.

Leaves of topics nobody was sent a message of make no root on their own (they ride in roots
that sold leaves trigger); background roots are paced ``3600 / max_roots_per_hour`` apart and
take every pending sold leaf, so any rate is anchored within the budget; roots never pass
``max_roots_per_hour``, across a restart too; a
seller cannot make the broker keep more than ``max_pending_leaves_per_seller`` unanchored
leaves; and no leaf is ever lost to these bounds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import enrol, eventually, running

from blendsm.broker._anchor_budget import AnchorBudget
from blendsm.broker._anchors import AnchorConfig, Anchorer
from blendsm.broker._leaf_store import AsyncLeafStore
from blendsm.contracts import Marketplace, Role, test_account
from blendsm.device_sdk import Envelope, EnvelopeSigner, MessageDomain, message_leaf
from blendsm.errors import ConfigError, LeafBudgetError

MakeMp = Callable[[str], Marketplace]
NEVER = 10**6
SOLD, UNSOLD = "sold/temp", "unsold/flood"
Message = tuple[str, Envelope, bytes]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncLeafStore]:
    s = await AsyncLeafStore.open(tmp_path / "leaves.sqlite3")
    yield s
    await s.close()


class Device:
    """Signs numbered messages with a TEST-ONLY key, one sequence per (device, topic)."""

    def __init__(self, chain: Any) -> None:
        domain = MessageDomain(int(chain.w3.eth.chain_id), chain.deployment.address("Registry"))
        self.signer = EnvelopeSigner(bytes(test_account("device").key), domain)
        self.sequences: dict[str, int] = {}

    def sign(self, topic: str, count: int) -> list[Message]:
        out = []
        for _ in range(count):
            seq = self.sequences[topic] = self.sequences.get(topic, 0) + 1
            env = self.signer.sign(topic, b"%d" % seq, seq, 1_700_000_000_000 + seq)
            out.append((topic, env, message_leaf(self.signer.domain, topic, env)))
        return out


def make_anchorer(store: AsyncLeafStore, mp: MakeMp, **kw: Any) -> Anchorer:
    options = {k: kw.pop(k) for k in ("seller_of", "clock") if k in kw}
    kw.setdefault("batch_seconds", NEVER)
    kw.setdefault("root_spacing_seconds", 0)  # paced only where a test says so
    kw.setdefault("max_leaves_per_root", kw.get("batch_max_leaves", 1000))
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return Anchorer(store, mp("operator"), AnchorConfig(**kw), **options)


def anchor_txs(chain: Any) -> int:
    """Anchor transactions mined on the chain (one ``Anchored`` event each)."""
    return len(chain.DataAnchors.events.Anchored().get_logs(from_block=0))


async def add(a: Anchorer, msgs: list[Message]) -> None:
    for m in msgs:  # one at a time: the loop sees every trigger as it would live
        await a.add(*m)


def test_budget_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_roots_per_hour"):
        AnchorConfig(max_roots_per_hour=0)
    with pytest.raises(ConfigError, match="unsold_batch_seconds"):
        AnchorConfig(unsold_batch_seconds=-1)
    with pytest.raises(ConfigError, match="max_pending_leaves_per_seller"):
        AnchorConfig(max_pending_leaves_per_seller=0)


def budget() -> AnchorBudget:
    """batch_seconds 60, batch_max_leaves 5, 360 roots an hour (a root per 10 s at most)."""
    return AnchorBudget(
        batch_seconds=60,
        batch_max_leaves=5,
        max_roots_per_hour=360,
        unsold_batch_seconds=3600,
        max_pending_leaves_per_seller=10,
        seller_of=lambda topic: None,
        logger=logging.getLogger("test"),
    )


def test_the_pacing_waits_from_the_last_root_even_across_a_restart_and_is_no_deferral() -> None:
    b = budget()
    assert b.spacing == 10.0  # 3600 / max_roots_per_hour
    assert b.root_wait(100.0) == 0.0  # the first root waits for nothing
    b.sealed(100.0, more_sold=True)
    assert b.root_wait(103.0) == 7.0
    assert b.waiting  # triggers do not wake the anchorer meanwhile
    assert b.deferred == 0  # the normal state at a high rate: not a deferral
    assert b.root_wait(50.0) == 10.0  # the clock stepped back: one spacing at most
    assert b.root_wait(110.0) == 0.0
    assert not b.waiting
    restarted = budget()
    restarted.load_roots([95.0, 100.0])
    assert restarted.root_wait(101.0) == 9.0


def test_a_leaf_delivered_while_a_root_was_sealed_stays_sold() -> None:
    """The seal chose its leaves at 150; a leaf stored and delivered at 150.5 is left for the
    next root, and stays sold: due a batch_seconds after its delivery, not after the unsold
    timer (an hour, while its buyer's proof requests are refused)."""
    b = budget()
    b.reserve(SOLD, 100.0)
    b.delivered(SOLD, 100.0)
    b.reserve(SOLD, 150.5)  # during the seal: stored, then delivered
    b.delivered(SOLD, 150.5)
    b.sealed(150.0, more_sold=False)
    b.reload({SOLD: 1})  # what the store holds after the seal
    b.remark(150.0)
    assert b.due_in(200.0, 1, 150.5) == pytest.approx(10.5)
    assert b.due_in(211.0, 1, 150.5) == 0.0
    b.sealed(211.0, more_sold=False)
    b.reload({})
    b.remark(211.0)  # nothing delivered since: nothing marked
    assert b.due_in(300.0, 0, None) == 60


async def test_paced_roots_take_every_pending_sold_leaf_so_any_rate_is_anchored(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    """Eight roots' worth by count arrive between two roots: the next root, 10 s after the
    last, takes them all. (Roots of ``batch_max_leaves`` each spent the hour's budget in its
    first minutes at such a rate, and the leaves piled up for the rest of it.)"""
    await enrol(mp, chain, "operator", Role.OPERATOR)
    now = [1_000_000.0]
    device = Device(chain)
    a = make_anchorer(
        store,
        mp,
        batch_max_leaves=5,
        max_leaves_per_root=100,
        root_spacing_seconds=None,  # the broker's: 3600 / 360 = 10 s
        clock=lambda: now[0],
    )
    async with running(a):
        for root in (1, 2, 3):
            await add(a, device.sign(SOLD, 40))
            a.delivered(SOLD)
            if root > 1:
                await asyncio.sleep(0.3)
                assert a.batches_anchored == root - 1  # due, but 10 s after the last root
                now[0] += 10
                a._wake.set()
            await eventually(lambda: a.batches_anchored == root)  # noqa: B023
            assert (await store.pending())[0] == 0
    assert [b.leaf_count for b in await store.batches()] == [40, 40, 40]
    assert anchor_txs(chain) == 3
    assert a.anchors_deferred == 0


async def test_unsold_leaves_make_no_root_and_ride_in_the_next_sold_one(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    await enrol(mp, chain, "operator", Role.OPERATOR)
    device = Device(chain)
    a = make_anchorer(store, mp, batch_max_leaves=10, batch_seconds=0.2)
    async with running(a):
        await add(a, device.sign(UNSOLD, 95))  # 9 roots' worth by count, 1 by time
        sold = device.sign(SOLD, 3)
        await add(a, sold)
        a.delivered(SOLD)  # a subscriber got them: sold, a root is due in batch_seconds
        await eventually(lambda: a.batches_anchored == 1)
        await asyncio.sleep(0.5)  # more than batch_seconds: nothing else is due
        assert a.batches_anchored == 1
    assert anchor_txs(chain) == 1
    batch = (await store.batches())[0]
    assert batch.leaf_count == 10  # the 3 sold leaves, and 7 unsold ones for free
    for topic, env, _ in sold:
        assert await a.proof(topic, env.sequence) is not None
    assert (await store.pending())[0] == 88  # kept on disk for a later root
    assert a.anchors_deferred == 0


async def test_unsold_leaves_alone_make_one_root_per_unsold_batch_seconds(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    await enrol(mp, chain, "operator", Role.OPERATOR)
    now = [1_000_000.0]
    a = make_anchorer(
        store, mp, batch_max_leaves=10, unsold_batch_seconds=100, clock=lambda: now[0]
    )
    async with running(a):
        await add(a, Device(chain).sign(UNSOLD, 25))
        await asyncio.sleep(0.3)
        assert a.batches_anchored == 0  # not 2 roots by count: nobody bought them
        for hour in (1, 2):
            now[0] += 100  # the oldest is one unsold period older: one root, not three
            a._wake.set()
            await eventually(lambda: a.batches_anchored == hour)  # noqa: B023
            await asyncio.sleep(0.3)
            assert a.batches_anchored == hour
    assert anchor_txs(chain) == 2
    assert (await store.pending())[0] == 5


async def test_roots_never_pass_max_roots_per_hour_even_across_a_restart(
    chain: Any, mp: MakeMp, tmp_path: Path
) -> None:
    await enrol(mp, chain, "operator", Role.OPERATOR)
    now = [1_000_000.0]
    path = tmp_path / "leaves.sqlite3"
    msgs = Device(chain).sign(SOLD, 60)
    first = await AsyncLeafStore.open(path)
    a = make_anchorer(first, mp, batch_max_leaves=5, max_roots_per_hour=3, clock=lambda: now[0])
    async with running(a):
        # Stored first, then sold: a leaf stored after the last delivery is not sold, so
        # whether a root sealed while the rest arrived took them all depended on timing.
        await add(a, msgs[:40])  # 8 roots' worth
        a.delivered(SOLD)  # every leaf sold
        await eventually(lambda: a.anchors_deferred == 1)
        assert a.batches_anchored == 3
    await first.close()
    assert anchor_txs(chain) == 3

    second = await AsyncLeafStore.open(path)  # a restart within the hour: still 3
    b = make_anchorer(second, mp, batch_max_leaves=5, max_roots_per_hour=3, clock=lambda: now[0])
    try:
        async with running(b):
            await add(b, msgs[40:])
            b.delivered(SOLD)
            await eventually(lambda: b.anchors_deferred == 1)
            assert await b.anchor_now() == []  # on demand too: the ceiling holds
            assert anchor_txs(chain) == 3
            now[0] += 3600  # an hour later: three more roots, sold leaves oldest first
            b.delivered(SOLD)
            b._wake.set()
            await eventually(lambda: b.batches_anchored == 3)
        assert anchor_txs(chain) == 6
        assert (await second.pending())[0] == 60 - 6 * 5  # waiting, none lost
    finally:
        await second.close()


async def test_a_seller_cannot_make_the_broker_keep_more_than_its_leaf_budget(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    await enrol(mp, chain, "operator", Role.OPERATOR)
    sellers = {SOLD: "0xseller", UNSOLD: "0xseller", "other/topic": "0xother"}
    a = make_anchorer(store, mp, max_pending_leaves_per_seller=4, seller_of=sellers.get)
    device = Device(chain)
    await add(a, device.sign(SOLD, 2) + device.sign(UNSOLD, 2))
    refused = device.sign(UNSOLD, 1)[0]
    with pytest.raises(LeafBudgetError):
        await a.add(*refused)
    with pytest.raises(LeafBudgetError):
        a.add_nowait(*device.sign(SOLD, 1)[0])
    await add(a, device.sign("other/topic", 4))  # another seller's budget
    await store.drain()
    assert await store.leaf_count() == 8
    assert a.leaves_refused == 2
    await a.anchor_now()  # anchored leaves no longer count
    await a.add(*refused)  # the device's re-send is taken now
    assert await store.leaf_count() == 9


async def test_sold_leaves_still_in_a_group_commit_go_into_the_root(
    chain: Any, mp: MakeMp, store: AsyncLeafStore
) -> None:
    """A QoS 0 leaf of a sold topic still lingering in the store's group commit when a root
    is sealed is in that root: the seal waits for the leaves queued before it. (It used to be
    left out, and the seal forgot that the topic was sold: with no further delivery the leaf
    waited ``unsold_batch_seconds`` for a root.)"""
    await enrol(mp, chain, "operator", Role.OPERATOR)
    msgs = Device(chain).sign(SOLD, 3)
    store.linger = 30.0  # QoS 0 leaves wait in the group commit until something drains it
    a = make_anchorer(store, mp, batch_seconds=0.2, unsold_batch_seconds=NEVER)
    async with running(a):
        await a.add(*msgs[0])  # durable (QoS 1)
        for m in msgs[1:]:
            a.add_nowait(*m)  # queued (QoS 0)
        a.delivered(SOLD)  # all three were delivered: sold
        await eventually(lambda: a.batches_anchored >= 1, within=20, what="a root")
        await asyncio.sleep(0.5)  # two more batch_seconds: a second root would be sealed
    assert a.leaves == 3
    assert [b.leaf_count for b in await store.batches()] == [3]
    for topic, envelope, leaf in msgs:
        proof = await a.proof_by_leaf(leaf)
        assert proof is not None, f"{topic} #{envelope.sequence} is not in a root"
