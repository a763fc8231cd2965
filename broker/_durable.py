"""The asyncio side of the broker's durable stores: one worker thread, and group commit.

Why one base: the voucher store (money) and the leaf store (evidence) have the same needs.
SQLite calls block, and a commit with ``synchronous=FULL`` waits for an fsync, so neither may
run on the event loop; and one fsync per item would cap the broker at the disk's fsync rate,
so concurrent writes share one transaction. :class:`AsyncDurableStore` runs every call of
its blocking :class:`~blendsm.broker._sqlite.DurableStore` on one dedicated thread that owns
the connection (which also serialises the calls); :class:`GroupCommit` queues items while a
transaction is in flight and commits them all in the next one.

The durability rule both stores rely on: an awaited item's caller resumes only once the
transaction holding it committed, with that item's own result (or the transaction's error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from blendsm.broker._sqlite import DurableStore

__all__ = [
    "AsyncDurableStore",
    "GroupCommit",
    "fetch_pausing",
    "let_the_loop_in",
    "open_on_worker",
    "set_yielding",
    "yield_to_the_loop",
]

_T = TypeVar("_T")
_S = TypeVar("_S", bound=DurableStore)
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def yield_to_the_loop() -> bool:
    """Run the calling thread under Linux's ``SCHED_BATCH`` policy; False where there is none.

    Why: a store thread is woken for every commit, and on a core it shares with the event
    loop the kernel let the woken thread preempt the loop at once, mid-delivery, for the
    whole job (a group commit of leaves or vouchers: about 1 ms of CPU). Under ``SCHED_BATCH``
    a woken thread does not preempt; it runs when the loop waits for I/O, or at the next
    tick, with the same CPU share as before (same nice value: nothing is starved under
    load). On a core of its own nothing changes. Measured at 1,000 paid messages/s: the added
    p99 fell from +1.89 to +1.44 ms (medians of six alternated pairs), the burst ratio held
    (docs/benchmarks.md). Setting it needs no privilege; a refusal is not an error.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError:
        return False
    return True


def set_yielding(thread_id: int, yields: bool) -> bool:
    """Put the thread ``thread_id`` (a native id) under ``SCHED_BATCH`` (``yields``) or back
    under the default policy; False where Linux's policies are missing or it was refused.
    For a store whose next job others wait on (:meth:`AsyncDurableStore.urgent`)."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(thread_id, batch if yields else os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        return False
    return True


LOOP_IN_SECONDS: Final = 0.00005
"""How long :func:`let_the_loop_in` sleeps (the kernel's timer slack makes it 50-100 us)."""


def let_the_loop_in() -> None:
    """Sleep a moment, GIL released, between slices of a long pure-Python job on a store
    thread (a seal's tree and rows). Why: a thread running Python keeps the GIL until the
    interpreter's switch interval (5 ms) forces it out, so on a shared core the event loop
    waited up to 5 ms per wake-up all through a 10,000-leaf seal (message latencies of 11 ms
    at 1,000 messages/s). Releasing the GIL without sleeping does not help there: the thread
    takes it back before the loop's thread has run."""
    time.sleep(LOOP_IN_SECONDS)


def fetch_pausing(cursor: Any, size: int = 512) -> list[Any]:
    """``cursor.fetchall()`` in slices of ``size`` rows, :func:`let_the_loop_in` between."""
    rows: list[Any] = []
    while chunk := cursor.fetchmany(size):
        rows += chunk
        if len(chunk) == size:
            let_the_loop_in()
    return rows


async def open_on_worker(
    factory: Callable[[], _S], thread_name: str
) -> tuple[ThreadPoolExecutor, _S]:
    """Open a blocking store on a fresh single-thread executor, which then owns it (SQLite
    connections are bound to the thread that created them). The thread is stopped if
    opening fails. It runs under :func:`yield_to_the_loop`."""
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=thread_name, initializer=yield_to_the_loop
    )
    try:
        store = await asyncio.get_running_loop().run_in_executor(executor, factory)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return executor, store


class AsyncDurableStore(Generic[_S]):
    """Asyncio facade of a :class:`DurableStore`: every call runs on ``executor`` (one
    thread, the one that opened ``store``), never on the event loop."""

    def __init__(self, executor: ThreadPoolExecutor, store: _S) -> None:
        self._executor = executor
        self._store = store
        self._thread_id: int | None = None  # known after learn_thread()
        self._urgent = False

    async def learn_thread(self) -> None:
        """Learn the worker thread's native id, which :meth:`urgent` needs."""
        self._thread_id = await self._run(threading.get_native_id)

    def urgent(self, urgent: bool) -> None:
        """Whether the next jobs have someone waiting on them (a stream held at its credit
        edge for a voucher's commit): then the thread leaves ``SCHED_BATCH``, which let a
        commit wait for a slice of the busy loop's core at every step (22-113 ms a commit
        through a paid burst, against 0.4 ms of CPU); otherwise it yields to the loop as
        :func:`yield_to_the_loop` says. One system call when it changes; a no-op without
        the worker's ``thread_id``."""
        if urgent is not self._urgent and self._thread_id is not None:
            self._urgent = urgent
            set_yielding(self._thread_id, not urgent)

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def commits(self) -> int:
        """Write transactions committed so far (a group commit is one)."""
        return self._store.commits

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _finish_writes(self) -> None:
        """Wait for queued writes before the store closes (subclasses with a group commit)."""

    async def close(self) -> None:
        """Finish queued writes, close the connection on its own thread, stop the thread."""
        await self._finish_writes()
        try:
            await self._run(self._store.close)
        finally:
            self._executor.shutdown(wait=True)


class GroupCommit(Generic[_Item, _Result]):
    """Items queued while a transaction is in flight commit together in the next one.

    ``commit`` stores a list of items in ONE transaction and returns one result per item.
    An item is either awaited (:meth:`add`: its caller resumes once it is durable, with its
    result or the transaction's error) or not (:meth:`add_nowait`: nobody waits; if its
    transaction fails it is counted in :attr:`lost` and ``on_lost`` is told).

    A group holding only not-awaited items may wait up to :attr:`linger` seconds for more
    (to share an fsync); an awaited item, ``group_size`` queued items or :meth:`drain` end
    the wait, so whoever waits is never delayed by the linger. A drain waits for the items
    queued before it, not for the queue to be seen empty: under steady traffic that never
    happened, and until it did every group took only what arrived during the commit before
    it (1-2 leaves per fsync at 1,000 messages/s, measured).
    """

    def __init__(
        self,
        commit: Callable[[list[_Item]], Awaitable[list[_Result]]],
        *,
        task_name: str,
        linger: float = 0.0,
        group_size: int = 1,
        on_committed: Callable[[list[_Result]], None] | None = None,
        on_lost: Callable[[int, Exception], None] | None = None,
    ) -> None:
        self._commit = commit
        self._task_name = task_name
        self.linger = linger
        """Seconds a group of only not-awaited items may wait for more before its commit."""
        self.group_size = group_size
        """Queued items that commit at once, lingering or not."""
        self._on_committed = on_committed
        self._on_lost = on_lost
        self.lost = 0
        """Not-awaited items whose transaction failed."""
        self._queue: list[tuple[_Item, asyncio.Future[_Result] | None]] = []
        self._waiters = 0
        """Awaited items in ``_queue``."""
        self._wake = asyncio.Event()
        self._queued = 0
        """Items ever queued (the position of the last one)."""
        self._taken = 0
        """Items ever taken into a transaction (committed, failed or cancelled)."""
        self._drain_to = 0
        """The furthest position a drain waits for: the groups up to it do not linger."""
        self._progress: asyncio.Future[None] | None = None
        """Resolved each time a group's transaction ended (what a drain waits on)."""
        self._flusher: asyncio.Task[None] | None = None

    async def add(self, item: _Item) -> _Result:
        """Queue ``item``; return its result once the transaction holding it committed."""
        done: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._enqueue(item, done)
        return await done

    def add_nowait(self, item: _Item) -> None:
        """Queue ``item`` for the next group commit without waiting (call on the loop)."""
        self._enqueue(item, None)

    def _enqueue(self, item: _Item, done: asyncio.Future[_Result] | None) -> None:
        self._queue.append((item, done))
        self._queued += 1
        if done is not None:
            self._waiters += 1
        if done is not None or len(self._queue) >= self.group_size:
            self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name=self._task_name
            )

    async def _flush(self) -> None:
        """Commit whatever is queued, group after group, until the queue stays empty."""
        while self._queue:
            if (
                not self._waiters
                and self._drain_to <= self._taken
                and len(self._queue) < self.group_size
                and self.linger > 0
            ):
                # Nobody waits on these items: gather more per fsync.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._wake.wait()
            group, self._queue = self._queue, []
            self._waiters = 0
            try:
                results = await self._commit([item for item, _ in group])
            except Exception as exc:
                self._ended(len(group))
                lost = 0
                for _, done in group:
                    if done is None:
                        lost += 1
                    elif not done.done():
                        done.set_exception(exc)
                if lost:
                    self.lost += lost
                    if self._on_lost is not None:
                        self._on_lost(len(group), exc)
                continue
            except BaseException:  # cancelled (loop shutting down): so are its callers
                self._ended(len(group))
                for _, done in group + self._queue:
                    if done is not None:
                        done.cancel()
                raise
            self._ended(len(group))
            for (_, done), result in zip(group, results, strict=True):
                if done is not None and not done.done():  # a caller that gave up: still stored
                    done.set_result(result)
            if self._on_committed is not None:
                self._on_committed(results)

    def _ended(self, items: int) -> None:
        """A group of ``items`` left the queue for good: wake the drains waiting on it."""
        self._taken += items
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    async def drain(self) -> None:
        """Commit every item queued so far now (no lingering) and wait for it (or its
        failure); items queued after this call keep their linger."""
        target = self._queued
        if target <= self._taken:
            return
        self._drain_to = max(self._drain_to, target)
        self._wake.set()
        while self._taken < target and self._flusher is not None and not self._flusher.done():
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._progress, self._flusher], return_when=FIRST_COMPLETED)

    @property
    def pending(self) -> bool:
        """Whether items are queued and not yet taken into a transaction."""
        return self._queued > self._taken

    async def drain_all(self) -> None:
        """Drain until nothing is queued, the items queued meanwhile too (a store closing)."""
        while self.pending and self._flusher is not None:
            await self.drain()
            if self._flusher.done():
                break
