"""The benchmarks' CPU split reaches the processes they spawn.

Why: every published broker figure rests on the broker under test running alone on its CPU.
Until 2026-12-04 a spawned broker process computed the split from its own affinity, which it
inherited from a driver already pinned to the clients' CPU, so it pinned itself next to its
clients and the broker's CPU sat idle (docs/benchmarks.md, "The benchmarks' pinning").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

_DRIVER = textwrap.dedent(
    """
    import multiprocessing as mp
    import os
    import sys

    sys.path.insert(0, sys.argv[1])
    import broker_process


    def child(conn):
        import broker_process as bp

        bp.pin("broker")
        conn.send((sorted(bp.BROKER_CPUS), sorted(os.sched_getaffinity(0))))


    if __name__ == "__main__":
        broker_process.pin("clients")  # as every benchmark's driver does first
        parent, end = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=child, args=(end,))
        proc.start()
        split, affinity = parent.recv()
        proc.join()
        print(sorted(broker_process.BROKER_CPUS), sorted(broker_process.CLIENT_CPUS))
        print(split, affinity)
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and at least 2 CPUs",
)
def test_a_spawned_broker_runs_on_the_drivers_broker_cpu(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    out = subprocess.run(
        [sys.executable, str(script), str(BENCHMARKS)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout.splitlines()
    driver_broker, driver_clients = out[0].split("] [")
    child_split, child_affinity = out[1].split("] [")
    assert driver_broker.strip("[]") != driver_clients.strip("[]")
    # The child sees the driver's split, and runs on the broker's CPU, not the clients'.
    assert child_split.strip("[]") == driver_broker.strip("[]")
    assert child_affinity.strip("[]") == driver_broker.strip("[]")
