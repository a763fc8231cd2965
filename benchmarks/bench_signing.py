"""Edge signing throughput on one core: EnvelopeSigner (coincurve) vs eth_account.

Run as ``python benchmarks/bench_signing.py`` (about 15 s). Pins itself to one CPU where
the OS allows it, cycles through 256 distinct messages, reports the median of several timed
rounds, and prints the envelope overhead in bytes for 64 B and 1 KB payloads.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

from eth_account import Account
from eth_account.messages import encode_typed_data

from blendsm.device_sdk import (
    ENVELOPE_HEADER_SIZE,
    KECCAK_BACKEND,
    EnvelopeSigner,
    MessageDomain,
    decode_envelope,
    message_typed_data,
    verify_envelope,
)

POOL = 256
ROUNDS = 5
ROUND_SECONDS = 0.4
CHAIN_ID = 31337
REGISTRY = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
TOPIC = "market/acme/temp/device-17"
# TEST ONLY: anvil's publicly known first dev key; it guards nothing.
KEY = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


def measure(fn: Callable[[int], object]) -> float:
    """Median ops/s of ``fn(i)`` over ROUNDS rounds of ~ROUND_SECONDS each."""
    n = 1
    while True:
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
    ratio = f"{rate / base:6.2f}x" if base else ""
    print(f"  {label:<52} {rate:>10,.0f} ops/s {1e6 / rate:>8.1f} us  {ratio}")


def main() -> None:
    print(f"bench_signing: Python {sys.version.split()[0]}, {pin_one_core()}")
    print(f"  keccak backend: {KECCAK_BACKEND}")
    domain = MessageDomain(CHAIN_ID, REGISTRY)
    signer = EnvelopeSigner(KEY, domain)
    now = int(time.time() * 1000)
    payloads = [b"%064d" % i for i in range(POOL)]  # 64-byte readings
    typed = [
        message_typed_data(domain, TOPIC, signer.address, i + 1, now + i, payloads[i])
        for i in range(POOL)
    ]
    envelopes = [signer.sign(TOPIC, payloads[i], i + 1, now + i) for i in range(POOL)]
    wire = [e.encode() for e in envelopes]
    signatures = [e.signature for e in envelopes]
    # Same bytes signed both ways: the EIP-712 encodings agree.
    theirs = Account.sign_message(encode_typed_data(full_message=typed[0]), KEY)
    assert theirs.signature == signatures[0]

    print("\nsign one 64-byte message (EIP-712 Message struct)")
    base = measure(lambda i: Account.sign_message(encode_typed_data(full_message=typed[i]), KEY))
    ours = measure(lambda i: signer.sign(TOPIC, payloads[i], i + 1, now + i).encode())
    row("eth_account sign_message(encode_typed_data(...))", base)
    row("ours: EnvelopeSigner.sign(...).encode()", ours, base)
    print(f"  signing speed-up: {ours / base:.1f}x")

    print("\nverify one 64-byte message")
    vbase = measure(
        lambda i: Account.recover_message(
            encode_typed_data(full_message=typed[i]), signature=signatures[i]
        )
    )
    vours = measure(lambda i: verify_envelope(domain, TOPIC, decode_envelope(wire[i])))
    row("eth_account recover_message(encode_typed_data(...))", vbase)
    row("ours: verify_envelope(decode_envelope(wire))", vours, vbase)
    print(f"  verify speed-up: {vours / vbase:.1f}x")

    print("\nenvelope overhead (binary header, payload as is)")
    for size in (64, 1024):
        encoded = signer.sign(TOPIC, bytes(size), 1, now).encode()
        extra = len(encoded) - size
        assert extra == ENVELOPE_HEADER_SIZE
        print(
            f"  {size:>5} B payload -> {len(encoded):>5} B on the wire: +{extra} B ({extra / size:.1%})"
        )


if __name__ == "__main__":
    main()
