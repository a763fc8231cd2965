"""``SmallQueue``: the unbounded asyncio.Queue of a session, at a few dozen bytes while empty.

amqtt 0.12.1 gives every connection four ``asyncio.Queue``s (a session's offline queue and
incoming PUBLISHes, its handler's pending SUBSCRIBEs and UNSUBSCRIBEs). Each holds three
deques and an Event (another deque) from birth, about 3.4 KB, although an idle session's
queues are empty: 13-14 KB of every idle connection. :class:`SmallQueue` keeps the part of
the Queue interface amqtt and BlendSM use, with the same semantics (FIFO, unbounded, getters
served in order, a cancelled getter passes its wake-up on), and allocates its item deque and
waiter list only when they are needed. What a queue holds is bounded elsewhere (offline
queues by :mod:`blendsm.broker._sessions`, a connection's packets by its reader).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Generic, TypeVar

__all__ = ["ArrivalQueue", "SmallQueue"]

T = TypeVar("T")


class SmallQueue(Generic[T]):
    """FIFO, unbounded; ``put``/``put_nowait``/``get``/``get_nowait``/``empty``/``qsize``."""

    __slots__ = ("_getters", "_items", "_watcher")

    maxsize = 0
    """Unbounded, as amqtt's queues (``full()`` is always False)."""

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._getters: list[asyncio.Future[None]] | None = None
        self._watcher: asyncio.Future[None] | None = None

    @property
    def _queue(self) -> deque[T]:
        """The items, oldest first (asyncio.Queue's attribute: the offline replay puts a
        message back at the head)."""
        if self._items is None:
            self._items = deque()
        return self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item: T) -> None:
        self._queue.append(item)
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            if not watcher.done():
                watcher.set_result(None)
        self._wake_next()

    def watch(self, waker: asyncio.Future[None] | None) -> None:
        """Resolve ``waker`` at the next put (None: stop watching). One future can watch
        several queues: a session's message loop waits on all of its queues with one,
        where ``next_item`` would cost two futures and two callbacks per queue. The watcher
        takes nothing off the queue; it only says that something arrived."""
        self._watcher = waker

    async def put(self, item: T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._pop()

    async def get(self) -> T:
        while not self._items:
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if self._getters is not None and getter in self._getters:
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_next()  # woken, then cancelled: the item is for the next one
                raise
        return self._pop()

    def _pop(self) -> T:
        items = self._items
        assert items  # callers checked
        item = items.popleft()
        if not items:
            self._items = None  # an idle queue holds no deque
        return item

    def next_item(self) -> asyncio.Future[T]:
        """A future of the next item, taken off the queue when it resolves: what
        ``asyncio.ensure_future(queue.get())`` gives, without a Task and its coroutine frames
        (a session's message loop waits on three queues at all times). Cancelling it while it
        is pending takes nothing off the queue."""
        taken: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._items:
            taken.set_result(self._pop())
            return taken
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def hand_over(_: asyncio.Future[None]) -> None:
            if waiting.cancelled():
                return
            if taken.done() or not self._items:
                self._wake_next()  # the taker left, or the item is gone: pass the wake-up on
                return
            taken.set_result(self._pop())

        def left(_: asyncio.Future[T]) -> None:
            if taken.cancelled():
                waiting.cancel()
                if self._getters is not None and waiting in self._getters:
                    self._getters.remove(waiting)

        waiting.add_done_callback(hand_over)
        taken.add_done_callback(left)
        if self._getters is None:
            self._getters = []
        self._getters.append(waiting)
        return taken

    def _wake_next(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break
        if not getters:
            self._getters = None


_ARRIVALS = itertools.count()
"""One order for every :class:`ArrivalQueue` of the process."""


class ArrivalQueue(SmallQueue[T]):
    """A :class:`SmallQueue` that knows when its oldest item arrived relative to any other
    ArrivalQueue's: a connection's pending SUBSCRIBEs and UNSUBSCRIBEs are two queues (amqtt's
    handler API), but they must take effect in the order the client sent them (an UNSUBSCRIBE
    then a SUBSCRIBE of the same filter leaves it subscribed)."""

    __slots__ = ("_arrivals",)

    def __init__(self) -> None:
        super().__init__()
        self._arrivals: deque[int] | None = None

    def put_nowait(self, item: T) -> None:
        if self._arrivals is None:
            self._arrivals = deque()
        self._arrivals.append(next(_ARRIVALS))
        super().put_nowait(item)

    def head_arrival(self) -> int | None:
        """When the oldest item arrived (a process-wide order), None if empty."""
        return self._arrivals[0] if self._arrivals else None

    def _pop(self) -> T:
        arrivals = self._arrivals
        assert arrivals  # every item was put with its arrival
        arrivals.popleft()
        if not arrivals:
            self._arrivals = None
        return super()._pop()
