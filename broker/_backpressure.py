"""Backpressure: what one connected session may have outstanding in the broker is bounded.

A subscriber that stops reading its socket fills the kernel's send buffer (bounded by the
kernel, ``net.ipv4.tcp_wmem``), then the asyncio transport's write buffer (broker memory,
unbounded in asyncio), and on amqtt's path every further delivery became a Task blocked on
the connection's write lock behind a ``drain()`` that never returns: broker memory grew without
bound. Here every connection has a :class:`Flow` (created at its first delivery, kept on its
writer as ``blendsm_flow``) that counts what the broker holds for it:

* the transport's write buffer (``get_write_buffer_size()``: exact, in bytes) and the number
  of messages in it (each write is marked with its message count; a mark leaves when the
  transport has sent past it);
* deliveries and notices started on amqtt's path (a task each) and not finished: their
  estimated bytes and count, released when the task ends;
* the QoS 0 bytes of the batch being built for it (the caller passes the outbox's share);
* paid deliveries held for credit (:mod:`~blendsm.broker._credit_hold`, as tasks). They give
  way: a delivery that would pass a bound first drops the oldest held ones (for credit, never
  charged), and they are left out when deciding whether the client is slow (pause, resume,
  disconnect): they wait on its payments, not on its reading.

Bounds (``sessions`` config): ``max_outgoing_bytes`` and ``max_outgoing_messages``.

* **Admission** (:meth:`Backpressure.admits`), before the gate: a delivery that would take a
  session over a bound is not admitted: not reserved, not charged, not written, counted
  (``blendsm_deliveries_dropped_slow_consumer_total``). An empty session always takes one
  message, whatever its size. The session is then *paused*: nothing is admitted until what it
  holds drains to half of both bounds (hysteresis, so a slow reader is not toggled per message).
* **Write** (:func:`~blendsm.broker._fanout.write_to_session`, the fan-out's one write point):
  a write to a session already at a bound is refused (its charges released), so whatever path
  calls it, the transport buffer exceeds ``max_outgoing_bytes`` by one write at most.
* **Slow consumer**: a session still paused ``slow_consumer_seconds`` after its pause began
  (one timer per paused session, not per message) is disconnected: its transport aborted
  (pending output dropped; amqtt's tasks blocked in ``drain()`` end with ConnectionResetError
  and release their reservations), a WARNING line (at most one a minute, with a count) and
  ``blendsm_slow_consumers_disconnected_total``. Its Will goes out (an unclean disconnect).
* **Notices** (quotes, receipts, payment requests, refusals) share the bound: a notice on
  amqtt's path is admitted like a delivery (``blendsm_notices_dropped_slow_consumer_total``
  when not); a quote or payment request queued inline travels with the delivery admitted.
* **QoS 1/2 to a persistent session** while paused: put in the session's offline queue
  (bounded by ``sessions.max_queued_messages`` / ``max_queued_bytes``, gated and charged when
  replayed) rather than dropped, as mosquitto queues QoS 1/2 beyond its in-flight window; the
  queue is replayed when the session drains below half its bounds, or at its reconnect after a
  slow-consumer disconnect. (After a resume without a reconnect, live deliveries are admitted
  again at once and may overtake queued ones still being replayed: MQTT's ordering holds per
  connection only for what was sent; a reconnect replays the queue first.) QoS 0, clean and
  anonymous sessions: dropped and counted.

Memory per connection is therefore at most ``max_outgoing_bytes`` + one write (at most
``MAX_BATCH`` messages of at most ``limits.max_packet_bytes``; in practice the batch admitted
under the bound) in the transport, plus the kernel's socket buffer, plus the tasks admitted
under the bound. Bytes written by amqtt itself outside the delivery path (SUBACK, PINGRESP,
redelivery at reconnect, the replay of an offline queue, which waits for ``drain()`` one
message at a time) are not admitted here but count in the transport buffer the next check sees.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

from blendsm.broker._log_limit import LogLimiter

if TYPE_CHECKING:
    from blendsm.broker._config_sessions import SessionsConfig
    from blendsm.broker._stats import ServiceStats


class HeldForCredit(Protocol):
    """What a :class:`Flow` asks of the session's credit hold
    (:class:`~blendsm.broker._credit_hold.CreditHold`)."""

    def share(self) -> tuple[int, int]:
        """(bytes, messages) held for credit, all counted in the flow's ``task_*``."""
        ...

    def give_room(self, nbytes: int, messages: int) -> tuple[int, int]:
        """Drop the oldest held until ``nbytes`` and ``messages`` are freed (or none is
        left); the (bytes, messages) freed."""
        ...


__all__ = [
    "PUBLISH_OVERHEAD",
    "Backpressure",
    "Flow",
    "HeldForCredit",
    "publish_size",
    "track",
    "transport_of",
]

PUBLISH_OVERHEAD: Final = 9
"""Bytes of a PUBLISH besides topic and payload, at most: fixed header (5), topic length
(2), packet id (2)."""

_log = logging.getLogger("blendsm.broker")


def publish_size(topic: str, data: bytes | bytearray | None) -> int:
    """An upper estimate of a PUBLISH's encoded size (the topic counted as ASCII)."""
    return len(topic) + (len(data) if data is not None else 0) + PUBLISH_OVERHEAD


def transport_of(writer: Any) -> Any:
    """The asyncio transport under amqtt's TCP/TLS writer (a StreamWriterAdapter) or its
    WebSocket writer; None when there is none."""
    stream = getattr(writer, "_writer", None)
    transport = getattr(stream, "transport", None)
    if transport is None:
        transport = getattr(getattr(writer, "_protocol", None), "transport", None)
    if transport is None or not hasattr(transport, "get_write_buffer_size"):
        return None
    return transport


class Flow:
    """What one connection holds in the broker, and whether it is paused."""

    __slots__ = (
        "_bound",
        "_handed",
        "_marked",
        "_marks",
        "hold",
        "paused_since",
        "session",
        "task_bytes",
        "task_messages",
        "timer",
        "transport",
        "writer",
    )

    def __init__(self, bound: Backpressure, writer: Any, transport: Any) -> None:
        self._bound = bound
        self.writer = writer
        self.transport = transport
        self.session: Any = None
        self._handed = 0
        """Bytes handed to the transport through :meth:`wrote` since its buffer was last empty."""
        self._marks: deque[tuple[int, int]] | None = None
        """(end offset in ``_handed``, messages) of each write not yet sent past; made at the
        first write the kernel did not take at once (an empty deque is ~600 bytes)."""
        self._marked = 0
        """Messages in ``_marks``."""
        self.task_bytes = 0
        self.task_messages = 0
        self.paused_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.hold: HeldForCredit | None = None
        """The session's deliveries held for credit, counted here (in ``task_*``) but not the
        client's doing: they make room when the bound is reached, and never make it a slow
        consumer (set by :meth:`~blendsm.broker._credit_hold.CreditHold.adopt`)."""

    # --- what is held ------------------------------------------------------------------

    def _buffered_messages(self, size: int) -> int:
        """Messages (partly) still in the transport buffer of ``size`` bytes."""
        if size == 0:
            if self._marks:
                self._marks.clear()
                self._marked = 0
            self._handed = 0
            return 0
        marks = self._marks
        if marks:
            # Bytes not written through wrote() make this count high, never low, until the
            # buffer is empty again.
            sent = self._handed - size
            while marks and marks[0][0] <= sent:
                self._marked -= marks.popleft()[1]
        return self._marked

    def held(self) -> tuple[int, int]:
        """(bytes, messages) this connection holds in the broker now."""
        transport = self.transport
        size = transport.get_write_buffer_size() if not transport.is_closing() else 0
        return size + self.task_bytes, self._buffered_messages(size) + self.task_messages

    def outstanding(self, held_bytes: int, held_messages: int) -> tuple[int, int]:
        """Of ``held_*`` (what :meth:`held` said), what waits on the client, not on its
        payments: the deliveries held for credit taken out."""
        hold = self.hold
        if hold is None:
            return held_bytes, held_messages
        hold_bytes, hold_messages = hold.share()
        return held_bytes - hold_bytes, held_messages - hold_messages

    # --- admission ---------------------------------------------------------------------

    def fits_now(self, nbytes: int, messages: int) -> bool:
        """The cheap check: ``messages`` more (``nbytes``) fit for sure, with nothing in the
        transport buffer and the session not paused (the caller passes what it has queued
        for all sessions plus the new one: an upper bound of this session's share). Counts
        the tasks and held deliveries, so a session holding for credit stays on this path."""
        bound = self._bound
        return (
            self.paused_since is None
            and self.task_bytes + nbytes <= bound.max_bytes
            and self.task_messages + messages <= bound.max_messages
            and not self.transport.get_write_buffer_size()
        )

    def admits(
        self,
        session: Any,
        nbytes: int,
        messages: int = 1,
        pending_bytes: int = 0,
        pending_messages: int = 0,
    ) -> bool:
        """Whether ``messages`` more (``nbytes``) fit, besides what the caller queued for this
        connection and has not written yet (``pending_*``); pauses the session when not."""
        bound = self._bound
        transport = self.transport
        if (
            self.paused_since is None
            and not self.task_messages
            and not transport.get_write_buffer_size()
            and pending_bytes + nbytes <= bound.max_bytes
            and pending_messages + messages <= bound.max_messages
        ):
            return True  # the common case: nothing waiting in the transport
        if self.session is None:
            self.session = session
        held_bytes, held_messages = self.held()
        held_bytes += pending_bytes
        held_messages += pending_messages
        if self.paused_since is not None:
            own_bytes, own_messages = self.outstanding(held_bytes, held_messages)
            if own_bytes * 2 > bound.max_bytes or own_messages * 2 > bound.max_messages:
                return False
            self._resume()
        if held_bytes == 0 and held_messages == 0:
            return True  # an empty session takes one message, whatever its size
        over_bytes = held_bytes + nbytes - bound.max_bytes
        over_messages = held_messages + messages - bound.max_messages
        if over_bytes <= 0 and over_messages <= 0:
            return True
        if self.hold is not None:
            # Deliveries held for credit give way (their oldest dropped for credit, never
            # charged): a member that reads but pays late is not a slow consumer.
            freed_bytes, freed_messages = self.hold.give_room(over_bytes, over_messages)
            held_bytes -= freed_bytes
            held_messages -= freed_messages
            if (freed_bytes >= over_bytes and freed_messages >= over_messages) or (
                held_bytes == 0 and held_messages == 0
            ):
                return True
        self._pause(session, held_bytes, held_messages)
        return False

    def may_write(self, nbytes: int, messages: int) -> bool:
        """The write-time bound: refused when the connection is already at a bound (then the
        transport exceeds ``max_outgoing_bytes`` by one write at most)."""
        bound = self._bound
        size = self.transport.get_write_buffer_size()
        if size == 0:
            self._buffered_messages(0)
            return True
        if size < bound.max_bytes and self._buffered_messages(size) < bound.max_messages:
            return True
        self._pause(self.session, size, self._marked)
        return False

    def refused(self, messages: int) -> None:
        """A write of ``messages`` refused by :meth:`may_write`: counted."""
        self._bound.stats.deliveries_dropped_slow_consumer += messages

    def wrote(self, nbytes: int, messages: int) -> None:
        """``messages`` (``nbytes``) were just handed to the transport."""
        if self.transport.get_write_buffer_size() == 0:
            return  # all taken by the kernel at once
        self._handed += nbytes
        if self._marks is None:
            self._marks = deque()
        self._marks.append((self._handed, messages))
        self._marked += messages

    def task_started(self, nbytes: int) -> None:
        self.task_bytes += nbytes
        self.task_messages += 1

    def task_ended(self, nbytes: int) -> None:
        self.task_bytes -= nbytes
        self.task_messages -= 1

    # --- pause, resume, disconnect -------------------------------------------------------

    def _pause(self, session: Any, held_bytes: int, held_messages: int) -> None:
        if self.paused_since is not None:
            return
        bound = self._bound
        if session is not None:
            self.session = session
        loop = asyncio.get_running_loop()
        self.paused_since = loop.time()
        self.timer = loop.call_later(bound.seconds, self._deadline)
        bound.paused += 1
        bound.stats.slow_consumers_paused += 1
        bound.pause_log.note(
            "client %r paused: %d bytes / %d messages outstanding (sessions.max_outgoing_bytes"
            " %d, max_outgoing_messages %d); deliveries not sent nor charged until it reads",
            getattr(self.session, "client_id", None),
            held_bytes,
            held_messages,
            bound.max_bytes,
            bound.max_messages,
        )

    def _resume(self) -> None:
        self.paused_since = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        bound = self._bound
        bound.paused -= 1
        session = self.session
        queue = getattr(session, "retained_messages", None)
        if queue is not None and not queue.empty() and bound.on_resume is not None:
            bound.on_resume(session)  # what was queued while paused goes out now

    def _deadline(self) -> None:
        """``slow_consumer_seconds`` after the pause: still over half the bounds: aborted."""
        self.timer = None
        if self.paused_since is None:
            return
        bound = self._bound
        held_bytes, held_messages = self.outstanding(*self.held())
        if self.transport.is_closing():
            self.paused_since = None
            bound.paused -= 1
            return
        if held_bytes * 2 <= bound.max_bytes and held_messages * 2 <= bound.max_messages:
            self._resume()
            return
        self.paused_since = None
        bound.paused -= 1
        bound.stats.slow_consumers_disconnected += 1
        bound.disconnect_log.note(
            "client %r disconnected as a slow consumer: %d bytes / %d messages outstanding"
            " for %.1fs (sessions.slow_consumer_seconds)",
            getattr(self.session, "client_id", None),
            held_bytes,
            held_messages,
            bound.seconds,
        )
        self.writer.is_closed = True  # what is still being written is released, not charged
        self.transport.abort()


class Backpressure:
    """The outgoing bounds of one broker's sessions (``sessions`` config), and their counts."""

    __slots__ = (
        "disconnect_log",
        "max_bytes",
        "max_messages",
        "on_resume",
        "pause_log",
        "paused",
        "seconds",
        "stats",
    )

    def __init__(self, config: SessionsConfig, stats: ServiceStats) -> None:
        self.max_bytes = config.max_outgoing_bytes
        self.max_messages = config.max_outgoing_messages
        self.seconds = config.slow_consumer_seconds
        self.stats = stats
        self.paused = 0
        """Connections paused now (a gauge)."""
        self.on_resume: Any = None
        """Called with a session whose offline queue has messages when its pause ends."""
        self.pause_log = LogLimiter(_log)
        """Sessions paused over their outgoing bound: one INFO line a minute, with a count."""
        self.disconnect_log = LogLimiter(_log, logging.WARNING)
        """Slow consumers disconnected: one WARNING line a minute (the first at once), with a
        count: a client can make itself a slow consumer over and over."""

    def flow(self, writer: Any) -> Flow | None:
        """The connection's Flow (made at its first use); None for a writer without an
        asyncio transport (then nothing is bounded here)."""
        flow: Flow | None = getattr(writer, "blendsm_flow", None)
        if flow is None and writer is not None:
            transport = transport_of(writer)
            if transport is None:
                return None
            flow = Flow(self, writer, transport)
            try:
                writer.blendsm_flow = flow
            except AttributeError:
                return None
        return flow


def track(task: asyncio.Future[Any], flow: Flow, nbytes: int) -> None:
    """Count a delivery task's ``nbytes`` against its connection until the task ends."""
    flow.task_started(nbytes)
    task.add_done_callback(lambda _: flow.task_ended(nbytes))
