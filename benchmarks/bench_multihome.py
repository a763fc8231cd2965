"""What a multi-homed device pays per extra broker (issue 14).

One :class:`MultiHomedPublisher` sends N signed QoS 1 messages to 1, 2 and 4 brokers; the
benchmark reports the device's own CPU per message (this process: signing, the outbox
inserts with their fsync, paho) and the wall time until every broker acknowledged every
message, with the ratio to one broker. The brokers are mosquitto when installed (Debian
package; a broker that costs little, so the figures are the device's), else stock amqtt in
child processes.

    python benchmarks/bench_multihome.py [messages] [--brokers 1,2,4]

Each broker is a separate process; on a 2-core machine they share the second core with
each other while the device runs on the first (the device process is pinned to one core).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from broker_process import ask, free_port, own_cpu, stock_main
from harness import CHAIN_ID, CONTRACT, KEY

from blendsm.device_sdk import BrokerEndpoint, MultiHomedPublisher

# TEST ONLY: fixed operator addresses the CONNECT tokens name; the brokers do not check them.
OPERATOR = "0x" + "22" * 20


class Broker:
    """mosquitto, or stock amqtt in a child process, on a free port of 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.conn: Any = None
        self.proc: Any = None
        if shutil.which("mosquitto"):
            self.kind = "mosquitto"
            self.port = free_port()
            conf = folder / f"mosquitto-{self.port}.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nlog_type error\n"
            )
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL)
            _wait_listening(self.port, 10.0)
            return
        self.kind = "stock amqtt"
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=stock_main, args=(child,), daemon=True)
        self.proc.start()
        self.conn = parent
        tag, info = parent.recv()
        if tag != "ready":
            raise RuntimeError(f"stock amqtt did not start: {info}")
        self.port = int(info["port"])

    def stop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                ask(self.conn, "stop", 15)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        else:
            self.proc.terminate()
            self.proc.wait(10)


def _wait_listening(port: int, within: float) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def run(count: int, messages: int, folder: Path) -> tuple[str, float, float]:
    """(broker kind, device CPU us per message, wall seconds until all acknowledged)."""
    brokers = [Broker(folder) for _ in range(count)]
    state = Path(tempfile.mkdtemp(dir=folder))
    try:
        endpoints = [BrokerEndpoint("127.0.0.1", b.port, OPERATOR, CHAIN_ID) for b in brokers]
        with MultiHomedPublisher(
            KEY, registry=CONTRACT, state_dir=state, endpoints=endpoints, max_inflight=100
        ) as pub:
            pub.connect(10)
            payload = bytes(64)
            cpu0, wall0 = own_cpu(), time.perf_counter()
            for _ in range(messages):
                pub.publish("bench/multihome", payload)
            pub.flush(120)
            cpu, wall = own_cpu() - cpu0, time.perf_counter() - wall0
        return brokers[0].kind, cpu / messages * 1e6, wall
    finally:
        for broker in brokers:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("messages", nargs="?", type=int, default=2000)
    parser.add_argument("--brokers", default="1,2,4")
    args = parser.parse_args()
    counts = [int(n) for n in args.brokers.split(",")]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(f"bench_multihome: Python {sys.version.split()[0]}, {args.messages} QoS 1 x 64 B")
    base: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            kind, us, wall = run(count, args.messages, Path(tmp))
            base = base if base is not None else us
            print(
                f"  {count} broker(s) ({kind}): device {us:7.1f} us CPU/message"
                f" ({us / base:4.2f}x one broker), {args.messages / wall:7.0f} messages/s"
                f" acknowledged by all"
            )


if __name__ == "__main__":
    main()
