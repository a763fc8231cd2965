"""Which signed envelopes the broker already admitted: duplicates are dropped before they are
delivered, charged or anchored.

A device numbers its messages per topic with increasing sequence numbers (never reused,
possibly skipping some after a crash: :mod:`blendsm.device_sdk._sequence`) and re-sends the
ones not acknowledged after a reconnect, so the same (device, topic, sequence) legitimately
arrives twice; anyone who captured an envelope can also publish its bytes again. The broker
admits each (device, topic, sequence) once.

Memory is bounded whatever clients do. Per (device, topic) pair: the highest sequence seen
and a bitmask of the :data:`WINDOW` sequences at and below it. A sequence above the mark is
new (the mark moves up); one within the window is new once (late arrival); one older than
the window is refused as a replay. At most ``max_pairs`` pairs are tracked: past that the
least recently used pair is evicted, and from then on a pair not in memory is not assumed
new: the caller seeds it from the durable leaf store first (:meth:`DedupWindow.known`), so a
duplicate that can be detected is never delivered (fail safe for money). The same holds after
a restart, whose marks are seeded from the leaf store in one query.

The check is a dict lookup and a few integer operations, on the event loop, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

__all__ = ["WINDOW", "DedupWindow"]

WINDOW: Final = 256
"""Sequences below a pair's highest one still accepted once (late, out of order)."""

_FULL: Final = (1 << WINDOW) - 1

Pair = tuple[bytes, str]
"""(20 device address bytes, topic)."""


class DedupWindow:
    """High-water mark and recent-sequence bitmask per (device, topic); at most ``max_pairs``
    pairs (``payments.dedup_max_pairs``, about 0.4 KB each), least recently used evicted."""

    __slots__ = ("_pairs", "complete", "evicted", "max_pairs")

    def __init__(self, max_pairs: int) -> None:
        if max_pairs < 1:
            raise ValueError("max_pairs must be >= 1")
        self.max_pairs = max_pairs
        # pair -> [highest sequence seen, bitmask: bit i set when (highest - i) was seen]
        self._pairs: OrderedDict[Pair, list[int]] = OrderedDict()
        self.complete = True
        """True while every pair ever admitted (or stored) is in memory, so an unknown pair
        is a new one; False once a pair was evicted or the seed did not fit."""
        self.evicted = 0
        """Pairs evicted at the cap so far."""

    def __len__(self) -> int:
        return len(self._pairs)

    def known(self, device: bytes, topic: str) -> bool:
        """Whether :meth:`admit` can decide for this pair without the leaf store: it is in
        memory, or nothing was ever forgotten."""
        return self.complete or (device, topic) in self._pairs

    def admit(self, device: bytes, topic: str, sequence: int) -> bool:
        """True (and remembered) the first time; False for a duplicate or a sequence older
        than the window. Call :meth:`seed` first for a pair that is not :meth:`known`."""
        key = (device, topic)
        state = self._pairs.get(key)
        if state is None:
            self._insert(key, [sequence, 1])
            return True
        self._pairs.move_to_end(key)
        high, seen = state
        if sequence > high:
            shift = sequence - high
            state[0] = sequence
            state[1] = ((seen << shift) | 1) & _FULL if shift < WINDOW else 1
            return True
        bit = high - sequence
        if bit >= WINDOW or seen >> bit & 1:
            return False
        state[1] = seen | 1 << bit
        return True

    def high(self, device: bytes, topic: str) -> int | None:
        """The highest sequence admitted for this pair while it is in memory, else None."""
        state = self._pairs.get((device, topic))
        return None if state is None else state[0]

    def forget(self, device: bytes, topic: str, sequence: int) -> None:
        """Undo :meth:`admit` of ``sequence`` (its leaf could not be stored, so the message
        was not acknowledged and the device will send it again). The high-water mark stays:
        the sequence is accepted again within the window."""
        state = self._pairs.get((device, topic))
        if state is not None and 0 <= state[0] - sequence < WINDOW:
            state[1] &= ~(1 << (state[0] - sequence))

    def seed(self, device: bytes, topic: str, high: int) -> None:
        """Every sequence up to ``high`` of this pair was admitted before (read from the leaf
        store): refuse them all. Merges with what is in memory."""
        key = (device, topic)
        state = self._pairs.get(key)
        if state is None:
            self._insert(key, [high, _FULL])
        elif high >= state[0]:
            state[0], state[1] = high, _FULL
        else:
            state[1] |= _FULL & ~((1 << (state[0] - high)) - 1)

    def seed_all(self, marks: Iterable[tuple[bytes, str, int]], *, truncated: bool) -> None:
        """Seed many pairs, least recently used first; ``truncated``: the store holds more
        pairs than were given (unknown pairs then need a look-up)."""
        for device, topic, high in marks:
            self.seed(device, topic, high)
        if truncated:
            self.complete = False

    def _insert(self, key: Pair, state: list[int]) -> None:
        self._pairs[key] = state
        while len(self._pairs) > self.max_pairs:
            self._pairs.popitem(last=False)
            self.evicted += 1
            self.complete = False
