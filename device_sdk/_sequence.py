"""Per-topic message sequence numbers that survive crashes without ever repeating.

A subscriber dedupes and orders a device's messages by (device, topic, sequence), so a
sequence number must never be handed out twice, even after a power cut. Writing the counter
to disk on every message would cost an fsync per message; instead numbers are *reserved in
blocks*:

- the state file holds, per topic, a reservation ``R``: every number handed out so far is
  below ``R``;
- numbers are handed out from memory; when a topic's counter reaches its reservation, the
  new reservation ``counter + block`` is written first (temp file, fsync, atomic rename,
  directory fsync: :func:`blendsm.atomic_write_text`), and only then is the number
  handed out;
- a restart, clean or not, resumes every topic at its reservation. After a crash up to
  ``block - 1`` numbers are skipped, never reused; a clean :meth:`SequenceAllocator.close`
  writes the exact counters, so nothing is skipped.

Cost: one small atomic file write per ``block`` messages per topic; the common path is a
dict lookup under a lock.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Final

from blendsm import atomic_write_text
from blendsm.errors import ConfigError, StoreError

__all__ = ["FIRST_SEQUENCE", "SEQUENCE_BLOCK", "SequenceAllocator"]

FIRST_SEQUENCE: Final = 1
SEQUENCE_BLOCK: Final = 1024
_UINT64_MAX: Final = 2**64 - 1
_FORMAT: Final = 1


class SequenceAllocator:
    """Hands out increasing uint64 sequence numbers per topic for one device, persisted in
    the JSON file ``path`` (see the module docstring). Thread-safe."""

    def __init__(
        self, path: str | os.PathLike[str], device: str, *, block: int = SEQUENCE_BLOCK
    ) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ConfigError(f"sequence_block: must be a positive int, got {block!r}")
        self.path = Path(path)
        self.device = device
        self.block = block
        self._lock = threading.Lock()
        self._reserved = self._load()  # per topic: numbers below are used or skipped
        self._next: dict[str, int] = {}  # per topic used this run: the next number to give
        self._closed = False

    def _load(self) -> dict[str, int]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot read sequence state {self.path}: {exc}") from exc
        try:
            state = json.loads(text)
            if state.get("format") != _FORMAT:
                raise ValueError(f"unknown format {state.get('format')!r}")
            reserved = state["reserved"]
            if not isinstance(reserved, dict) or not all(
                isinstance(k, str) and type(v) is int and FIRST_SEQUENCE <= v <= _UINT64_MAX + 1
                for k, v in reserved.items()
            ):
                raise ValueError("bad reservations")
            device = state["device"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Never guess: restarting from a wrong counter would reuse sequence numbers.
            raise StoreError(f"sequence state {self.path} is corrupt: {exc}") from None
        if device != self.device:
            raise ConfigError(
                f"state_dir: sequence state {self.path} belongs to device {device},"
                f" not {self.device}"
            )
        return dict(reserved)

    def _write(self, state: dict[str, int]) -> None:
        text = json.dumps(
            {"format": _FORMAT, "device": self.device, "reserved": state},
            sort_keys=True,
            separators=(",", ":"),
        )
        atomic_write_text(self.path, text)

    def next(self, topic: str) -> int:
        """The next sequence number of ``topic`` (durably reserved before it is returned)."""
        with self._lock:
            if self._closed:
                raise StoreError("sequence allocator is closed")
            reserved = self._reserved.get(topic, FIRST_SEQUENCE)
            n = self._next.get(topic, reserved)
            if n > _UINT64_MAX:
                raise StoreError(f"sequence numbers of topic {topic!r} are exhausted")
            if n >= reserved:
                new = dict(self._reserved)
                new[topic] = min(n + self.block, _UINT64_MAX + 1)
                self._write(new)  # write-ahead: durable before n is handed out
                self._reserved = new
            self._next[topic] = n + 1
            return n

    def peek(self, topic: str) -> int:
        """The number :meth:`next` would return for ``topic`` (no reservation made)."""
        with self._lock:
            return self._next.get(topic, self._reserved.get(topic, FIRST_SEQUENCE))

    def close(self) -> None:
        """Persist the exact counters (a clean restart skips no number); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._next:
                exact = dict(self._reserved)
                exact.update(self._next)
                self._write(exact)
                self._reserved = exact
