"""The cyclic garbage collector's thresholds in a broker process.

Why: every connected session is a long-lived graph of a few hundred objects, and CPython's
default thresholds (700, 10, 10) run a full collection, which visits every tracked object of
the process (the embedded chain and web3 included), each time the long-lived objects grew by
a quarter and ten younger collections ran. Connecting 5,000 clients ran 7 full collections:
2.1 s of the 4.1 s of CPU the broker spent (2 cores, tracemalloc off; the figures are in
docs/benchmarks.md). Raising the third threshold to :data:`FULL_COLLECTION_EVERY` runs one;
short-lived cycles are still collected by the young generations as before, only garbage that
survived two collections waits longer.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["FULL_COLLECTION_EVERY", "tune_collector"]

FULL_COLLECTION_EVERY: Final = 100
"""Younger (generation 1) collections between two full ones (CPython's default: 10)."""


def tune_collector() -> None:
    """Space full collections out (never closer than they already are): process-wide, so
    called once by :func:`~blendsm.broker.start_broker`, which runs the broker's process."""
    young, middle, full = gc.get_threshold()
    if young and full < FULL_COLLECTION_EVERY:
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
