"""``DeliveryPath``: the base of ``BlendBroker`` that owns subscriptions and the fan-out.

It overrides amqtt 0.12.1's subscription bookkeeping (``add_subscription``,
``_del_subscription``, ``_del_all_subscriptions``) so that amqtt's table and BlendSM's topic
trie stay equal and the filter caps apply (:mod:`blendsm.broker._subscriptions`), its
broadcast step (``_run_broadcast``) with BlendSM's fan-out (:mod:`blendsm.broker._fanout`),
and the loop that runs those steps (``_broadcast_loop``) with one that runs them in its own
task, one after another.
A class of its own keeps ``BlendBroker`` (retained messages, offline queues) and
``ConnectPath`` (CONNECT, :mod:`blendsm.broker._connect_path`) apart from the delivery path;
the overridden signatures are checked with the others at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from amqtt.broker import Broker
from amqtt.session import Session

from blendsm.broker._fanout import run_broadcast
from blendsm.broker._replay_serve import forget_subscribed, mark_subscribed
from blendsm.broker._subscriptions import SUBSCRIBE_REFUSED, SubscriptionTable

if TYPE_CHECKING:
    from blendsm.broker._service import MarketplaceService

__all__ = ["DeliveryPath"]

_log = logging.getLogger("blendsm.broker")


class DeliveryPath(Broker):  # type: ignore[misc]  # amqtt ships no types: Broker is Any
    """amqtt's Broker with BlendSM's subscription index and fan-out (see the module doc)."""

    _subscription_table: SubscriptionTable | None = None
    """amqtt's ``_subscriptions`` with the topic trie over it (created on first use, so a
    broker made by the plugin's class swap has one too)."""
    _other_topic_plugins: bool | None = None

    if TYPE_CHECKING:  # provided by BlendBroker, the one subclass

        @property
        def service(self) -> MarketplaceService: ...

        def _has_other(self, kind: str) -> bool: ...

    def other_topic_plugins(self) -> bool:
        """Whether a third-party topic plugin is loaded (its decisions are awaited too)."""
        if self._other_topic_plugins is None:
            self._other_topic_plugins = self._has_other("_topic_plugins")
        return self._other_topic_plugins

    def subscription_table(self) -> SubscriptionTable:
        """The subscription table and its topic trie, built over amqtt's on first use."""
        table = self._subscription_table
        if table is None or table.table is not self._subscriptions:
            service = self.service
            table = SubscriptionTable(self._subscriptions, service.config.limits, service.stats)
            self._subscription_table = table
        return table

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's checks within the filter caps; the trie follows what amqtt stored. A
        granted filter marks the replay ring (:mod:`~blendsm.broker._replay`): a resume
        serves only what was admitted before it."""
        code = await self.subscription_table().subscribe(
            subscription, session, super().add_subscription
        )
        if code < SUBSCRIBE_REFUSED:
            mark_subscribed(self.service, session, subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        forget_subscribed(session, a_filter)
        return self.subscription_table().unsubscribe(a_filter, session)

    async def _del_all_subscriptions(self, session: Session) -> None:
        forget_subscribed(session)
        self.subscription_table().unsubscribe_all(session)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        await run_broadcast(self, running_tasks)

    async def _broadcast_loop(self) -> None:
        """Run :meth:`_run_broadcast` passes one after another until amqtt's shutdown.

        Why not amqtt's loop: it starts a Task per pass and waits on it and the shutdown
        future with ``asyncio.wait``, so at a steady rate (a pass per message) every message
        cost a Task, three futures and their callbacks on the loop that delivers. Here the
        passes run in this task; amqtt's ``_shutdown_broadcast_loop`` sets the shutdown future,
        which cancels this task wherever it waits (amqtt cancelled its pass the same way), and
        then waits for it. A pass that fails is logged and the next one runs, as in amqtt."""
        running_tasks = self._tasks_queue
        shutdown = self._broadcast_shutdown_waiter
        me = asyncio.current_task()
        assert me is not None  # started by amqtt as a Task
        shutdown.add_done_callback(lambda _: me.cancel())
        try:
            while not shutdown.done():
                while running_tasks and running_tasks[0].done():  # amqtt's offline queues
                    task = running_tasks.popleft()
                    if not task.cancelled() and task.exception() is not None:
                        _log.error("broadcast task failed: %r", task.exception())
                try:
                    await self._run_broadcast(running_tasks)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.exception("broadcast pass failed; the next one runs")
        except asyncio.CancelledError:
            if not shutdown.done():
                raise  # cancelled by someone else: not ours to swallow
        finally:
            for task in running_tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*running_tasks, return_exceptions=True)
