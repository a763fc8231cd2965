"""Added latency of the paid path: p50/p99 end to end at a fixed rate, stock amqtt next to
BlendSM (public and paid), same clients, same run.

Run as ``python benchmarks/bench_latency.py [--rounds 3] [--seconds 5] [--warmup 1]
[--fraction 0.5] [--configs abc] [--chain anvil|embedded]`` (about 25 s per round of three
configurations), or through ``python benchmarks/bench_paid_delivery.py --latency``, which
calls it. Target (issue 11): the paid path adds at most 0.5 ms of p99 over stock amqtt at 50 %
of stock's saturation rate.

Method (why each piece: the previous method gave stock amqtt p99s of 219-719 ms between two
rounds at half its saturation, which measured the machine, not the broker):

* **Pinned.** The broker under test runs alone on one CPU, the clients, the publisher and the
  chain node on the other (``broker_process.pin``; on a 2-core machine CPU 1 and CPU 0), for
  every broker alike. Without it, the broker, 10 subscribers and a publisher fight for two
  cores and the scheduler's choices land in the tail.
* **Light, equal clients.** 10 raw-socket asyncio subscribers in one process
  (``raw_clients.RawSubscriber``: no paho thread per connection, no GIL hand-offs; a paying
  member in (c): CONNECT token, Quote, a voucher every ``pay_every`` messages, exactly the
  wire protocol of the SDK), so the clients cost the same for every broker.
* **A paced publisher** (``raw_clients.RawPublisher``): message k is built (and, in (c),
  signed as a registered device) ahead of time and sent at ``t0 + k / rate``; the scheduled
  time is the timestamp in its last 8 bytes, so signing is not latency and a late publisher
  shows (equally for all brokers). The subscriber stamps the receive time in
  ``data_received``, before anything else.
* **Warm-up excluded, enough samples.** Messages sent in the first ``warmup`` seconds (TCP
  slow start, first-use allocations, the first vouchers) are delivered but not sampled; the
  measured window (default 5 s at 50 % of stock's saturation) gives tens of thousands of
  samples, so the p99 rests on hundreds of them.
* **Saturation measured the same way**: a burst of ``--burst`` messages through stock amqtt with
  the same clients, deliveries / time from first publish to last receipt.
* **Rounds interleaved** (a, b, c, a, b, c, ...), and the added p99 computed per round (c - a of
  the same round) as well as from the medians, with stock's p99 range printed, so an unstable
  machine shows as such instead of as a broker figure.

Configurations: (a) stock amqtt 0.12.1 (one listener, AnonymousAuthPlugin); (b) BlendSM on a
public topic; (c) BlendSM on a paid topic, 10 members with channels (``--chain anvil``, the
default: the chain is an anvil node in its own process, so anchor transactions do not run on
the broker's event loop; ``--chain embedded``: the in-process EVM of the demo and tests);
(e) is (c) on the embedded chain whatever ``--chain`` says, to compare the two in one run.
``credit_messages`` 50 and a voucher every 25 messages (the SDK's default schedule: half the
credit) as in ``bench_paid_delivery.py`` (``BENCH_CREDIT``, ``BENCH_PAY_EVERY``).
``BENCH_STAGGER=1``: the paying subscribers pay out of phase (member j pays its first voucher
after ``pay_every - j`` messages) instead of all on the same message.
``--rate N``: publish N messages/s instead of a fraction of the saturation just measured
(stock's saturation moves between runs on a shared machine, and the rate with it), to compare
runs at one rate. ``BENCH_SLOW_MS=N``: each round also lists the broker's event-loop callbacks
of N ms or more, grouped by task, with their CPU time (``broker_process._SlowCallbacks``):
where a latency tail comes from, and whether it was broker work or the broker descheduled.
``BENCH_TIMELINE=PREFIX`` writes every sample (send time, latency) of a round to
``PREFIX-<config>-<time>.txt``, and ``BENCH_SLOW_DUMP=PREFIX`` (with ``BENCH_SLOW_MS``) every
slow callback with its start time to ``PREFIX-<time>.txt``; ``latency_timeline.py`` splits the
tail into the anchorer's windows and the rest. Each round also prints the broker's CPU per
delivery by thread (``broker_process.threads_line``): the event loop (``MainThread``) apart
from the voucher and leaf stores' threads (``blendsm-store_0``, ``blendsm-leaves_0``), which
share its pinned core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import bench_paid_delivery as paid
from broker_process import ask, percentile, pin, pinning, quiet, stock_main, threads_line
from raw_clients import Payer, RawPublisher, RawSubscriber, Tally

N_SUBSCRIBERS = 10
TOPIC = paid.TOPIC
BODY = b"x" * (64 - 8)  # 64-byte payloads: 56 bytes + the 8-byte send time
START_TIMEOUT_S = 60.0
IDLE_STOP_S = 2.0


# --------------------------------------------------------------------------- client process
def _write_timeline(path: str, samples: list[tuple[float, float]]) -> None:
    """``BENCH_TIMELINE``: one line per sample, send time and latency in seconds."""
    with open(path, "w") as out:
        out.writelines(f"{sent:.6f} {latency:.6f}\n" for sent, latency in samples)


def _clients_main(conn: Any, port: int, kind: str, info: dict[str, Any], n: int) -> None:
    quiet()
    pin("clients")
    asyncio.run(_clients(conn, port, kind, info, n))


async def _clients(conn: Any, port: int, kind: str, info: dict[str, Any], n: int) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally()
    transports: list[Any] = []
    lags: list[float] = []

    async def probe() -> None:  # how late this process's loop runs a 1 ms timer
        while True:
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            lags.append(loop.time() - due)

    prober = loop.create_task(probe())
    try:
        waits = []
        for j in range(n):
            payer = None
            if kind in ("c", "e"):
                from blendsm.contracts import test_account

                payer = Payer(
                    test_account(f"bench-buyer-{j}").key,  # TEST-ONLY key
                    info["chain_id"],
                    info["operator"],
                    info["channels"],
                    paid.PAY_EVERY_MESSAGES,
                    j if STAGGER else 0,
                )
            ready: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda ready=ready, payer=payer, j=j: RawSubscriber(
                    f"lat-{os.getpid()}-{j}", TOPIC, QOS, ready, tally, payer
                ),
                "127.0.0.1",
                port,
            )
            transports.append(transport)
            waits.append(ready)
        await asyncio.wait_for(asyncio.gather(*waits), 20)
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", repr(exc)))
        return
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "from":
            tally.sample_from = cmd[1]
            tally.received, tally.latencies = 0, []
            if TIMELINE:
                tally.timeline = []
            lags.clear()
        elif cmd[0] == "collect":
            expected, deadline = cmd[1], cmd[2]
            while tally.received < expected and time.time() < deadline:
                if tally.received and time.time() - tally.last > IDLE_STOP_S:
                    break
                await asyncio.sleep(0.01)
            tally.latencies.sort()
            if TIMELINE and tally.timeline is not None:
                _write_timeline(f"{TIMELINE}-{kind}-{int(time.time())}.txt", tally.timeline)
            lags.sort()
            counters = {
                **tally.counters,
                "client_lag_max_ms": lags[-1] * 1e3 if lags else float("nan"),
            }
            conn.send((tally.received, tally.last, tally.latencies, counters))
        elif cmd[0] == "stop":
            break
    prober.cancel()
    for transport in transports:
        transport.abort()


QOS = int(os.environ.get("BENCH_LAT_QOS", "0"))  # publish and subscribe QoS (--qos)
TIMELINE = os.environ.get("BENCH_TIMELINE", "")  # a path prefix: (sent, latency) per sample
STAGGER = os.environ.get("BENCH_STAGGER", "0") == "1"  # members pay out of phase
STALL_MS = 20.0  # a round whose broker or client loop ran this late once is marked


def _calm(out: dict[str, Any]) -> bool:
    """No loop stall over STALL_MS in the broker or the client process during the round."""
    return bool(
        out.get("lag_max_ms", 0.0) <= STALL_MS and out.get("client_lag_max_ms", 0.0) <= STALL_MS
    )


# --------------------------------------------------------------------------- one round
class _Round:
    """A broker process of ``kind`` with the 10 subscribers connected and a publisher."""

    def __init__(self, kind: str, chain: str) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.data_dir = tempfile.mkdtemp(prefix="bench-lat-")
        self.anvil: Any = None
        self.procs: list[Any] = []
        on_anvil = kind == "c" and chain == "anvil"
        if on_anvil:
            from blendsm.contracts import AnvilNode

            self.anvil = AnvilNode().start(timeout=30)
        parent, child = ctx.Pipe()
        self.conn = parent
        target: Any
        args: tuple[Any, ...]
        if kind == "a":
            target, args = stock_main, (child,)
        elif kind == "b":
            target, args = paid._public_main, (child, self.data_dir)
        elif on_anvil:
            target, args = (
                paid._anvil_market_main,
                (child, self.data_dir, N_SUBSCRIBERS, self.anvil.url),
            )
        else:
            target, args = paid._market_main, (child, self.data_dir, N_SUBSCRIBERS)
        broker = ctx.Process(target=target, args=args, daemon=True)
        broker.start()
        self.procs.append(broker)
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError(f"{kind}: broker did not start")
        tag, info = parent.recv()
        if tag != "ready":
            raise RuntimeError(f"{kind}: broker failed: {info}")
        self.port, self.info = int(info["port"]), info
        self.clients, cchild = ctx.Pipe()
        proc = ctx.Process(
            target=_clients_main,
            args=(cchild, self.port, kind, info, N_SUBSCRIBERS),
            daemon=True,
        )
        proc.start()
        self.procs.append(proc)
        if not self.clients.poll(30):
            raise RuntimeError(f"{kind}: subscribers did not connect")
        tag, err = self.clients.recv()
        if tag != "ready":
            raise RuntimeError(f"{kind}: subscribers failed: {err}")
        if kind in ("c", "e"):
            from blendsm.contracts import test_account

            self.pub = RawPublisher(
                self.port,
                device_key=test_account("bench-device").key,  # TEST-ONLY key
                chain_id=info["chain_id"],
                broker=info["operator"],
                registry=info["registry"],
                qos=QOS,
            )
        else:
            self.pub = RawPublisher(self.port, qos=QOS)

    def run(self, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
        """Publish at ``rate`` messages/s for ``warmup + seconds``; latencies are sampled from
        the messages sent after the warm-up, everything is counted."""
        time.sleep(0.3)
        t0 = time.time() + 0.05
        sample_from = t0 + warmup
        self.clients.send(("from", sample_from))
        cpu0 = ask(self.conn, "cpu")
        total = int(rate * (warmup + seconds))
        gap = 1.0 / rate
        for k in range(total):
            self.pub.publish(TOPIC, BODY, at=t0 + k * gap)
        return self._collect(cpu0, total, t0, time.time() - t0)

    def burst(self, messages: int) -> dict[str, Any]:
        """``messages`` back to back: the broker's saturation rate with these clients."""
        time.sleep(0.3)
        self.clients.send(("from", 0.0))
        packets = [self.pub.prepare(TOPIC, BODY) for _ in range(messages)]
        cpu0 = ask(self.conn, "cpu")
        t0 = time.time()
        for packet in packets:  # one send each, as a client library publishes
            self.pub.sock.sendall(packet)
        return self._collect(cpu0, messages, t0, time.time() - t0)

    def _collect(self, cpu0: float, messages: int, t0: float, publish_s: float) -> dict[str, Any]:
        expected = messages * N_SUBSCRIBERS
        self.clients.send(("collect", expected, time.time() + 30))
        if not self.clients.poll(40):
            raise RuntimeError("subscribers did not report")
        got, last, latencies, counters = self.clients.recv()
        cpu = ask(self.conn, "cpu") - cpu0
        stats = ask(self.conn, "stats")
        return {
            "received": got,
            "expected": expected,
            "rate": got / max(last - t0, 1e-9),
            "publish_s": publish_s,
            "cpu_us": cpu / max(got, 1) * 1e6,
            "samples": len(latencies),
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": (latencies[-1] if latencies else float("nan")) * 1e3,
            "pub_late": self.pub.late,
            "pub_build_us": self.pub.build_s / max(messages, 1) * 1e6,
            **counters,
            **stats,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pub.close()
        with contextlib.suppress(Exception):
            self.clients.send(("stop",))
        with contextlib.suppress(Exception):
            self.conn.send("stop")
            if self.conn.poll(10):
                self.conn.recv()
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        if self.anvil is not None:
            self.anvil.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def one(kind: str, chain: str, how: str, *args: Any) -> dict[str, Any]:
    r = _Round(kind, chain)
    try:
        return r.burst(*args) if how == "burst" else r.run(*args)
    finally:
        r.close()


LABELS = {
    "a": "stock amqtt",
    "b": "BlendSM public topic",
    "c": "BlendSM paid topic",
    "e": "BlendSM paid, embedded EVM",
}


def main(argv: list[str] | None = None) -> None:
    global QOS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="not sampled, per round")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s (0: --fraction)")
    parser.add_argument("--burst", type=int, default=5000, help="messages of the saturation run")
    parser.add_argument("--configs", default="abc")
    parser.add_argument("--chain", choices=("anvil", "embedded"), default="anvil")
    parser.add_argument(
        "--qos",
        type=int,
        choices=(0, 1),
        default=QOS,
        help="publish and subscribe QoS (1: a market message is delivered once its leaf is"
        " durable, and every delivery is acknowledged)",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="instead: a burst of --burst messages per configuration and round (saturation"
        " deliveries/s and broker CPU per delivery, ratios to stock)",
    )
    args = parser.parse_args(argv)
    QOS = args.qos
    os.environ["BENCH_LAT_QOS"] = str(QOS)  # the spawned client processes read it
    if args.throughput:
        throughput(args)
        return
    pin("clients")  # the driver (publisher) and every child it spawns, until they re-pin
    start = time.time()
    print(f"latency: 1 pub -> {N_SUBSCRIBERS} raw subs, QoS {QOS}, 64 B; {pinning()}", flush=True)
    print(f"  load average before: {os.getloadavg()}", flush=True)
    sat = one("a", args.chain, "burst", args.burst)
    rate = args.rate or args.fraction * sat["rate"] / N_SUBSCRIBERS
    print(
        f"  stock saturation {sat['rate']:.0f} deliveries/s ({sat['received']}/{sat['expected']}"
        f" received, broker {sat['cpu_us']:.1f} us/delivery); fixed rate {rate:.0f} messages/s"
        f" ({rate * N_SUBSCRIBERS / sat['rate']:.0%}), {rate * N_SUBSCRIBERS:.0f} deliveries/s; warm-up"
        f" {args.warmup:.0f} s, measured {args.seconds:.0f} s per round; paid topic on"
        f" {args.chain}",
        flush=True,
    )
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in args.configs}
    for r in range(args.rounds):
        for k in args.configs:
            try:
                out = one(k, args.chain, "run", rate, args.seconds, args.warmup)
            except Exception as exc:
                print(f"  round {r + 1} {k}: FAILED {exc!r}", flush=True)
                continue
            res[k].append(out)
            print(
                f"  round {r + 1} {k}: p50 {out['p50_ms']:6.2f} ms  p99 {out['p99_ms']:7.2f} ms"
                f"  max {out['max_ms']:7.1f} ms  ({out['samples']} samples)"
                f"  {out['received']}/{out['expected']} received"
                f"  broker {out['cpu_us']:5.1f} us/delivery"
                f"\n           broker loop lag p99 {out.get('lag_p99_ms', float('nan')):.1f} ms"
                f" max {out.get('lag_max_ms', float('nan')):.1f} ms;"
                f" client loop lag max {out['client_lag_max_ms']:.1f} ms; publisher: build"
                f" {out['pub_build_us']:.0f} us/message, {out['pub_late']} sends > 1 ms late"
                + (
                    f"  vouchers {out.get('vouchers_sent', 0)}, receipts"
                    f" {out.get('receipts', 0)}, denied_no_credit {out['denied_no_credit']},"
                    f" refused {out['vouchers_refused']}, held for credit"
                    f" {out.get('deliveries_held_for_credit', 0)}"
                    if "denied_no_credit" in out
                    else ""
                )
                + (
                    f"; {out['commits']} voucher commits, p50 {out['commit_p50_ms']:.1f} /"
                    f" p90 {out['commit_p90_ms']:.1f} / max {out['commit_max_ms']:.1f} ms"
                    if "commits" in out
                    else ""
                )
                + threads_line(out, out["received"])
                + (
                    f"\n           broker callbacks >= BENCH_SLOW_MS: {out['slow_callbacks']},"
                    f" {out['slow_callbacks_s'] * 1e3:.0f} ms in all"
                    f" (CPU {out['slow_callbacks_cpu_s'] * 1e3:.0f}); "
                    + "; ".join(out["slow_callbacks_top"])
                    if "slow_callbacks" in out
                    else ""
                ),
                flush=True,
            )
    print("median over rounds (range):")
    for k, rows in res.items():
        if not rows:
            continue
        calm = [x for x in rows if _calm(x)]
        if len(calm) < len(rows):
            print(
                f"  {k}: {len(rows) - len(calm)} of {len(rows)} round(s) had a loop stall over"
                f" {STALL_MS:.0f} ms (broker or clients: the machine, not this broker's queue);"
                " p99 of the other rounds: "
                + (", ".join(f"{x['p99_ms']:.2f} ms" for x in calm) or "none")
            )
        p50 = statistics.median(x["p50_ms"] for x in rows)
        p99s = [x["p99_ms"] for x in rows]
        line = (
            f"  {k} {LABELS[k]:28s} p50 {p50:6.2f} ms  p99 {statistics.median(p99s):7.2f} ms"
            f" ({min(p99s):.2f}-{max(p99s):.2f})"
        )
        if k != "a" and res.get("a"):
            paired = [x["p99_ms"] - y["p99_ms"] for x, y in zip(rows, res["a"], strict=False)]
            line += (
                f"  added p99 over a: {statistics.median(p99s) - statistics.median(x['p99_ms'] for x in res['a']):+.2f} ms"
                f" (per round {', '.join(f'{d:+.2f}' for d in paired)})"
            )
        print(line)
    print(f"  load average after: {os.getloadavg()}; total {time.time() - start:.0f} s")


def throughput(args: Any) -> None:
    """Saturation with these clients: a burst per configuration, rounds interleaved."""
    pin("clients")
    start = time.time()
    print(
        f"throughput: 1 pub -> {N_SUBSCRIBERS} raw subs, QoS {QOS}, 64 B, bursts of {args.burst}"
        f" messages; paid topic on {args.chain}; {pinning()}; load average {os.getloadavg()}",
        flush=True,
    )
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in args.configs}
    for r in range(args.rounds):
        for k in args.configs:
            try:
                out = one(k, args.chain, "burst", args.burst)
            except Exception as exc:
                print(f"  round {r + 1} {k}: FAILED {exc!r}", flush=True)
                continue
            res[k].append(out)
            print(
                f"  round {r + 1} {k}: {out['rate']:7.0f} deliveries/s  broker"
                f" {out['cpu_us']:5.1f} us/delivery  {out['received']}/{out['expected']} received"
                + (
                    f"  vouchers {out.get('vouchers_sent', 0)} sent / {out['vouchers_accepted']}"
                    f" accepted / {out['vouchers_refused']} refused, denied_no_credit"
                    f" {out['denied_no_credit']}, metered {out['metered']}"
                    if "denied_no_credit" in out
                    else ""
                )
                + (
                    f"; {out['commits']} voucher commits, p50 {out['commit_p50_ms']:.1f} /"
                    f" p90 {out['commit_p90_ms']:.1f} / max {out['commit_max_ms']:.1f} ms"
                    if "commits" in out
                    else ""
                )
                + threads_line(out, out["received"]),
                flush=True,
            )
    print("median over rounds:")
    base = {
        key: statistics.median(x[key] for x in res["a"]) if res.get("a") else float("nan")
        for key in ("rate", "cpu_us")
    }
    for k, rows in res.items():
        if not rows:
            continue
        rate = statistics.median(x["rate"] for x in rows)
        cpu = statistics.median(x["cpu_us"] for x in rows)
        rates = [x["rate"] for x in rows]
        print(
            f"  {k} {LABELS[k]:28s} {rate:7.0f} deliveries/s ({min(rates):.0f}-{max(rates):.0f})"
            f"  broker {cpu:5.1f} us/delivery  rate {k}/a {rate / base['rate']:4.2f}"
            f"  broker-bound {k}/a {base['cpu_us'] / cpu:4.2f}"
        )
    print(f"  load average after: {os.getloadavg()}; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
