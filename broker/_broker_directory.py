"""The brokers and serving operators of the ``Brokers`` contract, as the HTTP API shows them.

Why a cache of its own, read from the chain rather than mirrored by the chain view: this is
directory data for people and clients choosing a broker, not a delivery decision, so it may be
a few seconds old, and the MQTT hot path never reads it. Keeping it out of the chain view also
keeps a deployment made before the Brokers contract working unchanged.

Stale-while-revalidate: :meth:`BrokerDirectory.snapshot` answers from memory; once the
snapshot is older than ``ttl`` seconds it starts one background refresh (never two at once)
and still answers the old snapshot. Only the very first call waits, for at most ``timeout``
seconds. A refresh that fails keeps the last good snapshot and records why (``error``), so a
sick node never turns the API into errors, and the age says how old the data is. Reads are
bounded: at most ``max_brokers`` broker records and ``max_topics`` topics per refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from blendsm.contracts import MAX_LISTED_BROKERS, BrokerInfo, ServingOperators
from blendsm.errors import ChainError, ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace

__all__ = ["BrokerDirectory", "DirectorySnapshot"]

_log = logging.getLogger("blendsm.broker.directory")

DIRECTORY_TTL: Final = 5.0
"""Seconds a snapshot is served before a background refresh starts."""
DIRECTORY_TIMEOUT: Final = 10.0
"""Seconds one refresh may take (a sick node must not leave it hanging)."""
DIRECTORY_MAX_TOPICS: Final = 1_000
"""Topics whose serving operators one refresh reads (one contract call each)."""


@dataclass(frozen=True, slots=True)
class DirectorySnapshot:
    """What one refresh read: every broker record (oldest first), the serving operators of
    each topic asked about, and when (monotonic seconds). ``error`` is why the latest refresh
    failed (this snapshot is then the last good one, or empty if there never was one)."""

    brokers: tuple[BrokerInfo, ...] = ()
    serving: dict[bytes, ServingOperators] = field(default_factory=dict)
    read_at: float | None = None
    error: str | None = None
    truncated: bool = False


class BrokerDirectory:
    """A cached read of ``Brokers`` for ``topics()`` (the topic ids the broker knows)."""

    def __init__(
        self,
        marketplace: Marketplace,
        topics: Callable[[], Sequence[bytes]],
        *,
        ttl: float = DIRECTORY_TTL,
        timeout: float = DIRECTORY_TIMEOUT,
        max_brokers: int = MAX_LISTED_BROKERS,
        max_topics: int = DIRECTORY_MAX_TOPICS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.marketplace = marketplace
        self.topics = topics
        self.ttl = ttl
        self.timeout = timeout
        self.max_brokers = max_brokers
        self.max_topics = max_topics
        self._clock = clock
        self._snapshot = DirectorySnapshot()
        self._refreshing: asyncio.Task[None] | None = None
        self.refreshes = 0
        """Refreshes that succeeded."""
        self.failures = 0
        """Refreshes that failed (the last good snapshot stayed)."""

    def age(self, snapshot: DirectorySnapshot) -> float | None:
        """Seconds since ``snapshot`` was read, None if it never was."""
        return None if snapshot.read_at is None else self._clock() - snapshot.read_at

    async def snapshot(self) -> DirectorySnapshot:
        """The latest snapshot; the first call waits for one (bounded by ``timeout``)."""
        current = self._snapshot
        if current.read_at is None and current.error is None:
            await self._start_refresh()
        elif (age := self.age(current)) is None or age >= self.ttl:
            await self._start_refresh(wait=False)
        return self._snapshot

    async def _start_refresh(self, *, wait: bool = True) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(
                self._refresh(), name="blendsm-broker-directory"
            )
        if wait:
            await asyncio.shield(self._refreshing)

    async def close(self) -> None:
        """Cancel a refresh in flight (the HTTP server is stopping)."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                snapshot = await self._read()
        except (ChainError, ConfigError, TimeoutError) as exc:
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
            old = self._snapshot
            if reason != old.error:  # once per reason, not every ttl
                _log.warning("broker directory: refresh failed, keeping the last one: %s", reason)
            self._snapshot = DirectorySnapshot(
                old.brokers, old.serving, old.read_at, reason, old.truncated
            )
            return
        self.refreshes += 1
        self._snapshot = snapshot

    async def _read(self) -> DirectorySnapshot:
        brokers = self.marketplace.brokers  # ConfigError if the deployment has no Brokers
        count = await brokers.broker_count()
        records = await brokers.brokers(limit=self.max_brokers)
        topic_ids = list(self.topics())
        serving = {t: await brokers.serving_operators(t) for t in topic_ids[: self.max_topics]}
        truncated = count > self.max_brokers or len(topic_ids) > self.max_topics
        return DirectorySnapshot(tuple(records), serving, self._clock(), None, truncated)
