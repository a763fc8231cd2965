"""What the stages of ``blendsm demo`` share: the scenario's figures (prices, parties, deposit,
rates), a chain reader SDK threads may use, the per-buyer tally, the progress line, and a
poll that does not block the event loop.

Threading: the in-process EthereumTester is not thread-safe and SDK callbacks run on paho and
worker threads, so the Subscribers read the chain through :class:`LoopChainReader`, which
runs each read on the event loop that owns the chain.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from blendsm.contracts import Market
from blendsm.errors import ChainUnavailableError

__all__ = [
    "BUYERS",
    "CHALLENGE_PERIOD",
    "CREDIT_MESSAGES",
    "DEPOSIT",
    "DEVICES",
    "ENCRYPTED_TOPIC",
    "FEE_BPS",
    "PAY_EVERY",
    "PRICES",
    "PROOF_SAMPLING",
    "RATE_HZ",
    "LoopChainReader",
    "Progress",
    "Tally",
    "until",
]

_T = TypeVar("_T")

PRICES = {"demo/temperature": 1_000, "demo/humidity": 700, "demo/location": 2_500}
"""Price per message (wei) of each paid topic; the last one is end-to-end encrypted."""
ENCRYPTED_TOPIC = "demo/location"
DEVICES = ("device-1", "device-2", "device-3")
"""One device per topic, in the order of PRICES."""
BUYERS = ("buyer-1", "buyer-2")
DEPOSIT = 10**17
FEE_BPS = 150  # 1.5 % of every claim to the broker operator
CHALLENGE_PERIOD = 3600
RATE_HZ = 20.0  # readings per second per device
PROOF_SAMPLING = 0.1
CREDIT_MESSAGES = 100  # unpaid messages the broker lets a channel owe ...
PAY_EVERY = 5  # ... while the SDK pays every 5: vouchers in flight rarely stall delivery


class LoopChainReader:
    """A :class:`~blendsm.device_sdk.ChainReader` that runs every read on ``loop`` through the
    async bindings (``asyncio.run_coroutine_threadsafe``), so threads never touch an
    in-process chain directly. Topic sellers and device owners are cached ``ttl`` seconds,
    anchored roots for good. Never call it from the loop's own thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        marketplace: Any,
        *,
        ttl: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.loop = loop
        self.marketplace = marketplace
        self.ttl = ttl
        self.timeout = timeout
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._roots: dict[tuple[str, int], bytes] = {}
        self.calls = 0

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        self.calls += 1
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except TimeoutError as exc:
            future.cancel()
            raise ChainUnavailableError(
                f"chain read did not finish within {self.timeout:g} s"
            ) from exc

    def _cached(
        self, key: tuple[str, str], read: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]

        async def call() -> str | None:
            return await read()

        value = self._run(call())
        with self._lock:
            self._cache[key] = (now + self.ttl, value)
        return value

    def seller_of_topic(self, topic: str) -> str | None:
        async def read() -> str | None:
            info = await self.marketplace.market.topic(Market.topic_id(topic))
            return None if info is None else str(info.seller)

        return self._cached(("topic", topic), read)

    def active_seller_of(self, device: str) -> str | None:
        async def read() -> str | None:
            seller = await self.marketplace.registry.active_seller_of(device)
            return None if seller is None else str(seller)

        return self._cached(("device", device.lower()), read)

    def anchor_root(self, broker: str, batch_id: int) -> bytes | None:
        key = (broker.lower(), batch_id)
        with self._lock:
            root = self._roots.get(key)
        if root is not None:
            return root

        async def read() -> bytes | None:
            info = await self.marketplace.anchors.anchor_of(broker, batch_id)
            return None if info is None else bytes(info.root)

        got = self._run(read())
        if got is not None:
            with self._lock:
                self._roots[key] = got
        return got


@dataclass
class Tally:
    """What one buyer's Subscriber saw (callbacks run on SDK threads: under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    paid: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    unverified: int = 0
    decrypted: int = 0
    undecrypted: int = 0
    events: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def on_message(self, _subscriber: Any, message: Any) -> None:
        """The Subscriber's ``on_message``: count what was paid for, verified, decrypted."""
        with self.lock:
            if message.paid:
                self.paid[message.topic] = self.paid.get(message.topic, 0) + 1
            if message.verified:
                self.verified += 1
            else:
                self.unverified += 1
            if message.decrypted is True:
                self.decrypted += 1
            elif message.encrypted:
                self.undecrypted += 1

    def on_integrity(self, _subscriber: Any, event: Any) -> None:
        """The Subscriber's ``on_integrity``: count each kind of integrity event."""
        with self.lock:
            self.events[str(event.kind)] = self.events.get(str(event.kind), 0) + 1

    def on_error(self, _subscriber: Any, _error: Any) -> None:
        """The Subscriber's ``on_error``: count it."""
        with self.lock:
            self.errors += 1


class Progress:
    """One updating line on a TTY, a line every few seconds otherwise."""

    def __init__(self, stream: IO[str], *, quiet: bool = False, every: float = 2.0) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            return
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        """A phase line (ends the live line first on a TTY)."""
        if self.quiet:
            return
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


async def until(predicate: Callable[[], bool], within: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` every ``step`` seconds for up to ``within`` seconds, without
    blocking the loop (the broker and the chain run on it); its last answer."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()
