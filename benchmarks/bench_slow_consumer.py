"""Slow consumer and filter flood: honest subscribers' latency and broker memory, BlendSM next to
stock amqtt, same clients, same run.

Run as ``python benchmarks/bench_slow_consumer.py [seconds]`` (default 20 s of publishing per
run; six runs, about 3.5 minutes on a 2-core machine; ``--rate``, ``--payload``, ``--brokers``,
``--scenarios`` to vary it).

Each run starts a broker in its own process on 127.0.0.1, connects ``N_HONEST`` (10) plain paho
subscribers to ``bench/t`` at QoS 0 (in one subscriber process), then one publisher in the
driver sends ``rate`` (400) messages/s of ``payload`` (2048) bytes, QoS 0, for ``seconds``; the
publish time travels in the payload, so each honest subscriber measures end-to-end latency.
Scenarios:

  u  undisturbed: only the honest subscribers.
  s  slow consumer: before the publisher starts, one more client (a raw socket with a 4 KiB
     receive buffer) subscribes to ``bench/t`` and never reads again. It is sent the same
     rate x payload as each honest subscriber (0.8 MB/s by default) until the broker stops it.
  f  filter flood: before the publisher starts, one more (anonymous) client sends SUBSCRIBEs for
     10,000 distinct wildcard filters that do not match ``bench/t`` (``flood/<i>/+/#``), 100
     per packet, and reads its SUBACKs. Stock amqtt grants all; BlendSM grants the
     ``limits.max_filters_per_session`` default (100; a member's sessions together get at
     most ``max_filters_per_identity``, 1000) and refuses the rest. It stays connected.

Brokers:
  amqtt    stock amqtt 0.12.1 ``Broker``: one TCP listener, ``AnonymousAuthPlugin`` only.
  blendsm  ``start_broker`` with the embedded chain, public_topics true, every ``sessions`` and
           ``limits`` default: ``max_outgoing_bytes`` 1 MiB, ``max_outgoing_messages`` 10,000,
           ``slow_consumer_seconds`` 10.

Reported per run: honest deliveries received / expected, p50 and p99 latency (all honest
deliveries), the broker process's RSS (``/proc/<pid>/status`` VmRSS) just before the
disturbance, its peak sampled every 100 ms during the run and at the end; for BlendSM its
backpressure counters. Then, per broker, the ratios of (s) and (f) to (u): the target is p99
within 2x of the undisturbed run and a bounded RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any

from broker_process import (
    connect_packet,
    nodelay,
    percentile,
    quiet,
    rss_kb,
    run_child,
    serve,
    stock_main,
    subscribe_packet,
)

N_HONEST = 10
TOPIC = "bench/t"
FLOOD_FILTERS = 10_000
FILTERS_PER_PACKET = 100
START_TIMEOUT_S = 40.0


# --------------------------------------------------------------------------- broker processes
def _blendsm_main(conn: Any, data_dir: str) -> None:
    quiet(silent=True)
    from blendsm.broker import parse_config, start_broker

    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 2.0},
            "payments": {"settlement": {"interval_seconds": 3600}},
            "data_dir": data_dir,
            "public_topics": True,
            "log_level": "WARNING",
        }
    )

    async def run() -> None:
        running = await start_broker(config)
        stats = running.service.stats

        def counters() -> dict[str, int]:
            return {
                "paused": stats.slow_consumers_paused,
                "disconnected": stats.slow_consumers_disconnected,
                "dropped": stats.deliveries_dropped_slow_consumer,
                "filters_refused": stats.subscriptions_refused_at_limit,
            }

        conn.send(("ready", {"port": running.port}))
        await serve(conn, counters, running.stop)

    run_child(conn, run)


# --------------------------------------------------------------------------- honest subscribers
def _honest_main(port: int, ready: Any, control: Any, results: Any) -> None:
    """N_HONEST paho subscribers; send ("ready",) once subscribed, then on "stop" the latencies
    (seconds) of every delivery."""
    quiet(silent=True)
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    latencies: list[float] = []
    lock = threading.Lock()
    subscribed = threading.Semaphore(0)
    clients = []

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        now = time.time()
        sent = struct.unpack("!d", m.payload[:8])[0]
        with lock:
            latencies.append(now - sent)

    for i in range(N_HONEST):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"honest-{i}")
        c.on_message = on_message
        c.on_subscribe = lambda *_a: subscribed.release()
        c.on_socket_open = nodelay
        c.connect("127.0.0.1", port, 60)
        c.loop_start()
        c.subscribe(TOPIC, 0)
        clients.append(c)
    for _ in range(N_HONEST):
        if not subscribed.acquire(timeout=10):
            ready.send(("error", "SUBACK missing"))
            return
    ready.send(("ready",))
    control.recv()  # "stop"
    for c in clients:
        c.disconnect()
        c.loop_stop()
    with lock:
        results.send(latencies)


# --------------------------------------------------------------------------- disturbers
def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, exactly(length)


def _slow_consumer(port: int) -> socket.socket:
    """Subscribed to TOPIC, never reads again (a 4 KiB receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(connect_packet("slow-consumer", keep_alive=60))
    _read_packet(sock)
    sock.sendall(subscribe_packet([(TOPIC, 0)], 1))
    _read_packet(sock)
    return sock


def _filter_flood(port: int) -> tuple[socket.socket, int]:
    """FLOOD_FILTERS filters that never match TOPIC; returns the socket and how many were
    granted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(connect_packet("filter-flood", keep_alive=60))
    _read_packet(sock)
    granted = 0
    for p in range(FLOOD_FILTERS // FILTERS_PER_PACKET):
        filters = [f"flood/{p * FILTERS_PER_PACKET + i}/+/#" for i in range(FILTERS_PER_PACKET)]
        sock.sendall(subscribe_packet([(f, 0) for f in filters], p + 1))
        kind, body = _read_packet(sock)
        assert kind >> 4 == 9, kind
        granted += sum(1 for code in body[2:] if code != 0x80)

    def keep_reading() -> None:  # an honest reader otherwise (it gets nothing)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass

    threading.Thread(target=keep_reading, daemon=True).start()
    return sock, granted


# --------------------------------------------------------------------------- one run
def run_one(broker: str, scenario: str, seconds: float, rate: float, size: int) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    data_dir = tempfile.mkdtemp(prefix="bench-slow-")
    if broker == "amqtt":  # silent: thousands of ERROR lines at shutdown otherwise
        proc = ctx.Process(target=stock_main, args=(child,), kwargs={"silent": True}, daemon=True)
    else:
        proc = ctx.Process(target=_blendsm_main, args=(child, data_dir), daemon=True)
    proc.start()
    procs = [proc]
    disturber: socket.socket | None = None
    out: dict[str, Any] = {"broker": broker, "scenario": scenario}
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError("broker did not start")
        msg = parent.recv()
        if msg[0] != "ready":
            raise RuntimeError(f"broker failed: {msg}")
        port = msg[1]["port"]
        ready_r, ready_w = ctx.Pipe(duplex=False)
        ctrl_r, ctrl_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        subs = ctx.Process(target=_honest_main, args=(port, ready_w, ctrl_r, res_w))
        subs.daemon = True
        subs.start()
        procs.append(subs)
        if not ready_r.poll(20) or ready_r.recv()[0] != "ready":
            raise RuntimeError("honest subscribers did not subscribe")
        time.sleep(0.5)
        out["rss_before_kb"] = rss_kb(proc.pid)
        if scenario == "s":
            disturber = _slow_consumer(port)
        elif scenario == "f":
            disturber, out["filters_granted"] = _filter_flood(port)
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="publisher")
        publisher.on_socket_open = nodelay  # else Nagle holds back small publishes (~40 ms)
        publisher.connect("127.0.0.1", port, 60)
        publisher.loop_start()
        peak = 0
        padding = b"x" * (size - 8)
        interval = 1.0 / rate
        count = int(seconds * rate)
        start = time.perf_counter()
        next_rss = 0.0
        for i in range(count):
            due = start + i * interval
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            publisher.publish(TOPIC, struct.pack("!d", time.time()) + padding, qos=0)
            if now >= next_rss:
                peak = max(peak, rss_kb(proc.pid))
                next_rss = now + 0.1
        time.sleep(2.0)  # the last deliveries arrive
        peak = max(peak, rss_kb(proc.pid))
        out["rss_peak_kb"] = peak
        out["rss_end_kb"] = rss_kb(proc.pid)
        publisher.disconnect()
        publisher.loop_stop()
        ctrl_w.send("stop")
        latencies = sorted(res_r.recv() if res_r.poll(20) else [])
        out["expected"] = count * N_HONEST
        out["received"] = len(latencies)
        out["p50_ms"] = percentile(latencies, 0.50) * 1000
        out["p99_ms"] = percentile(latencies, 0.99) * 1000
        parent.send("stats")
        if parent.poll(10):
            out["counters"] = parent.recv()
        parent.send("stop")
        parent.poll(15)
    finally:
        if disturber is not None:
            disturber.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Slow consumer and filter flood.")
    parser.add_argument("seconds", nargs="?", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=400.0, help="messages/s published")
    parser.add_argument("--payload", type=int, default=2048, help="payload bytes (>= 8)")
    parser.add_argument("--brokers", default="amqtt,blendsm")
    parser.add_argument("--scenarios", default="usf", help="u undisturbed, s slow, f flood")
    opts = parser.parse_args()
    brokers = opts.brokers.split(",")
    print(
        f"slow consumer / filter flood: {N_HONEST} honest QoS 0 subscribers, {opts.rate:.0f}"
        f" msg/s x {opts.payload} B for {opts.seconds:.0f} s; Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for broker in brokers:
        for scenario in opts.scenarios:
            try:
                r = run_one(broker, scenario, opts.seconds, opts.rate, opts.payload)
            except Exception as exc:
                print(f"  {broker:8s} {scenario}: FAILED {exc!r}", flush=True)
                continue
            results[(broker, scenario)] = r
            extra = ""
            if "filters_granted" in r:
                extra += f"  filters granted {r['filters_granted']}"
            if r.get("counters"):
                extra += f"  {r['counters']}"
            print(
                f"  {broker:8s} {scenario}: received {r['received']}/{r['expected']}"
                f"  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:8.2f} ms"
                f"  RSS before {r['rss_before_kb'] / 1024:6.1f} MB"
                f" peak {r['rss_peak_kb'] / 1024:6.1f} MB end {r['rss_end_kb'] / 1024:6.1f} MB"
                + extra,
                flush=True,
            )
    print("ratios to the undisturbed run of the same broker (p99; RSS peak - before):")
    for broker in brokers:
        base = results.get((broker, "u"))
        if base is None:
            continue
        for scenario in "sf":
            r = results.get((broker, scenario))
            if r is None:
                continue
            grown = (r["rss_peak_kb"] - r["rss_before_kb"]) / 1024
            base_grown = (base["rss_peak_kb"] - base["rss_before_kb"]) / 1024
            print(
                f"  {broker:8s} {scenario}/u: p99 {r['p99_ms'] / base['p99_ms']:6.2f}x"
                f"  p50 {r['p50_ms'] / base['p50_ms']:5.2f}x  RSS growth {grown:6.1f} MB"
                f" (undisturbed {base_grown:5.1f} MB)",
                flush=True,
            )
    if ("amqtt", "u") in results and ("blendsm", "u") in results:
        a, b = results[("amqtt", "u")], results[("blendsm", "u")]
        print(f"  blendsm/amqtt undisturbed p99: {b['p99_ms'] / a['p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
