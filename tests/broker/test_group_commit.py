"""The group commit under steady traffic (:class:`~blendsm.broker._durable.GroupCommit`), and
the stores' worker threads.

Its transaction is an ``asyncio.sleep`` of a fixed length here, standing in for a commit and
its fsync, so the schedule is the same on any machine; the stores' own tests run it over
real SQLite files (tests/broker/test_anchors.py, test_store.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blendsm.broker._durable import GroupCommit
from blendsm.broker._leaf_store import AsyncLeafStore
from blendsm.broker._store import AsyncVoucherStore

LANE = "0x" + "ab" * 20  # a broker's lane (its operator address)
COMMIT_SECONDS = 0.005
"""Each transaction's length: longer than the gap between two arrivals (1 ms)."""


def _committing(groups: list[int]) -> GroupCommit[int, bool]:
    async def commit(items: list[int]) -> list[bool]:
        await asyncio.sleep(COMMIT_SECONDS)
        groups.append(len(items))
        return [True] * len(items)

    return GroupCommit(commit, task_name="test-group-commit", linger=0.02, group_size=256)


async def test_a_drain_returns_once_what_was_queued_before_it_is_committed() -> None:
    """A drain (the leaf store's handed-on marks take one every 50 ms) waits for what was
    queued before it, and the items arriving meanwhile keep lingering. It used to wait
    until it saw the queue empty: with arrivals closer than a commit's length that was
    never, so the first drain returned only when the traffic stopped, and until then every
    group took only what arrived during the transaction before it (1-2 leaves per fsync at
    1,000 messages/s on a broker, measured)."""
    groups: list[int] = []
    commits = _committing(groups)
    queued = 0
    done = False

    async def produce() -> None:  # an item a millisecond for 300 ms: steady traffic
        nonlocal queued, done
        for _ in range(300):
            commits.add_nowait(queued)
            queued += 1
            await asyncio.sleep(0.001)
        done = True

    producer = asyncio.create_task(produce())
    drains = 0
    while not done:
        await asyncio.sleep(0.03)
        target = queued
        await commits.drain()
        drains += 1
        assert sum(groups) >= target  # what was queued before the drain is committed
    await producer
    await commits.drain()
    assert sum(groups) == queued
    # Each drain returned while the traffic went on, and the rest lingered: about a commit
    # per drain and one per 20 ms, not one per 5 ms transaction.
    assert drains >= 5, (drains, groups)
    assert len(groups) <= 2 * drains + 20, groups


async def test_an_awaited_item_queued_during_a_drain_is_committed_without_lingering() -> None:
    groups: list[int] = []
    commits = _committing(groups)
    commits.add_nowait(1)
    drain = asyncio.create_task(commits.drain())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await commits.add(2) is True
    assert loop.time() - start < 0.02 * 0.9  # never held for the linger
    await drain
    assert sum(groups) == 2


async def test_drain_all_takes_what_arrives_while_it_drains() -> None:
    groups: list[int] = []
    commits = _committing(groups)
    for i in range(3):
        commits.add_nowait(i)

    async def more() -> None:
        await asyncio.sleep(COMMIT_SECONDS / 2)
        commits.add_nowait(99)  # arrives while the first group commits

    arriving = asyncio.create_task(more())
    await commits.drain_all()
    await arriving
    assert sum(groups) == 4
    assert not commits.pending


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
async def test_the_store_threads_do_not_preempt_the_loop(tmp_path: Path) -> None:
    """Both durable stores run their thread under SCHED_BATCH (woken for a commit, it waits
    for the loop to yield the core instead of preempting it), and the loop thread keeps its
    own policy."""
    leaves = await AsyncLeafStore.open(tmp_path / "leaves.sqlite3")
    vouchers = await AsyncVoucherStore.open(tmp_path / "vouchers.sqlite3", lane=LANE)
    loop = asyncio.get_running_loop()
    try:
        for store in (leaves, vouchers):
            policy = await loop.run_in_executor(store._executor, os.sched_getscheduler, 0)
            assert policy == os.SCHED_BATCH, type(store).__name__
    finally:
        await leaves.close()
        await vouchers.close()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
