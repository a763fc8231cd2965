"""Stopping connections and background work within a deadline.

Why: amqtt 0.12.1's shutdown waited, one session after the other, for each connection's
reader task to acknowledge its cancellation, with no bound. On Python 3.11 that wait can last
forever: the reader awaits ``asyncio.wait_for(MQTTFixedHeader.from_stream(...), keepalive)``,
and when a packet (a subscriber's PUBACK for an in-flight QoS 1 delivery, say) completes the
inner read in the same loop iteration as the cancel arrives, ``wait_for`` returns the packet
and *swallows the cancellation* (CPython gh-86296, fixed in 3.12). The reader goes on reading
from a client that stays connected, and ``Broker._cleanup_session`` never returns (20-40 % of
shutdowns with traffic in flight). :func:`stop_reader` cancels again until the reader has
really stopped, and as a last resort aborts the socket (EOF ends any reader);
:func:`wait_bounded` bounds the other waits of a stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, Final

__all__ = ["READER_STOP_SECONDS", "close_connections", "stop_reader", "wait_bounded"]

_log = logging.getLogger("blendsm.broker")

READER_STOP_SECONDS: Final = 2.0
"""How long a connection's reader may take to stop after cancels before its socket is
aborted; a reader that honours the first cancel stops within one loop iteration."""
_RECANCEL_SECONDS: Final = 0.05
"""Between cancels of a reader: a swallowed cancel is repeated at once, the race that
swallowed it (a packet completing in the same iteration) is unlikely twice in a row."""
_AFTER_CANCEL_SECONDS: Final = 1.0
"""How long :func:`wait_bounded` waits for what it cancelled to unwind."""


async def stop_reader(task: asyncio.Task[Any], stopped: asyncio.Event, writer: Any) -> bool:
    """Cancel a connection's reader ``task`` until it sets ``stopped``; after
    :data:`READER_STOP_SECONDS`, abort the connection (the reader then reads EOF). True if a
    cancel stopped the reader; False if the connection had to be aborted (the reader may even
    still run: the caller must not wait for it)."""
    from blendsm.broker._handler import abort_connection  # the handler module imports us

    loop = asyncio.get_running_loop()
    waiter = loop.create_task(stopped.wait())
    deadline = loop.time() + READER_STOP_SECONDS
    try:
        while loop.time() < deadline:
            task.cancel()
            done, _ = await asyncio.wait({waiter}, timeout=_RECANCEL_SECONDS)
            if done:
                return True
        _log.warning("a connection's reader ignored %.1fs of cancels: aborted", READER_STOP_SECONDS)
        abort_connection(writer)
        task.cancel()
        await asyncio.wait({waiter}, timeout=_AFTER_CANCEL_SECONDS)
        return False
    finally:
        waiter.cancel()


async def wait_bounded(aws: Iterable[Awaitable[Any]], seconds: float, what: str) -> bool:
    """Run ``aws`` concurrently for at most ``seconds``; cancel what is left (and wait up to a
    second for it to unwind). True if everything finished in time. Exceptions are logged,
    never raised: a stop goes on with its next step whatever happened to this one."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    if not tasks:
        return True
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, seconds))
    for task in pending:
        task.cancel()
    if pending:
        _log.warning(
            "%s: %d task(s) still running after %.1fs: cancelled", what, len(pending), seconds
        )
        await asyncio.wait(pending, timeout=_AFTER_CANCEL_SECONDS)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            _log.warning("%s: %r", what, task.exception())
    return not pending


async def close_connections(handlers: Iterable[Any], seconds: float) -> int:
    """Stop every handler at once (each closes its connection, flushing pending output); the
    connections of those not done within ``seconds`` (a client that stopped reading blocks a
    graceful close) are aborted. Returns how many were aborted."""
    from blendsm.broker._handler import abort_connection

    stopping = {asyncio.ensure_future(handler.stop()): handler for handler in handlers}
    if not stopping:
        return 0
    _done, pending = await asyncio.wait(stopping, timeout=max(0.0, seconds))
    for task in pending:
        abort_connection(stopping[task].writer)
        task.cancel()
    if pending:
        _log.warning("%d connection(s) not closed within %.1fs: aborted", len(pending), seconds)
        await asyncio.wait(pending, timeout=_AFTER_CANCEL_SECONDS)
    return len(pending)
