"""SmallQueue keeps asyncio.Queue's semantics for what amqtt and BlendSM use: FIFO, getters
served in order, a cancelled getter loses nothing, ``next_item`` as ``ensure_future(get())``."""

from __future__ import annotations

import asyncio

import pytest

from blendsm.broker._session_state import BlendSession
from blendsm.broker._small_queue import ArrivalQueue, SmallQueue


async def test_fifo_and_nowait() -> None:
    queue: SmallQueue[int] = SmallQueue()
    assert queue.empty()
    assert queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    for n in range(3):
        await queue.put(n)
    queue._queue.appendleft(-1)  # the offline replay puts a message back first
    assert queue.qsize() == 4
    assert [queue.get_nowait() for _ in range(4)] == [-1, 0, 1, 2]
    assert queue.empty()
    assert queue._items is None  # an idle queue holds no deque


async def test_getters_are_served_in_order_and_a_cancelled_one_loses_nothing() -> None:
    queue: SmallQueue[str] = SmallQueue()
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    third = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    second.cancel()
    queue.put_nowait("a")
    queue.put_nowait("b")
    assert await asyncio.wait_for(first, 1) == "a"
    assert await asyncio.wait_for(third, 1) == "b"
    assert second.cancelled()
    assert queue.empty()


async def test_next_item_resolves_with_the_next_put_and_cancelling_it_takes_nothing() -> None:
    queue: SmallQueue[int] = SmallQueue()
    ready = queue.next_item()
    queue.put_nowait(1)  # there already: resolved now
    assert queue.next_item().result() == 1
    assert not ready.done()
    queue.put_nowait(2)
    assert await asyncio.wait_for(ready, 1) == 2
    left = queue.next_item()
    left.cancel()
    await asyncio.sleep(0)
    queue.put_nowait(3)
    await asyncio.sleep(0)
    assert queue.get_nowait() == 3  # the cancelled taker took nothing
    later = queue.next_item()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(4)
    queue.put_nowait(5)
    assert await asyncio.wait_for(later, 1) == 4
    assert await asyncio.wait_for(getter, 1) == 5


async def test_blend_session_state_follows_amqtts_rules() -> None:
    from transitions import MachineError

    session = BlendSession()
    assert session.transitions.state == "new"
    session.transitions.connect()
    assert session.transitions.is_connected()
    assert session.last_connect_time is not None
    with pytest.raises(MachineError):
        session.transitions.connect()  # amqtt's take-over path relies on it
    session.transitions.disconnect()
    session.transitions.disconnect()  # allowed from every state
    assert session.transitions.state == "disconnected"
    assert session.last_disconnect_time is not None
    session.transitions.connect()
    assert session.transitions.state == "connected"
    assert isinstance(session.retained_messages, SmallQueue)
    assert isinstance(session.delivered_message_queue, SmallQueue)


def test_blend_session_keeps_a_small_dict_and_pickles_its_slots() -> None:
    import pickle
    import sys

    session = BlendSession()
    session.client_id = "c"
    empty = sys.getsizeof(session.__dict__)
    session.blendsm = "identity"
    session.blendsm_authenticated = True
    session.blendsm_queued_bytes = 10
    assert sys.getsizeof(session.__dict__) == empty  # BlendSM's attributes are slots
    assert getattr(session, "blendsm_hold", None) is None  # unset slots read as absent
    session.transitions.connect()
    copy = pickle.loads(pickle.dumps(session))
    assert copy.blendsm == "identity"
    assert copy.blendsm_queued_bytes == 10
    assert copy.transitions.state == "connected"
    assert isinstance(copy.retained_messages, SmallQueue)


async def test_arrival_queues_share_one_order() -> None:
    subscriptions: ArrivalQueue[str] = ArrivalQueue()
    unsubscriptions: ArrivalQueue[str] = ArrivalQueue()
    assert subscriptions.head_arrival() is None
    unsubscriptions.put_nowait("unsubscribe a")
    subscriptions.put_nowait("subscribe a")
    unsubscriptions.put_nowait("unsubscribe b")
    order = []
    while subscriptions.qsize() or unsubscriptions.qsize():
        s, u = subscriptions.head_arrival(), unsubscriptions.head_arrival()
        queue = subscriptions if u is None or (s is not None and s < u) else unsubscriptions
        order.append(queue.get_nowait())
    assert order == ["unsubscribe a", "subscribe a", "unsubscribe b"]
    assert subscriptions.head_arrival() is None
    assert unsubscriptions.head_arrival() is None
    # get() hands items over with their arrivals, too
    subscriptions.put_nowait("later")
    assert await subscriptions.get() == "later"
    assert subscriptions.head_arrival() is None
