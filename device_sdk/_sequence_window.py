"""De-duplication and gap detection per (device, topic), in bounded memory.

Why: a :class:`~blendsm.device_sdk.FailoverSubscriber` may get one envelope twice (live from a
broker and replayed by the next one, or from a broker that queued it across a reconnect) and
must hand it to the application, and count its value, once. Devices number their envelopes
per (device, topic), so a high-water mark and a bitmap of the last ``width`` sequences tell a
first copy from a repeat; a sequence that leaves the window without having been seen is a gap.

Rules (a hypothesis test checks them against a brute-force model):

* the first sequence seen of a pair starts it; a sequence is accepted once, if it is above
  ``high - width`` (the window), refused otherwise (too old to tell: treated as a repeat,
  never counted);
* ``low`` is the lowest sequence accepted: nothing below it is a gap (the subscription
  started there);
* every sequence in ``[low, high - width]`` never accepted is reported missing once, when it
  leaves the window, as maximal runs ``(first, last)``.

Memory: one int bitmap of ``width`` bits per pair, and at most ``max_pairs`` pairs (least
recently used evicted: a repeat of an evicted pair is accepted again, which is the documented
bound of the de-duplication).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

__all__ = ["DEFAULT_WIDTH", "SequenceWindow", "SequenceWindows"]

DEFAULT_WIDTH: Final = 1024
"""Sequences remembered behind the highest one (a failover's replay must fit in it)."""


class SequenceWindow:
    """One (device, topic) pair: high-water mark, lowest accepted, and the recent bitmap."""

    __slots__ = ("bits", "high", "low", "width")

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        if width < 1:
            raise ValueError("width must be >= 1")
        self.width = width
        self.high: int | None = None
        self.low: int | None = None
        self.bits = 0
        """Bit i set: sequence ``high - i`` was accepted."""

    def accept(self, sequence: int) -> tuple[bool, list[tuple[int, int]]]:
        """Whether ``sequence`` is new (then it is remembered), and the runs of sequences
        this made leave the window unseen (gaps, each reported once)."""
        high = self.high
        if high is None or self.low is None:
            self.high = self.low = sequence
            self.bits = 1
            return True, []
        width = self.width
        if sequence > high:
            shift = sequence - high
            gaps = self._leaving(high, sequence)
            self.bits = ((self.bits << shift) | 1) & ((1 << width) - 1) if shift < width else 1
            self.high = sequence
            return True, gaps
        offset = high - sequence
        if offset >= width or self.bits >> offset & 1:
            return False, []
        self.bits |= 1 << offset
        if sequence < self.low:
            self.low = sequence
        return True, []

    def _leaving(self, high: int, new_high: int) -> list[tuple[int, int]]:
        """Unseen sequences in ``[low, new_high - width]`` still in the old window or skipped
        over, as runs (O(width) at most, O(1) for a step of one)."""
        assert self.low is not None
        width, low, bits = self.width, self.low, self.bits
        last_leaving = new_high - width
        first = max(low, high - width + 1)
        runs: list[tuple[int, int]] = []
        start: int | None = None
        for seq in range(first, min(high, last_leaving) + 1):
            if bits >> (high - seq) & 1:
                if start is not None:
                    runs.append((start, seq - 1))
                    start = None
            elif start is None:
                start = seq
        if last_leaving > high:  # skipped over entirely: never seen
            begin = max(high + 1, low)
            if start is not None:
                runs.append((start, last_leaving))
            elif begin <= last_leaving:
                runs.append((begin, last_leaving))
        elif start is not None:
            runs.append((start, min(high, last_leaving)))
        return runs

    def contiguous(self) -> int | None:
        """The highest sequence ``s`` with every one in ``[low, s]`` within the window seen
        (what a resume asks to continue after), None before any."""
        high, low = self.high, self.low
        if high is None or low is None:
            return None
        bottom = max(low, high - self.width + 1)
        for seq in range(bottom, high + 1):
            if not self.bits >> (high - seq) & 1:
                return seq - 1
        return high

    def missing(self) -> list[int]:
        """Sequences in the window, at or above ``low``, not seen yet (for introspection)."""
        high, low = self.high, self.low
        if high is None or low is None:
            return []
        bottom = max(low, high - self.width + 1)
        return [s for s in range(bottom, high) if not self.bits >> (high - s) & 1]


class SequenceWindows:
    """A :class:`SequenceWindow` per (device, topic), at most ``max_pairs`` of them."""

    __slots__ = ("_pairs", "evicted", "max_pairs", "width")

    def __init__(self, width: int = DEFAULT_WIDTH, max_pairs: int = 10_000) -> None:
        if max_pairs < 1:
            raise ValueError("max_pairs must be >= 1")
        self.width = width
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], SequenceWindow] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def accept(self, device: str, topic: str, sequence: int) -> tuple[bool, list[tuple[int, int]]]:
        key = (device, topic)
        window = self._pairs.get(key)
        if window is None:
            window = self._pairs[key] = SequenceWindow(self.width)
            while len(self._pairs) > self.max_pairs:
                self._pairs.popitem(last=False)
                self.evicted += 1
        else:
            self._pairs.move_to_end(key)
        return window.accept(sequence)

    def resume_points(self, topic: str) -> dict[str, int]:
        """Per device seen on ``topic``: the sequence a resume continues after."""
        points: dict[str, int] = {}
        for (device, name), window in self._pairs.items():
            if name == topic:
                point = window.contiguous()
                if point is not None:
                    points[device] = point
        return points

    def window(self, device: str, topic: str) -> SequenceWindow | None:
        return self._pairs.get((device, topic))
