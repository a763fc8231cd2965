"""Where a paid round's latency tail comes from: the anchorer's windows or the rest.

Reads the two files one round of ``bench_latency.py`` writes with ``BENCH_TIMELINE`` and
``BENCH_SLOW_DUMP`` (and ``BENCH_SLOW_MS``, say 0.25), and splits the samples by send time:
inside an anchor window (from 15 ms before the first slow ``Anchorer.run`` callback of a
root to 10 ms after its last; callbacks 0.3 s apart belong to two roots) or outside. Why: the round's p99 moves by a factor of two
with this machine's phase; the split shows whether a change to the anchorer moved the tail
it causes, which the whole-round p99 cannot.

Usage::

    BENCH_SLOW_MS=0.25 BENCH_SLOW_DUMP=/tmp/cb BENCH_TIMELINE=/tmp/tl \\
        python benchmarks/bench_latency.py --rounds 1 --configs c --rate 1000
    python benchmarks/latency_timeline.py /tmp/tl-c-*.txt --callbacks /tmp/cb-*.txt

(the newest file of each kind when several match).
"""

from __future__ import annotations

import argparse
from pathlib import Path

BEFORE_S = 0.015
AFTER_S = 0.010
GAP_S = 0.3  # Anchorer callbacks further apart belong to two roots


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] * 1e3 if values else float("nan")


def _describe(name: str, values: list[float]) -> str:
    values.sort()
    slow = sum(v > 0.002 for v in values)
    return (
        f"{name:<16} {len(values):7d} samples  p50 {_quantile(values, 0.5):6.2f} ms"
        f"  p99 {_quantile(values, 0.99):6.2f} ms  max {_quantile(values, 1.0):6.2f} ms"
        f"  over 2 ms: {slow}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", nargs="+", type=Path, help="BENCH_TIMELINE file(s)")
    parser.add_argument(
        "--callbacks", nargs="+", type=Path, required=True, help="BENCH_SLOW_DUMP file(s)"
    )
    args = parser.parse_args()
    timeline = max(args.timeline, key=lambda p: p.stat().st_mtime)  # the newest of each
    callbacks = max(args.callbacks, key=lambda p: p.stat().st_mtime)
    samples = [
        (float(sent), float(latency))
        for sent, latency in (line.split() for line in timeline.read_text().splitlines())
    ]
    starts = sorted(
        float(line.split(None, 1)[0])
        for line in callbacks.read_text().splitlines()
        if "Anchorer" in line
    )
    spans: list[tuple[float, float]] = []
    for at in starts:  # one window per root: its callbacks, apart from the next root's
        if spans and at - spans[-1][1] < GAP_S:
            spans[-1] = (spans[-1][0], at)
        else:
            spans.append((at, at))
    spans = [(low - BEFORE_S, high + AFTER_S) for low, high in spans]
    inside: list[float] = []
    outside: list[float] = []
    for sent, latency in samples:
        (inside if any(lo <= sent <= hi for lo, hi in spans) else outside).append(latency)
    length = sum(hi - lo for lo, hi in spans) / max(len(spans), 1) * 1e3
    print(f"{timeline.name}: {len(spans)} anchor windows, {length:.0f} ms long on average")
    print(_describe("all", [latency for _, latency in samples]))
    print(_describe("anchor windows", inside))
    print(_describe("outside", outside))


if __name__ == "__main__":
    main()
