"""The broker child process of the benchmarks that run a broker in a process of its own, and
the driver's side of it.

``bench_paid_delivery.py``, ``bench_scale.py``, ``bench_slow_consumer.py``,
``bench_voucher_intake.py`` and ``bench_gate.py`` compare BlendSM with stock amqtt or with
itself across runs, so they must start stock amqtt the same way, talk to the broker process over
the same pipe protocol and read its CPU and memory the same way; they share this module so that
a change to the method lands in all of them (it was copied between them before). Also here: the
few pieces their clients share (TCP_NODELAY for paho, raw MQTT packets encoded by amqtt's own
codec, a nearest-rank percentile). Imported as ``broker_process`` because a script's own folder
is first on ``sys.path`` (``python benchmarks/bench_scale.py``); spawned children start with
the parent's ``sys.path``, so they import it too.

The pipe protocol: the child sends ``("ready", info)`` (``info["port"]`` at least) once its
broker listens, or ``("error", repr(exc))`` if it failed; then :func:`serve` answers "cpu" (the
child's CPU seconds so far), "stats" (the broker's counters) and "stop" (``("stopped", None)``,
or the shutdown error in place of None).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "BROKER_CPUS",
    "CLIENT_CPUS",
    "ask",
    "connect_packet",
    "free_port",
    "nodelay",
    "own_cpu",
    "percentile",
    "pin",
    "pinning",
    "proc_cpu",
    "publish_packet",
    "quiet",
    "rss_kb",
    "run_child",
    "serve",
    "stock_main",
    "subscribe_packet",
]


# --------------------------------------------------------------------------- CPU pinning
_SPLIT_ENV = "BENCH_CPU_SPLIT"
"""Where the driver leaves its split for the processes it spawns (``"1;0"``: broker CPUs, then
client CPUs). A child computing its own split from its affinity would see only the clients'
CPUs once the driver has pinned itself, and put its broker on them too (which every spawned
broker did until 2026-12-04: the broker shared CPU 0 with its clients, CPU 1 sat idle)."""


def _split_cpus() -> tuple[set[int], set[int]]:
    """The broker's CPUs and the clients' CPUs: the last CPU this process may use for the
    broker under test, the others for everything else (clients, publisher, chain node).
    ``BENCH_PIN=0`` (or a single CPU) turns pinning off: both sets are then every CPU.
    Inherited from the driver when it set ``BENCH_CPU_SPLIT`` (see there)."""
    inherited = os.environ.get(_SPLIT_ENV)
    if inherited:
        broker, clients = (
            {int(c) for c in part.split(",") if c} for part in inherited.split(";", 1)
        )
        return broker, clients
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if os.environ.get("BENCH_PIN", "1") == "0" or len(cpus) < 2:
        split = set(cpus), set(cpus)
    else:
        split = {cpus[-1]}, set(cpus[:-1])
    os.environ[_SPLIT_ENV] = ";".join(",".join(map(str, sorted(s))) for s in split)
    return split


BROKER_CPUS, CLIENT_CPUS = _split_cpus()
"""Every broker under test (stock amqtt, BlendSM, mosquitto) runs on ``BROKER_CPUS`` and
every client process (and the driver, and a chain node) on ``CLIENT_CPUS``, so that a ratio
between two brokers measures the brokers rather than how the scheduler placed a broker next
to its own clients. Computed at import in the driver from its affinity, and handed to the
processes it spawns through ``BENCH_CPU_SPLIT``."""


def pin(role: str, pid: int = 0) -> None:
    """Pin process ``pid`` (0: this one) to the broker's CPUs (``role`` "broker") or the
    clients' (any other role); a no-op where affinity cannot be set."""
    cpus = BROKER_CPUS if role == "broker" else CLIENT_CPUS
    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def pinning() -> str:
    """One line for a benchmark's header: how brokers and clients were placed."""
    if BROKER_CPUS == CLIENT_CPUS:
        return f"not pinned (CPUs {sorted(BROKER_CPUS)} shared by broker and clients)"
    return (
        f"broker under test pinned to CPU {sorted(BROKER_CPUS)}, clients, publisher and chain"
        f" node to CPU {sorted(CLIENT_CPUS)} (taskset equivalent: sched_setaffinity)"
    )


# --------------------------------------------------------------------------- the child's side
def quiet(*, silent: bool = False) -> None:
    """No warnings and no log records below ERROR from this process. ``silent``: none at all,
    not even after a later ``quiet()`` lowers the bar to ERROR again (a root NullHandler keeps
    Python's last-resort handler from printing them): stock amqtt logs an ERROR per task it
    cancels at shutdown, thousands after a slow-consumer run."""
    warnings.simplefilter("ignore")
    if silent:
        logging.disable(logging.CRITICAL)
        logging.getLogger().addHandler(logging.NullHandler())
    else:
        logging.disable(logging.WARNING)


def own_cpu() -> float:
    """CPU seconds (user + system) of this process so far, all threads, microsecond resolution."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def threads_cpu() -> dict[str, float]:
    """CPU seconds so far of each live thread of this process, by thread name (Linux per-thread
    clocks, microsecond resolution): the event loop's share apart from the store threads'."""
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        with contextlib.suppress(OSError, AttributeError):
            clock = time.pthread_getcpuclockid(thread.ident)
            out[thread.name] = out.get(thread.name, 0.0) + time.clock_gettime(clock)
    return out


def threads_line(out: dict[str, Any], deliveries: int) -> str:
    """The round's per-thread broker CPU (``threads_cpu_s`` of the stats) as a printed line,
    in us per delivery, busiest first; empty when the broker did not report it."""
    spent = out.get("threads_cpu_s")
    if not spent:
        return ""
    parts = sorted(spent.items(), key=lambda item: -item[1])
    return "\n           broker threads, us/delivery: " + ", ".join(
        f"{name} {seconds / max(deliveries, 1) * 1e6:.1f}" for name, seconds in parts
    )


def run_child(conn: Connection, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run the broker process's coroutine, pinned to the broker's CPUs; a failure is
    reported to the driver at once."""
    pin("broker")
    try:
        asyncio.run(run())
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", repr(exc)))
        raise
    finally:
        # amqtt leaves client transports to the garbage collector; collect them while the
        # warning filters still hold, not at interpreter teardown (ResourceWarning noise).
        gc.collect()


class _LoopLag:
    """How late the broker's event loop runs a 1 ms timer, over the measured window: a stall
    (a long synchronous step: the embedded EVM executing a transaction, a big batch) delays
    every delivery behind it, so it shows in the subscribers' latency tail."""

    PERIOD = 0.001

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.PERIOD
            await asyncio.sleep(self.PERIOD)
            self.lags.append(loop.time() - due)

    def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        lags = sorted(self.lags)
        if not lags:
            return {}
        return {
            "lag_p99_ms": lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1e3,
            "lag_max_ms": lags[-1] * 1e3,
            "lag_over_10ms_s": sum(x for x in lags if x > 0.010),
        }


SLOW_DUMP = os.environ.get("BENCH_SLOW_DUMP", "")
"""A path prefix: each window's slow callbacks, with their start times, go to a file."""


class _SlowCallbacks:
    """``BENCH_SLOW_MS=N``: every event-loop callback of the broker process that ran N ms or
    longer over the measured window, grouped by what ran (a task's coroutine, or the
    callback's name), with their wall time and this thread's CPU time (a callback whose CPU
    is far below its wall time was descheduled: the machine, not the broker), so a latency
    tail can be traced to the loop iterations that caused it. Wraps ``asyncio.Handle._run``
    (two clock pairs per callback) in this process only, for the window only."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1e3
        self.found: list[tuple[float, float, str]] = []
        self.timed: list[tuple[float, float, float, str]] = []  # BENCH_SLOW_DUMP: + start
        self._orig: Any = None

    def start(self) -> None:
        from asyncio import events

        orig = self._orig = events.Handle._run
        threshold, found, timed = self.threshold, self.found, self.timed
        clock, cpu_clock = time.perf_counter, time.thread_time

        def _run(handle: Any) -> None:
            t, c = clock(), cpu_clock()
            orig(handle)
            took = clock() - t
            if took >= threshold and len(found) < 100_000:
                found.append((took, cpu_clock() - c, _describe(handle)))
                if SLOW_DUMP:
                    timed.append((time.time() - took, *found[-1]))

        events.Handle._run = _run  # type: ignore[method-assign]

    def stop(self) -> dict[str, Any]:
        from asyncio import events

        if self._orig is not None:
            events.Handle._run = self._orig  # type: ignore[method-assign]
            self._orig = None
        if SLOW_DUMP:  # start (s), wall and CPU (ms), what ran
            with open(f"{SLOW_DUMP}-{int(time.time())}.txt", "w") as out:
                out.writelines(
                    f"{at:.6f} {took * 1e3:.3f} {cpu * 1e3:.3f} {what}\n"
                    for at, took, cpu, what in self.timed
                )
            self.timed.clear()
        groups: dict[str, list[tuple[float, float]]] = {}
        for took, cpu, what in self.found:
            groups.setdefault(what, []).append((took, cpu))
        top = sorted(groups.items(), key=lambda kv: -sum(t for t, _ in kv[1]))[:8]
        return {
            "slow_callbacks": len(self.found),
            "slow_callbacks_s": sum(t for t, _, _ in self.found),
            "slow_callbacks_cpu_s": sum(c for _, c, _ in self.found),
            "slow_callbacks_top": [
                f"{what}: {len(ts)} x, max {max(t for t, _ in ts) * 1e3:.1f} ms"
                f" (CPU {max(c for _, c in ts) * 1e3:.1f}), sum {sum(t for t, _ in ts) * 1e3:.0f}"
                f" ms (CPU {sum(c for _, c in ts) * 1e3:.0f})"
                for what, ts in top
            ],
        }


def _describe(handle: Any) -> str:
    """What an event-loop callback runs: a task's coroutine, or the callback itself."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"
    return str(getattr(callback, "__qualname__", repr(callback)))


async def serve(
    conn: Connection,
    stats: Callable[[], dict[str, Any]],
    stop: Callable[[], Awaitable[Any]],
) -> None:
    """Answer the driver's commands until "stop": "cpu" -> process CPU seconds so far,
    "stats" -> the broker's counters (with the event-loop lag of the window between the first
    two "cpu" commands, and each thread's CPU seconds in it: ``threads_cpu_s``).
    ``BENCH_PROFILE=file``: cProfile of that window, written to ``file``; ``BENCH_SLOW_MS=N``:
    the loop callbacks of that window that ran N ms or longer (:class:`_SlowCallbacks`), in
    the stats."""
    quiet()  # again: eth_tester's backend set-up resets the warning filters
    loop = asyncio.get_running_loop()
    profile_to = os.environ.get("BENCH_PROFILE")  # cProfile of the measured window, to a file
    profiler: Any = None
    slow_ms = float(os.environ.get("BENCH_SLOW_MS", "0") or 0)  # callbacks this long, traced
    slow: _SlowCallbacks | None = None
    slow_stats: dict[str, Any] = {}
    lag: _LoopLag | None = None
    lag_stats: dict[str, Any] = {}
    threads0: dict[str, float] = {}
    while True:
        ready = await loop.run_in_executor(None, conn.poll, 60)
        if not ready:
            break  # the driver is gone
        cmd = conn.recv()
        if cmd == "cpu":
            if lag is None:
                lag = _LoopLag()
                lag.start()
                threads0 = threads_cpu()
                if slow_ms > 0:
                    slow = _SlowCallbacks(slow_ms)
                    slow.start()
            elif not lag_stats:
                lag_stats = lag.stop()
                lag_stats["threads_cpu_s"] = {
                    name: spent
                    for name, seconds in threads_cpu().items()
                    if (spent := seconds - threads0.get(name, 0.0)) >= 0.001
                }
                if slow is not None:
                    slow_stats = slow.stop()
            if profile_to and profiler is None:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            elif profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile_to)
                profile_to = None
            conn.send(own_cpu())
        elif cmd == "stats":
            conn.send({**stats(), **lag_stats, **slow_stats})
        elif cmd == "stop":
            break
    try:
        await asyncio.wait_for(stop(), 8)
    except Exception as exc:  # a slow shutdown must not hang the benchmark
        conn.send(("stopped", repr(exc)))
        return
    conn.send(("stopped", None))


def stock_main(conn: Connection, *, silent: bool = False) -> None:
    """The stock amqtt 0.12.1 ``Broker`` (a child process's target): one TCP listener on a free
    port of 127.0.0.1 and ``AnonymousAuthPlugin`` (allow_anonymous) only; amqtt refuses every
    CONNECT without an auth plugin, so this is "no plugins". ``silent``: see :func:`quiet`."""
    quiet(silent=silent)
    from amqtt.broker import Broker

    async def run() -> None:
        port = free_port()
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        conn.send(("ready", {"port": port}))
        await serve(conn, lambda: {}, broker.shutdown)

    run_child(conn, run)


# --------------------------------------------------------------------------- the driver's side
def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(conn: Connection, cmd: str, timeout: float = 10.0) -> Any:
    """Send ``cmd`` to the broker process and return its answer; RuntimeError after
    ``timeout`` seconds without one."""
    conn.send(cmd)
    if not conn.poll(timeout):
        raise RuntimeError(f"broker did not answer {cmd!r}")
    return conn.recv()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process so far (a broker, the anvil node), via
    psutil when installed, else /proc/<pid>/stat; clock-tick resolution (10 ms) either way."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (``/proc/<pid>/status`` VmRSS); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank); NaN if there are none."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------- clients
def nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    """A paho ``on_socket_open`` callback setting TCP_NODELAY: the SDK sets it and paho does
    not, and without it Nagle holds back small publishes (~40 ms)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# amqtt's packet codec: raw-socket clients need no MQTT library (nor encoder) of their own.
def connect_packet(
    client_id: str, keep_alive: int = 0, username: str | None = None, password: str | None = None
) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session; anonymous unless ``username`` (and ``password``, e.g.
    a BlendSM CONNECT token) are given; keepalive 0 is none."""
    from amqtt.mqtt.connect import ConnectPacket, ConnectPayload, ConnectVariableHeader

    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    header = ConnectVariableHeader(connect_flags=flags, keep_alive=keep_alive)
    payload = ConnectPayload(client_id, username=username, password=password)
    data: bytes = ConnectPacket(variable_header=header, payload=payload).to_bytes()
    return data


def subscribe_packet(filters: Sequence[tuple[str, int]], packet_id: int = 1) -> bytes:
    """A SUBSCRIBE of ``filters`` (topic filter, QoS) pairs."""
    from amqtt.mqtt.subscribe import SubscribePacket

    data: bytes = SubscribePacket.build(list(filters), packet_id).to_bytes()
    return data


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    """A PUBLISH, not retained; ``packet_id`` only at QoS 1 and 2."""
    from amqtt.mqtt.publish import PublishPacket

    pid = packet_id if qos else None
    data: bytes = PublishPacket.build(topic, payload, pid, False, qos, False).to_bytes()
    return data
