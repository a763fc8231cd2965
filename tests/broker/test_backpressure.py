"""The outgoing bound of one connection (``Flow``) against a transport whose buffer the test
drains by hand: admission, the message count of the buffer, pause and resume with hysteresis,
the write-time bound and the slow-consumer deadline. The real sockets are in
``tests/integration/test_backpressure.py``."""

from __future__ import annotations

import asyncio
from typing import Any

from blendsm.broker._backpressure import Backpressure, Flow
from blendsm.broker._config_sessions import SessionsConfig
from blendsm.broker._stats import ServiceStats


class FakeTransport:
    def __init__(self) -> None:
        self.buffer = 0
        self.closing = False
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.buffer += len(data)

    def abort(self) -> None:
        self.aborted = self.closing = True


class FakeStream:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeWriter:
    def __init__(self) -> None:
        self._writer = FakeStream()
        self.is_closed = False


class FakeSession:
    client_id = "slow"
    retained_messages: Any = None


def _flow(**bounds: Any) -> tuple[Backpressure, Flow, FakeTransport]:
    options: dict[str, Any] = {
        "max_outgoing_bytes": 1000,
        "max_outgoing_messages": 10,
        "slow_consumer_seconds": 0.05,
    }
    options.update(bounds)
    bound = Backpressure(SessionsConfig(**options), ServiceStats())
    writer = FakeWriter()
    flow = bound.flow(writer)
    assert flow is not None
    assert bound.flow(writer) is flow  # one per connection, kept on its writer
    return bound, flow, writer._writer.transport


def _write(flow: Flow, transport: FakeTransport, nbytes: int, messages: int = 1) -> bool:
    if not flow.may_write(nbytes, messages):
        return False
    transport.write(b"x" * nbytes)
    flow.wrote(nbytes, messages)
    return True


async def test_bytes_bound_pauses_and_resumes_below_half() -> None:
    bound, flow, transport = _flow()
    session = FakeSession()
    assert flow.admits(session, 600)
    _write(flow, transport, 600)
    assert flow.admits(session, 400)  # exactly at the bound
    assert not flow.admits(session, 401)
    assert flow.paused_since is not None
    assert bound.paused == 1
    assert bound.stats.slow_consumers_paused == 1
    transport.buffer = 501  # drained, but not to half
    assert not flow.admits(session, 1)
    transport.buffer = 500
    assert flow.admits(session, 1)
    assert flow.paused_since is None
    assert bound.paused == 0


async def test_an_empty_connection_takes_one_message_of_any_size() -> None:
    _, flow, _ = _flow()
    assert flow.admits(FakeSession(), 5000)


async def test_messages_in_the_buffer_are_counted_until_sent() -> None:
    _, flow, transport = _flow(max_outgoing_bytes=10**6)
    session = FakeSession()
    for _ in range(10):
        _write(flow, transport, 100)
    assert flow.held() == (1000, 10)
    assert not flow.admits(session, 100)  # 11 messages
    transport.buffer = 250  # the transport sent 7.5 messages: 3 (partly) left
    assert flow.held() == (250, 3)
    assert flow.admits(session, 100)
    transport.buffer = 0
    assert flow.held() == (0, 0)


async def test_tasks_count_until_they_end() -> None:
    _, flow, _ = _flow()
    session = FakeSession()
    flow.task_started(600)
    assert not flow.admits(session, 500)
    flow.task_ended(600)
    assert flow.admits(session, 500)


async def test_pending_bytes_of_the_batch_count() -> None:
    _, flow, _ = _flow()
    assert not flow.admits(FakeSession(), 100, 1, 950, 3)


async def test_a_write_to_a_connection_at_its_bound_is_refused() -> None:
    bound, flow, transport = _flow()
    assert _write(flow, transport, 999)
    assert _write(flow, transport, 500)  # under the bound before it: one write over at most
    assert not _write(flow, transport, 1)
    flow.refused(1)
    assert bound.stats.deliveries_dropped_slow_consumer == 1
    assert transport.buffer == 1499


async def test_still_paused_at_the_deadline_is_disconnected() -> None:
    bound, flow, transport = _flow()
    session = FakeSession()
    _write(flow, transport, 1000)
    assert not flow.admits(session, 10)
    await asyncio.sleep(0.1)
    assert transport.aborted
    assert flow.writer.is_closed
    assert bound.stats.slow_consumers_disconnected == 1
    assert bound.paused == 0


async def test_drained_by_the_deadline_is_resumed_not_disconnected() -> None:
    bound, flow, transport = _flow()
    session = FakeSession()
    _write(flow, transport, 1000)
    assert not flow.admits(session, 10)
    transport.buffer = 100
    await asyncio.sleep(0.1)
    assert not transport.aborted
    assert flow.paused_since is None
    assert bound.stats.slow_consumers_disconnected == 0
    assert bound.paused == 0


async def test_resume_replays_what_was_queued_while_paused() -> None:
    bound, flow, transport = _flow(slow_consumer_seconds=60)
    resumed: list[Any] = []
    bound.on_resume = resumed.append
    session = FakeSession()
    queue: asyncio.Queue[int] = asyncio.Queue()
    queue.put_nowait(1)
    session.retained_messages = queue
    _write(flow, transport, 1000)
    assert not flow.admits(session, 10)
    transport.buffer = 0
    assert flow.admits(session, 10)
    assert resumed == [session]
    assert flow.timer is None


def test_a_writer_without_a_transport_is_not_bounded() -> None:
    bound = Backpressure(SessionsConfig(), ServiceStats())
    assert bound.flow(object()) is None
