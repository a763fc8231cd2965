"""The micro-benchmark harness of ``bench_voucher.py`` and ``bench_signing.py``.

Both compare our signing path with eth_account's on one core; they share this harness so that
their numbers are measured the same way (pinned CPU, calibrated loop, median of rounds) and a
change to the method lands in both. Imported as ``harness`` because a script's own folder is
first on ``sys.path`` (``python benchmarks/bench_voucher.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

from blendsm.device_sdk import KECCAK_BACKEND

__all__ = ["CHAIN_ID", "CONTRACT", "KEY", "POOL", "measure", "print_header", "row"]

POOL = 256
"""Distinct inputs cycled through, so no cache is accidentally warm."""
ROUNDS = 5
ROUND_SECONDS = 0.4

# The signing inputs both benchmarks use: anvil's chain id and first contract address.
CHAIN_ID = 31337
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
# TEST ONLY: anvil's publicly known first dev key; it guards nothing.
KEY = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")


def pin_one_core() -> str:
    """Pin the process to one CPU where the OS allows it; say what happened."""
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


def print_header(name: str) -> None:
    """Pin to one core and print what the numbers depend on (Python, CPU, keccak backend)."""
    print(f"{name}: Python {sys.version.split()[0]}, {pin_one_core()}")
    print(f"  keccak backend: {KECCAK_BACKEND}")


def measure(fn: Callable[[int], object]) -> float:
    """Median ops/s of ``fn(i)`` over ROUNDS rounds of ~ROUND_SECONDS each."""
    n = 1
    while True:  # calibrate the loop count
        start = time.perf_counter()
        for i in range(n):
            fn(i % POOL)
        elapsed = time.perf_counter() - start
        if elapsed > 0.05:
            break
        n *= 2
    n = max(1, int(n * ROUND_SECONDS / elapsed))
    rates = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(n):
            fn(i % POOL)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def row(label: str, rate: float, base: float | None = None) -> None:
    """One result line: ops/s, microseconds per op and, given ``base``, the ratio to it."""
    ratio = f"{rate / base:6.2f}x" if base else ""
    print(f"  {label:<52} {rate:>10,.0f} ops/s {1e6 / rate:>8.1f} us  {ratio}")
