"""Replay: each market topic's recent envelopes, kept so a subscriber that failed over here
gets what it missed.

Why: a buyer that moves from broker A to this broker subscribes here and then misses what
arrived here during the move (its live subscription only sees what comes after it). Every
serving broker receives every envelope (``MultiHomedPublisher``), so this broker holds what
the buyer missed; it keeps, per market topic, a ring of the envelopes it admitted (after the
signature check and the (device, topic, sequence) de-duplication), and a resume request
(:mod:`blendsm.device_sdk._resume`) delivers the ones newer than what the buyer saw.

Bounds: ``replay.messages`` envelopes per topic (0 disables replay) and ``replay.bytes`` in
all; past either, the oldest entries go first. An append is O(1) amortised (two deque
appends, evictions from the left), done inline when the envelope is admitted; nothing runs
per delivery. Only devices that the chain lets publish on a market topic fill the rings
(envelopes are checked first), so the number of topics is bounded by the chain; the bytes
cap bounds the memory whatever their number.

What a resume serves (:func:`serve_resume` in :mod:`blendsm.broker._replay_serve`): only
entries admitted up to the moment the session subscribed to the topic (``mark``); the later
ones reach it live, so replaying them would charge it twice. The narrow window left (an
envelope admitted before the SUBSCRIBE and broadcast after it) can deliver one copy twice;
the SDK drops the copy before counting it, and the unpaid charge it leaves is bounded by the
credit gate (``payments.credit_messages``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from blendsm.broker._config_fields import check_keys, integer

__all__ = ["ReplayConfig", "ReplayEntry", "ReplayRing", "parse_replay", "topic_matches"]

MAX_REPLAY_MESSAGES: Final = 100_000
"""Highest ``replay.messages`` accepted (per topic)."""
MAX_REPLAY_BYTES: Final = 1 << 30
"""Highest ``replay.bytes`` accepted (1 GiB)."""
ENTRY_OVERHEAD: Final = 160
"""Bytes an entry costs besides its payload (object, tuple slots, deque cell), counted
against ``replay.bytes`` so a flood of tiny envelopes is bounded too."""


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """The ``replay`` section: how much of each market topic a broker keeps to replay."""

    messages: int = 1000
    """Envelopes kept per market topic (0: replay off, resume requests answered ``disabled``)."""
    bytes: int = 16 * 1024 * 1024
    """Payload bytes (plus a fixed overhead per entry) kept over all topics (>= 64 KiB)."""


def parse_replay(data: Mapping[str, Any]) -> ReplayConfig:
    """Validate the ``replay`` mapping (missing keys take their defaults)."""
    check_keys(data, ReplayConfig, "replay")
    default = ReplayConfig()
    return ReplayConfig(
        messages=integer(
            data, "messages", "replay", default.messages, low=0, high=MAX_REPLAY_MESSAGES
        ),
        bytes=integer(data, "bytes", "replay", default.bytes, low=65536, high=MAX_REPLAY_BYTES),
    )


class ReplayEntry:
    """One admitted envelope: its wire bytes and what a resume selects it by."""

    __slots__ = ("data", "device", "qos", "sequence", "serial", "topic")

    def __init__(
        self, serial: int, topic: str, device: bytes, sequence: int, data: bytes, qos: int
    ) -> None:
        self.serial = serial
        self.topic = topic
        self.device = device
        self.sequence = sequence
        self.data = data
        self.qos = qos


class ReplayRing:
    """Per-topic rings of recent envelopes within a per-topic count and a global byte cap."""

    __slots__ = (
        "_all",
        "_topics",
        "evicted",
        "held",
        "max_bytes",
        "max_messages",
        "serial",
        "size",
    )

    def __init__(self, config: ReplayConfig) -> None:
        self.max_messages = config.messages
        self.max_bytes = config.bytes
        self._topics: dict[str, deque[ReplayEntry]] = {}
        self._all: deque[ReplayEntry] = deque()
        """Every entry held, oldest first (entries evicted per topic are skipped lazily)."""
        self.serial = 0
        """Serial of the latest entry appended (a session's subscribe mark is one)."""
        self.size = 0
        """Bytes held (payloads plus :data:`ENTRY_OVERHEAD` each)."""
        self.evicted = 0
        """Entries evicted so far (by either bound)."""
        self.held = 0
        """Entries held over all topics."""

    @property
    def enabled(self) -> bool:
        return self.max_messages > 0

    def __len__(self) -> int:
        return self.held

    def topics(self) -> int:
        return len(self._topics)

    def append(self, topic: str, device: bytes, sequence: int, data: bytes, qos: int) -> None:
        """Keep an envelope just admitted on ``topic`` (inline on the publish path: O(1))."""
        if self.max_messages <= 0:
            return
        self.serial += 1
        entry = ReplayEntry(self.serial, topic, device, sequence, data, qos)
        ring = self._topics.get(topic)
        if ring is None:
            ring = self._topics[topic] = deque()
        ring.append(entry)
        self._all.append(entry)
        self.size += len(data) + ENTRY_OVERHEAD
        self.held += 1
        if len(ring) > self.max_messages:
            self._drop(ring.popleft())
        while self.size > self.max_bytes and self._all:
            self._evict_oldest()
        # Entries dropped by their topic's count linger in ``_all`` until they reach its
        # left end: past twice what is held, rebuild it (O(n) once per n appends: O(1)).
        held = self.held
        if len(self._all) > 2 * held + 64:
            self._all = deque(e for e in self._all if e.serial >= 0)

    def _drop(self, entry: ReplayEntry) -> None:
        """``entry`` left its topic's ring (``_all`` skips it when it gets there)."""
        self.size -= len(entry.data) + ENTRY_OVERHEAD
        self.evicted += 1
        self.held -= 1
        entry.data = b""
        entry.serial = -1

    def _evict_oldest(self) -> None:
        entry = self._all.popleft()
        if entry.serial < 0:
            return  # already dropped by its topic's count
        ring = self._topics[entry.topic]
        ring.popleft()  # the oldest of its topic is the oldest held overall
        self._drop(entry)
        if not ring:
            del self._topics[entry.topic]

    def after(
        self, topic: str, device: bytes, sequence: int, mark: int
    ) -> tuple[list[ReplayEntry], int | None]:
        """The entries of ``device`` on ``topic`` with a sequence above ``sequence`` admitted
        up to serial ``mark``, in sequence order, and the lowest sequence of ``device`` the
        ring still holds (None: none)."""
        ring = self._topics.get(topic)
        if ring is None:
            return [], None
        lowest: int | None = None
        found: list[ReplayEntry] = []
        for entry in ring:
            if entry.device != device:
                continue
            if lowest is None or entry.sequence < lowest:
                lowest = entry.sequence
            if entry.sequence > sequence and entry.serial <= mark:
                found.append(entry)
        found.sort(key=lambda e: e.sequence)
        return found, lowest

    def entries(self, topic: str) -> Iterator[ReplayEntry]:
        """The entries held for ``topic``, oldest first (for tests and the dashboard)."""
        return iter(tuple(self._topics.get(topic, ())))


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 filter matching (``+`` one level, ``#`` the rest), for the few filters of
    one session; ``$`` topics are never matched by a leading wildcard."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels):
            return False
        if part != "+" and part != levels[i]:
            return False
    return len(parts) == len(levels)
