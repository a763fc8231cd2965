"""Scale: S subscribers on S/10 topics at a fixed total rate, broker by broker, same run.

Run as ``python benchmarks/bench_scale.py`` (S = 10, 100, 1,000; about 2-4 minutes on a
2-core machine) or ``python benchmarks/bench_scale.py --big`` (adds S = 10,000; several
minutes more: stock amqtt alone takes minutes to connect 10,000 clients, its CONNECT and
SUBSCRIBE handling being O(all filters)). Options:
``--sizes 10,100`` (instead of the defaults, e.g. ``--sizes 100`` for a quick run),
``--rate 300`` (messages/s published, in all),
``--seconds 5`` (publishing time), ``--brokers amqtt,public,mosquitto``, ``--qos 1``
(publish and subscribe at QoS 1; the subscribers acknowledge every message).

Each (broker, S) starts its broker in its own process on 127.0.0.1 and S subscribers, 10 per
topic ``scale/<k>`` (k < S/10), QoS 0, clean session, no keepalive. The subscribers are
raw-socket asyncio MQTT 3.1.1 clients (an ``asyncio.Protocol`` each, no client library), in
``CLIENT_PROCS`` processes, at most ``CONNECT_CONCURRENCY`` CONNECTs in flight per process (a
connection refused, e.g. by a full listen backlog, is retried up to ``CONNECT_ATTEMPTS`` times
and the retries count in the connect time), so the clients are not the bottleneck. One
raw-socket publisher then sends ``rate`` 64-byte QoS 0 PUBLISHes a second for ``seconds``,
round-robin over the topics: the broker has to make 10 x ``rate`` deliveries a second whatever
S is. Reported per (broker, S):

* connect time: from the start signal until every subscriber has its CONNACK and SUBACK
  (all S clients start at once, at most ``CONNECT_CONCURRENCY`` CONNECTs in flight per client
  process; a client that has no SUBACK within ``READY_TIMEOUT_S`` counts as failed), and the
  broker's CPU time over the same span (on a shared machine the wall time also shows what
  other processes took);
* RSS per session: the broker process's resident memory after all subscribed, less before
  the first client, over S;
* broker CPU per delivery: CPU seconds (user + system, all threads, ``psutil`` or /proc,
  10 ms ticks) of the broker process from the first publish until the last receipt (or 3 s of
  silence), over the deliveries received;
* losses: expected deliveries (published x 10) less received.

Brokers:
  amqtt      stock amqtt 0.12.1 ``Broker``, one TCP listener and ``AnonymousAuthPlugin`` only
             (the configuration (a) of ``bench_paid_delivery.py``);
  public     BlendSM (``start_broker``, embedded chain, ``public_topics: true``), anonymous
             clients on public topics; ``limits.max_connections``, ``max_connections_per_ip``,
             ``connect_rate_per_ip`` and ``connect_burst_per_ip`` raised to S + 100 (all
             clients come from 127.0.0.1; the defaults, 10,000 / 1,000 / 50 per s / 1,000,
             would rightly refuse most of them);
  mosquitto  the Debian ``mosquitto`` binary when installed (skipped, and said so, when not);
  paid       BlendSM on paid topics: S members (TEST-ONLY keys ``scale-buyer-<i>``), each
             enrolled as a buyer with a channel open to the seller naming the operator, the S/10
             topics created on chain (price 1000 wei); set up before the broker starts on an
             anvil node in its own process (``--chain anvil``, the default; about 3
             transactions per member) or on the embedded EVM inside the broker process
             (``--chain embedded``). The subscribers are raw clients that connect with a
             CONNECT token, take their Quote and pay a voucher every 10 paid messages
             (``raw_clients.Payer``), credit 50 messages; the publisher is the seller's
             registered device, signing every envelope. Also printed: set-up time, vouchers,
             receipts, drops for credit and every other non-zero broker counter. RSS per
             session is less telling here: the set-up (chain view of S members and channels)
             grows the broker process before the baseline is read.

Every broker runs pinned to one CPU, the clients, the publisher and the chain node on the
other(s) (``broker_process.pin``).

The machine is usually shared: figures are indicative; ratios measured in one run travel
better than absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

# A sibling module (its folder is first on sys.path when run as a script): the same broker
# processes as bench_paid_delivery.py, so configuration "amqtt" is its (a).
from broker_process import (
    ask,
    connect_packet,
    free_port,
    pin,
    pinning,
    proc_cpu,
    publish_packet,
    quiet,
    rss_kb,
    run_child,
    serve,
    stock_main,
)
from raw_clients import Payer, RawPublisher, RawSubscriber, Tally

PER_TOPIC = 10
PRICE = 1_000  # wei per message on the paid topics
DEPOSIT = 10**18  # per channel: far more than a run can spend
CREDIT_MESSAGES = 50  # as bench_paid_delivery.py
PAY_EVERY = 10
OPERATOR_KEY_ENV = "BENCH_OPERATOR_KEY"  # paid on anvil: the broker reads its TEST-ONLY key here
PAYLOAD = b"x" * 64
CLIENT_PROCS = 4
CONNECT_CONCURRENCY = 50
CONNECT_ATTEMPTS = 10
IDLE_STOP_S = 3.0
START_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- broker processes
def _blendsm_config(data_dir: str, sessions: int, node: dict[str, Any] | None = None) -> Any:
    """BlendSM's config: connection caps and the per-address connect rate raised so every
    benchmark client fits (all of them come from 127.0.0.1). ``node``: on that JSON-RPC node
    (``endpoint``, ``deployment``, ``key_env``) instead of the embedded chain."""
    from blendsm.broker import parse_config

    cap = max(1_000, sessions + 100)
    chain: dict[str, Any] = {"endpoint": "embedded", "confirmations": 0, "poll_interval": 2.0}
    extra: dict[str, Any] = {}
    if node is not None:
        chain.update(endpoint=node["endpoint"], deployment=node["deployment"])
        extra["operator_key"] = {"env": node["key_env"]}
    return parse_config(
        {
            **extra,
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": chain,
            "payments": {
                "credit_messages": CREDIT_MESSAGES,
                "settlement": {"interval_seconds": 3600},  # no claims during the run
            },
            "limits": {
                "max_connections": cap,
                "max_connections_per_ip": cap,
                "connect_rate_per_ip": cap,
                "connect_burst_per_ip": cap,
            },
            "data_dir": data_dir,
            "public_topics": True,
            "log_level": "WARNING",
        }
    )


def _paid_stats(running: Any) -> dict[str, int]:
    """The meter's counters and every non-zero service counter (drops of any kind show)."""
    import dataclasses

    service = running.service
    counters = {f.name: getattr(service.stats, f.name) for f in dataclasses.fields(service.stats)}
    return {
        **{k: v for k, v in counters.items() if isinstance(v, int) and v},
        "metered": service.meter.delivered,
        "denied_no_credit": service.meter.denied_no_credit,
        "vouchers_accepted": service.stats.vouchers_accepted,
        "vouchers_refused": service.stats.vouchers_refused,
    }


def _blendsm_main(conn: Any, data_dir: str, sessions: int) -> None:
    """BlendSM on public topics: ``start_broker`` with the embedded chain."""
    quiet()
    from blendsm.broker import start_broker

    async def run() -> None:
        running = await start_broker(_blendsm_config(data_dir, sessions))
        conn.send(("ready", {"port": running.port}))
        await serve(conn, lambda: {}, running.stop)

    run_child(conn, run)


def _buyer(i: int) -> Any:
    from blendsm.contracts import test_account

    return test_account(f"scale-buyer-{i}")  # TEST-ONLY key, on a chain that holds no value


async def _build_market(w3: Any, sessions: int, n_topics: int) -> Any:
    """Deploy the suite on ``w3`` (accounts funded), enrol seller, operator and ``sessions``
    buyers, register the device, create the ``n_topics`` paid topics and open one channel per
    buyer (to the seller, naming the operator); the deployment. Buyers' transactions go in
    parallel (each account's Transactor keeps its own nonces; the oracle's approvals are
    pipelined by its one Transactor)."""
    from blendsm.contracts import Marketplace, Policy, Role, deploy_suite, test_account

    deployer, operator = test_account("scale-deployer"), test_account("scale-operator")
    seller, device = test_account("scale-seller"), test_account("scale-device")
    deployment = await deploy_suite(w3, deployer)
    oracle = Marketplace(w3, deployment, deployer)
    as_seller = Marketplace(w3, deployment, seller)
    buyers = [Marketplace(w3, deployment, _buyer(i)) for i in range(sessions)]

    async def chunked(calls: list[Any]) -> None:
        for at in range(0, len(calls), 200):
            await asyncio.gather(*calls[at : at + 200])

    for account, role in [(seller, Role.SELLER), (operator, Role.OPERATOR)]:
        await Marketplace(w3, deployment, account).registry.apply_for_role(role)
        await oracle.registry.approve(account.address)
    await chunked([b.registry.apply_for_role(Role.BUYER) for b in buyers])
    await chunked([oracle.registry.approve(_buyer(i).address) for i in range(sessions)])
    await as_seller.registry.add_device(device.address)
    await chunked(
        [
            as_seller.market.create_topic(f"scale/{k}", PRICE, None, Policy.OPEN)
            for k in range(n_topics)
        ]
    )
    await chunked(
        [b.channels.open(seller.address, operator.address, None, DEPOSIT) for b in buyers]
    )
    return deployment


def _paid_main(conn: Any, data_dir: str, sessions: int, url: str) -> None:
    """BlendSM on paid topics: build the market (on the anvil node at ``url``, or on the
    embedded chain in this process when ``url`` is empty), then start the broker on it."""
    quiet()
    from blendsm.broker import ChainConnection, start_broker
    from blendsm.contracts import EMBEDDED, connect, disconnect, new_embedded_chain, test_account

    async def run() -> None:
        t_setup = time.time()
        operator = test_account("scale-operator")
        named = [test_account(f"scale-{n}") for n in ("deployer", "operator", "seller", "device")]
        addresses = [a.address for a in named] + [_buyer(i).address for i in range(sessions)]
        n_topics = max(1, sessions // PER_TOPIC)
        if url:
            w3 = connect(url, request_timeout=60)
            try:
                for at in range(0, len(addresses), 200):
                    await asyncio.gather(
                        *(
                            w3.provider.make_request("anvil_setBalance", [a, hex(10**21)])
                            for a in addresses[at : at + 200]
                        )
                    )
                deployment = await _build_market(w3, sessions, n_topics)
            finally:
                await disconnect(w3)
            deployment_file = os.path.join(data_dir, "scale-deployment.json")
            deployment.save(deployment_file)
            os.environ[OPERATOR_KEY_ENV] = operator.key.hex()  # TEST-ONLY key, this process only
            node = {"endpoint": url, "deployment": deployment_file, "key_env": OPERATOR_KEY_ENV}
            running = await start_broker(_blendsm_config(data_dir, sessions, node))
        else:
            tester = new_embedded_chain(fund=addresses, amount=10**21)
            w3 = connect(EMBEDDED, ethereum_tester=tester)
            deployment = await _build_market(w3, sessions, n_topics)
            running = await start_broker(
                _blendsm_config(data_dir, sessions),
                chain=ChainConnection(w3, deployment, operator, tester, owned=False),
            )
        conn.send(
            (
                "ready",
                {
                    "port": running.port,
                    "chain_id": deployment.chain_id,
                    "channels": deployment.address("PaymentChannels"),
                    "operator": operator.address,
                    "registry": deployment.address("Registry"),
                    "setup_s": time.time() - t_setup,
                },
            )
        )
        await serve(conn, lambda: _paid_stats(running), running.stop)

    run_child(conn, run)


class _Broker:
    """One broker under test: a child process (amqtt, BlendSM) or mosquitto."""

    def __init__(self, kind: str, sessions: int, chain: str = "anvil") -> None:
        self.kind = kind
        self.folder = tempfile.mkdtemp(prefix="bench-scale-")
        self.conn: Any = None
        self.proc: Any = None
        self.anvil: Any = None
        self.info: dict[str, Any] = {}
        ctx = mp.get_context("spawn")
        if kind == "mosquitto":
            self.port = free_port()
            conf = os.path.join(self.folder, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(
                    f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                    "max_connections -1\npersistence false\nlog_type error\n"
                )
            self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL)
            self.pid = self.proc.pid
            pin("broker", self.pid)
            _wait_listening(self.port, 10.0)
            return
        parent, child = ctx.Pipe()
        target: Any
        args: tuple[Any, ...]
        if kind == "amqtt":
            target, args = stock_main, (child,)
        elif kind == "paid":
            url = ""
            if chain == "anvil":  # the chain in a process of its own, on the clients' CPU
                from blendsm.contracts import AnvilNode

                self.anvil = AnvilNode().start(timeout=30)
                url = self.anvil.url
            target, args = _paid_main, (child, self.folder, sessions, url)
        else:
            target, args = _blendsm_main, (child, self.folder, sessions)
        self.proc = ctx.Process(target=target, args=args, daemon=True)
        self.proc.start()
        self.conn = parent
        # paid: the market is set up first (about 3 transactions per member, ~0.15 s each)
        if not parent.poll(START_TIMEOUT_S + (sessions * 0.3 if kind == "paid" else 0)):
            self.stop()
            raise RuntimeError(f"{kind}: broker did not start in time")
        tag, info = parent.recv()
        if tag != "ready":
            self.stop()
            raise RuntimeError(f"{kind}: broker failed to start: {info}")
        self.port = int(info["port"])
        self.info = info
        self.pid = self.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return rss_kb(self.pid) * 1024

    def stop(self) -> None:
        try:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    ask(self.conn, "stop", 15)
            if self.kind == "mosquitto":
                self.proc.terminate()
                self.proc.wait(10)
            elif self.proc is not None:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.proc.kill()
        finally:
            if self.anvil is not None:
                self.anvil.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


def _wait_listening(port: int, within: float) -> None:
    end = time.time() + within
    while time.time() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# --------------------------------------------------------------------------- subscribers
def _clients_main(
    conn: Any,
    port: int,
    subs: list[tuple[str, str, int]],
    qos: int = 0,
    info: dict[str, Any] | None = None,
) -> None:
    """A client process: ``subs`` are (client id, topic, member index); with ``info`` (the
    paid broker's chain facts) each subscriber is paying member ``scale-buyer-<index>``."""
    quiet()
    asyncio.run(_clients(conn, port, subs, qos, info))


async def _clients(
    conn: Any, port: int, subs: list[tuple[str, str, int]], qos: int, info: dict[str, Any] | None
) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    transports: list[Any] = []

    def payer(index: int) -> Payer | None:
        if info is None:
            return None
        return Payer(
            _buyer(index).key, info["chain_id"], info["operator"], info["channels"], PAY_EVERY
        )

    # Members' keys set up (and the SDK imported) before the clock starts: not connect time.
    members = {i: payer(i) for _, _, i in subs}

    async def one(client_id: str, topic: str, index: int) -> None:
        async with gate:
            for attempt in range(CONNECT_ATTEMPTS):  # a full listen backlog refuses: retry
                ready: asyncio.Future[None] = loop.create_future()
                member = members[index]
                try:
                    transport, _ = await loop.create_connection(
                        lambda ready=ready, member=member: RawSubscriber(
                            client_id, topic, qos, ready, tally, member
                        ),
                        "127.0.0.1",
                        port,
                    )
                except OSError:
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                transports.append(transport)
                await asyncio.wait_for(ready, READY_TIMEOUT_S)
                return

    await loop.run_in_executor(None, conn.recv)  # "go"
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(c, t, i) for c, t, i in subs), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    conn.send(("connected", time.perf_counter() - t0, len(failed), repr(failed[:1])))
    while True:
        if await loop.run_in_executor(None, conn.poll, 0.2):
            cmd = conn.recv()
            if cmd == "count":
                conn.send(tally.received)
            elif cmd == "counters":
                conn.send(dict(tally.counters))
            elif cmd == "stop":
                break
    for transport in transports:
        transport.abort()


# --------------------------------------------------------------------------- one run
def _publish(port: int, topics: list[str], rate: int, seconds: float, qos: int = 0) -> int:
    """Publish ``rate`` messages a second for ``seconds``, 100 batches a second (at QoS 1 the
    broker's PUBACKs are left unread: the socket buffer holds them)."""
    packets = [publish_packet(t, PAYLOAD) for t in topics]

    def packet(n: int) -> bytes:  # QoS 1: a fresh packet id each (ids cycle below 65,536)
        if not qos:
            return packets[n % len(packets)]
        return publish_packet(topics[n % len(topics)], PAYLOAD, qos, 1 + n % 65_535)

    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"pub-{os.getpid()}-{time.monotonic_ns()}"))
    if sock.recv(4)[:1] != b"\x20":
        raise RuntimeError("publisher: no CONNACK")
    sent, start, tick = 0, time.perf_counter(), 0
    total = int(rate * seconds)
    while sent < total:
        tick += 1
        due = min(total, int(rate * tick / 100))
        sock.sendall(b"".join(packet(i) for i in range(sent, due)))
        sent = due
        time.sleep(max(0.0, start + tick / 100 - time.perf_counter()))
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    return sent


def _publish_signed(
    port: int, info: dict[str, Any], topics: list[str], rate: int, seconds: float
) -> tuple[int, RawPublisher]:
    """Paid topics: the seller's registered device (CONNECT token) publishes signed envelopes
    (64-byte payloads), ``rate`` a second in 100 batches a second, like ``_publish``. The
    device stays connected (the caller closes it once the subscribers have counted): a QoS 0
    PUBLISH still being handled when its publisher's DISCONNECT arrives can be lost without
    a counter (seen: 1-344 messages of 900 when the device disconnected right after its
    last publish; reported, not fixed here)."""
    from blendsm.contracts import test_account

    pub = RawPublisher(
        port,
        device_key=test_account("scale-device").key,  # TEST-ONLY key
        chain_id=info["chain_id"],
        broker=info["operator"],
        registry=info["registry"],
    )
    body = PAYLOAD[:-8]
    sent, start, tick = 0, time.perf_counter(), 0
    total = int(rate * seconds)
    try:
        while sent < total:
            tick += 1
            due = min(total, int(rate * tick / 100))
            for n in range(sent, due):
                pub.publish(topics[n % len(topics)], body)
            sent = due
            time.sleep(max(0.0, start + tick / 100 - time.perf_counter()))
    except BaseException:
        pub.close()
        raise
    return sent, pub


def run_one(
    kind: str, size: int, rate: int, seconds: float, qos: int = 0, chain: str = "anvil"
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    broker = _Broker(kind, size, chain)
    procs: list[tuple[Any, Any]] = []
    try:
        time.sleep(0.5)
        rss0 = broker.rss()
        topics = [f"scale/{k}" for k in range(max(1, size // PER_TOPIC))]
        subs = [(f"s{n}", topics[n // PER_TOPIC % len(topics)], n) for n in range(size)]
        info = broker.info if kind == "paid" else None
        n_procs = min(CLIENT_PROCS, size)
        for p in range(n_procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_clients_main,
                args=(child, broker.port, subs[p::n_procs], qos, info),
                daemon=True,
            )
            proc.start()
            procs.append((proc, parent))
        time.sleep(1.0)  # the client processes import and start their loops
        cpu_go = broker.cpu()
        for _, parent in procs:
            parent.send("go")
        connect_s, failed = 0.0, 0
        for _, parent in procs:
            if not parent.poll(CONNECT_TIMEOUT_S):
                raise RuntimeError("subscribers did not connect in time")
            _, took, bad, first = parent.recv()
            connect_s, failed = max(connect_s, took), failed + bad
            if bad:
                print(f"    {kind} S={size}: {bad} subscriber(s) failed, e.g. {first}", flush=True)
        connect_cpu = broker.cpu() - cpu_go
        time.sleep(1.0)
        rss1 = broker.rss()
        cpu0 = broker.cpu()
        device: RawPublisher | None = None
        if kind == "paid":
            published, device = _publish_signed(broker.port, broker.info, topics, rate, seconds)
        else:
            published = _publish(broker.port, topics, rate, seconds, qos)
        expected = published * PER_TOPIC
        got, last, last_change = 0, -1, time.time()
        while time.time() - last_change < IDLE_STOP_S and got < expected:
            time.sleep(0.1)
            got = 0
            for _, parent in procs:
                parent.send("count")
                got += parent.recv()
            if got != last:
                last, last_change = got, time.time()
        cpu = broker.cpu() - cpu0
        if device is not None:
            device.close()
        extra: dict[str, Any] = {}
        if kind == "paid":
            for _, parent in procs:
                parent.send("counters")
                for name, n in parent.recv().items():
                    extra[name] = extra.get(name, 0) + n
            extra.update(ask(broker.conn, "stats", 10))
            extra["setup_s"] = broker.info.get("setup_s", 0.0)
        return {
            **extra,
            "connect_s": connect_s,
            "connect_cpu_s": connect_cpu,
            "rss_per_session": (rss1 - rss0) / size,
            "cpu_us": cpu / max(got, 1) * 1e6,
            "received": got,
            "expected": expected,
            "lost": expected - got,
            "failed": failed,
        }
    finally:
        for _, parent in procs:
            with contextlib.suppress(Exception):
                parent.send("stop")
        for proc, _ in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        broker.stop()


_SHOWN = {  # printed in their own columns or words; every other non-zero counter follows
    "received",
    "expected",
    "lost",
    "failed",
    "vouchers_sent",
    "vouchers_accepted",
    "vouchers_refused",
    "receipts",
    "quotes",
    "denied_no_credit",
    "metered",
    "connects_accepted",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--big", action="store_true", help="add S = 10,000")
    parser.add_argument("--rate", type=int, default=300, help="messages/s published in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--brokers",
        default="amqtt,public,paid,mosquitto",
        help="any of amqtt (stock), public, paid (BlendSM members with channels), mosquitto",
    )
    parser.add_argument(
        "--chain",
        choices=("anvil", "embedded"),
        default="anvil",
        help="paid: the chain as an anvil node in its own process, or the embedded EVM inside"
        " the broker process",
    )
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1), help="publish and subscribe")
    args = parser.parse_args()
    pin("clients")  # the driver, its client processes and the chain node; brokers re-pin
    sizes = [int(s) for s in args.sizes.split(",")] + ([10_000] if args.big else [])
    kinds = args.brokers.split(",")
    if "mosquitto" in kinds and shutil.which("mosquitto") is None:
        print("mosquitto not installed: skipped (Debian: apt-get install mosquitto)")
        kinds.remove("mosquitto")
    print(
        f"S subscribers on S/{PER_TOPIC} topics, QoS {args.qos}, {len(PAYLOAD)} B, {args.rate} msg/s"
        f" published ({args.rate * PER_TOPIC} deliveries/s) for {args.seconds:.0f} s;"
        f" {CLIENT_PROCS} raw-socket client processes; paid: chain {args.chain}, credit"
        f" {CREDIT_MESSAGES}, pay_every {PAY_EVERY}\n  {pinning()}; load average {os.getloadavg()}",
        flush=True,
    )
    print(
        f"  {'broker':10s} {'S':>6s} {'connect s':>10s} {'(CPU s)':>8s} {'RSS/session':>12s}"
        f" {'CPU us/delivery':>16s} {'received':>10s} {'lost':>7s} {'no SUBACK':>9s}"
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    start = time.time()
    for size in sizes:
        for kind in kinds:
            try:
                r = run_one(kind, size, args.rate, args.seconds, args.qos, args.chain)
            except Exception as exc:
                print(f"  {kind:10s} {size:>6d} FAILED {exc!r}", flush=True)
                continue
            results[(kind, size)] = r
            print(
                f"  {kind:10s} {size:>6d} {r['connect_s']:>10.2f} {r['connect_cpu_s']:>8.2f}"
                f" {r['rss_per_session'] / 1024:>9.1f} KB {r['cpu_us']:>16.1f}"
                f" {r['received']:>10d} {r['lost']:>7d} {r['failed']:>9d}"
                + (
                    f"\n{'':18s} set-up {r['setup_s']:.1f} s; vouchers sent"
                    f" {r.get('vouchers_sent', 0)} / accepted {r['vouchers_accepted']} / refused"
                    f" {r['vouchers_refused']}, receipts {r.get('receipts', 0)}, quotes"
                    f" {r.get('quotes', 0)}, denied_no_credit {r['denied_no_credit']},"
                    f" metered {r['metered']}; other counters: "
                    + ", ".join(
                        f"{k} {v}"
                        for k, v in r.items()
                        if k not in _SHOWN and isinstance(v, int) and not isinstance(v, bool) and v
                    )
                    if kind == "paid"
                    else ""
                ),
                flush=True,
            )
    for kind in kinds:
        base = results.get((kind, sizes[0]))
        if base is None:
            continue
        ratios = ", ".join(
            f"S={s}: {results[(kind, s)]['cpu_us'] / base['cpu_us']:.2f}x"
            for s in sizes[1:]
            if (kind, s) in results
        )
        if ratios:
            print(f"  {kind}: CPU per delivery relative to S={sizes[0]}: {ratios}")
    for kind in kinds:
        if kind == "amqtt":
            continue
        ratios = ", ".join(
            f"S={s}: CPU {results[(kind, s)]['cpu_us'] / results[('amqtt', s)]['cpu_us']:.2f}x"
            f" connect {results[(kind, s)]['connect_s'] / results[('amqtt', s)]['connect_s']:.2f}x"
            for s in sizes
            if (kind, s) in results and ("amqtt", s) in results
        )
        if ratios:
            print(f"  {kind} relative to stock amqtt: {ratios}")
    print(f"load average {os.getloadavg()}; total {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
