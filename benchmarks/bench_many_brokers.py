"""Many brokers of one operator (issue 14): aggregate deliveries/s for 1, 2 and 4 brokers.

Each broker is a BlendSM broker process of its own (shared-nothing, as an operator runs one per
core or machine) with its own fixed load: one raw publisher -> 10 raw subscribers (a client
process per broker), 64-byte QoS 0 messages. The brokers run at the same time; reported per
broker count: the aggregate deliveries/s (every subscriber's data messages / the longest
broker's window), the broker CPU per delivery (each broker process's own CPU, every thread,
over its window: mean and range over the brokers), how many cores the brokers used together,
and what was lost.

    python benchmarks/bench_many_brokers.py [--kind b|c] [--mode rate|burst] [--brokers 1,2,4]
        [--rate 100] [--seconds 5] [--burst 1000]

``--kind b``: a public (non-market) topic, anonymous clients. ``--kind c``: a paid market
topic, each subscriber a paying member with its own channel (vouchers every
``bench_paid_delivery.PAY_EVERY_MESSAGES`` messages, credit ``CREDIT_MESSAGES``) and the
publisher a registered device signing every envelope. The in-process EVM cannot be shared between
processes, so each broker builds its own embedded chain with the same market (``bench_latency``'s
round, reused here): the channels are separate per broker, as they are today without lanes,
and nothing on a chain is shared (no shared node's CPU is in the figures).
``--mode rate``: each publisher sends ``--rate`` messages/s for ``--seconds`` (after a 1 s
warm-up, counted too); ``--mode burst``: each sends ``--burst`` messages back to back, at the
same moment, so the aggregate is what the brokers can deliver together at saturation.

Not pinned (``BENCH_PIN=0``): on a 2-core machine the N brokers, their N client processes and
the publishers (threads of this driver) share both cores, which bounds the aggregate; the
header says how many CPUs there are. Every wait has a deadline (broker start 60 s, clients
30 s, collection 40 s) and the run stops starting broker counts that would not fit
``--budget`` seconds (default 85), saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("BENCH_PIN", "0")  # before broker_process is imported, here and in children

import bench_latency as lat  # a sibling script: its broker + clients round, reused

EST_START_S = {"b": 6.0, "c": 14.0}
"""Seconds a broker round takes to start (on 2 cores; N start in parallel, ~N/2 times that)."""


def start(kind: str, count: int) -> list[Any]:
    """``count`` rounds (broker process, subscriber process, publisher), started together."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(lat._Round, kind, "embedded") for _ in range(count)]
        rounds, errors = [], []
        for f in futures:
            try:
                rounds.append(f.result(timeout=lat.START_TIMEOUT_S + 40))
            except Exception as exc:
                errors.append(repr(exc))
    if errors:
        for r in rounds:
            r.close()
        raise RuntimeError(f"{len(errors)} of {count} brokers did not start: {errors[0]}")
    return rounds


def measure(rounds: list[Any], mode: str, args: Any) -> dict[str, Any]:
    """Run every round's load at once; the aggregate figures."""
    with ThreadPoolExecutor(len(rounds)) as pool:
        if mode == "burst":
            futures = [pool.submit(r.burst, args.burst) for r in rounds]
        else:
            futures = [pool.submit(r.run, args.rate, args.seconds, 1.0) for r in rounds]
        results = [f.result(timeout=120) for f in futures]
    received = sum(r["received"] for r in results)
    expected = sum(r["expected"] for r in results)
    windows = [r["received"] / r["rate"] for r in results if r["rate"] > 0]
    window = max(windows) if windows else float("nan")
    cpus = [r["cpu_us"] for r in results]
    cpu_s = sum(r["cpu_us"] * r["received"] for r in results) / 1e6
    return {
        "brokers": len(rounds),
        "received": received,
        "lost": expected - received,
        "aggregate": received / window,
        "per_broker": [r["rate"] for r in results],
        "cpu_mean": sum(cpus) / len(cpus),
        "cpu_min": min(cpus),
        "cpu_max": max(cpus),
        "cores": cpu_s / window,
        "p99_ms": max(r["p99_ms"] for r in results),
        "denied_no_credit": sum(r.get("denied_no_credit", 0) for r in results),
        "broker_lag_ms": max(r.get("lag_max_ms", float("nan")) for r in results),
        "client_lag_ms": max(r.get("client_lag_max_ms", float("nan")) for r in results),
        "pub_late": sum(r["pub_late"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("b", "c"), default="b")
    parser.add_argument("--mode", choices=("rate", "burst"), default="rate")
    parser.add_argument("--brokers", default="1,2,4")
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s per broker")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=1000, help="messages per broker")
    parser.add_argument("--budget", type=float, default=85.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.brokers.split(",")]
    t0 = time.monotonic()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kind = {"b": "public topic", "c": "paid topic (own channels and chain per broker)"}[args.kind]
    load = (
        f"{args.rate:g} msg/s x {args.seconds:g} s (+1 s warm-up)"
        if args.mode == "rate"
        else f"a burst of {args.burst}"
    )
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"bench_many_brokers: Python {sys.version.split()[0]}, {cpus} CPUs (load average"
        f" {load_avg:.1f} at start), not pinned;"
        f" {kind}; per broker 1 publisher -> {lat.N_SUBSCRIBERS} subscribers, {load}, QoS 0 x 64 B"
    )
    print(
        "  brokers | deliveries/s aggregate (per broker) | broker CPU us/delivery mean"
        " (min-max) | broker cores used | lost | p99 ms | loop lag max ms broker/clients |"
        " late sends"
    )
    for count in counts:
        run_s = (args.seconds + 1.0 if args.mode == "rate" else 3.0) + 4.0
        estimate = EST_START_S[args.kind] * max(1.0, count / 2) + run_s + 3.0
        if time.monotonic() - t0 + estimate > args.budget:
            print(f"  {count}: skipped, would not fit the {args.budget:g} s budget")
            continue
        rounds = start(args.kind, count)
        try:
            m = measure(rounds, args.mode, args)
        finally:
            for r in rounds:
                r.close()
        per = ", ".join(f"{x:,.0f}" for x in m["per_broker"])
        credit = f", {m['denied_no_credit']} held back for credit" if m["denied_no_credit"] else ""
        print(
            f"  {count:7d} | {m['aggregate']:12,.0f} ({per}) | {m['cpu_mean']:6.1f}"
            f" ({m['cpu_min']:.1f}-{m['cpu_max']:.1f}) | {m['cores']:5.2f} |"
            f" {m['lost']}{credit} | {m['p99_ms']:.1f} | {m['broker_lag_ms']:.0f}/"
            f"{m['client_lag_ms']:.0f} | {m['pub_late']}"
        )
    print(f"  total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
