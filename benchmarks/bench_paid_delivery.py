"""Paid delivery throughput: the BlendSM broker next to stock amqtt, same clients, same run.

Run as ``python benchmarks/bench_paid_delivery.py [messages] [rounds]`` (defaults 3000
messages, 3 rounds; about 110-120 s on a 2-core machine; every wait is clamped so the whole
run ends within about 210 s even if something hangs, and rounds that would not fit are
skipped and said so). The budget was 100 s (+ cleanup) before configuration (d) was added,
150 s with (d), and is now 200 s (+ cleanup) because (e) costs as much as (c).

Pinned: every broker process runs on one CPU and the driver, the subscriber processes and the
anvil node on the other(s) (``broker_process.pin``; ``BENCH_PIN=0`` turns it off), so the
ratios compare brokers, not how the scheduler placed them. On a 2-core machine the 10 paho /
SDK subscribers then share one core, so the measured rates here are bounded by the clients
(see the broker CPU per delivery, and ``bench_latency.py --throughput`` for the rate with raw
clients that cost little).

Each configuration starts its broker in its own process on 127.0.0.1, connects 10 subscribers
(two processes, five clients each) to ``bench/t`` at QoS 0, then one publisher in the driver
process sends ``messages`` 64-byte QoS 0 PUBLISHes as fast as it can. Reported per
configuration: deliveries/s (data messages received by all subscribers / time from the first
publish to the last receipt), messages dropped (published x 10 - received), broker CPU per
delivery (``resource.getrusage`` of the broker process, every thread included, from just
before the first publish to the last receipt), the subscribers' and publisher's CPU per
delivery the same way, and the ratios to (a); for (d) also the HTTP poller's answers/s and
failures, and the ratios d/c; for (e) also the anvil node's CPU per delivery (its own
process, read with psutil or /proc/<pid>/stat over the same window, 10 ms clock ticks) and
the ratios e/c.

Configurations:
  a  stock amqtt 0.12.1 ``Broker`` with a minimal config: one TCP listener and
     ``AnonymousAuthPlugin`` (allow_anonymous) only. amqtt refuses every CONNECT without an
     auth plugin, so this is "no plugins": no topic plugin, no event logger, no $SYS. Plain
     paho subscribers and publisher, anonymous.
  b  the BlendSM broker (``start_broker``: ``BlendBroker`` + ``MarketplacePlugin``, the
     embedded chain, public_topics true) on a public (non-market) topic, with the same plain
     paho clients as (a), anonymous: the cost of our CONNECT identity, access decisions and
     delivery gate on free traffic.
  c  the BlendSM broker on a paid market topic, its chain chosen by ``--chain``: ``anvil``
     (default: an anvil node in its own process, started by the driver, the broker on
     JSON-RPC exactly as (e) was before, so anchor transactions and chain polling run outside
     the broker process) or ``embedded`` (the in-process EVM) (``bench/t`` created on chain by the seller,
     price 1000 wei per message): 10 SDK ``Subscriber``s, each its own funded TEST-ONLY key and
     an open channel to the seller naming the broker operator, paying a voucher every
     ``PAY_EVERY`` messages as they arrive (default: the SDK's own schedule); the broker lets
     a channel owe ``CREDIT_MESSAGES`` messages. The publisher is the SDK ``Publisher`` of a registered
     device of the seller. Every voucher is verified (ECDSA recover), stored durably
     (SQLite WAL, synchronous=FULL, group commit) and answered with a Receipt notice.
  d  exactly (c), broker and clients alike, but with the broker's HTTP API and dashboard on
     (``http: {host: 127.0.0.1, port: 0}``; it runs on the broker's event loop) and, from just
     before the first publish until the broker's CPU is read after the last receipt, a poller
     thread in the driver (blocking ``http.client`` on one keep-alive connection, so no event
     loop shared with the publisher) GETting /api/status, /api/topics, /api/channels and
     /api/anchors every 100 ms: 10x the dashboard's 1 s poll. Its thread CPU is left out of
     the publisher's CPU figure. The cost of the API is (d) against (c).
  e  exactly (c) on the embedded EVM inside the broker process, whatever ``--chain`` says
     (before, (e) was (c) on anvil and (c) was on the embedded EVM; the flag swapped the
     default). On anvil (``--chain anvil``) the driver starts anvil
     (``AnvilNode``, automine, from ``npm ci``'s node_modules) before the round; the broker
     process funds the same TEST-ONLY accounts with ``anvil_setBalance``, deploys and enrols
     exactly as (c) over JSON-RPC, writes the deployment file and starts the broker from its
     config alone: ``chain.endpoint`` = the anvil URL, ``chain.deployment`` = that file,
     ``confirmations: 0``, the same poll interval, settlement and anchoring settings as (c),
     the operator key from the environment variable ``BENCH_OPERATOR_KEY``. Anchor
     transactions and chain polling then execute in anvil, whose CPU is reported separately;
     the broker's CPU keeps only its own side (signing, JSON-RPC calls). The cost of the
     embedded EVM is (e) against (c) on anvil.

``--latency`` runs ``bench_latency.py`` (raw paced clients; see there). Its rounds also
report the broker's event-loop lag over the measured window (how
late a 1 ms timer in the broker process fires: p99, maximum, and the seconds spent in lags
over 10 ms), to tell a stall inside the broker from queueing elsewhere. Each round also prints
the broker's CPU per delivery by thread (the event loop apart from the stores' threads).

Environment (for profiling and diagnosis, not for published figures unless said so):
``BENCH_PROFILE=file`` runs cProfile in each BlendSM broker process over the measured window
(first to last "cpu" command) and writes it to ``file`` (the last configuration wins; run one
configuration at a time); ``BENCH_CREDIT`` and ``BENCH_PAY_EVERY`` override the credit (50) and
the subscribers' ``pay_every`` (default: the SDK's default schedule, a voucher once half the
quoted credit is unpaid, i.e. every 25 messages at credit 50; it was ``pay_every`` 10 before
2026-12-04); ``BENCH_ANCHOR_LEAVES`` and ``BENCH_ANCHOR_ROOTS`` the anchoring (see ``ANCHORING``).

The in-process EVM cannot be shared across processes, so the broker process of (c) and (d)
builds its own chain (that of (e) does the same on anvil): deploys the suite, enrols seller,
device and buyers (the deployer is the oracle), creates the topic and opens the 10 channels
before starting the broker; the SDK Subscriber learns its channel from the broker's Quote.
All keys are TEST-ONLY (``test_account``), on chains that hold no value.

Subscribers count only data messages on ``bench/t`` (never control notices) and stop once they
have everything, or 2 s after the last message arrived and the publisher is done (QoS 0
messages the gate refused for lack of credit never come; at QoS 1 "done" is its last PUBACK),
or at the end of the measured window, ``RUN_DEADLINE_S`` from the first publish (a round the
window cut is marked ``CUT``; before, the window ran from the subscribers' start, and a slow
start on a loaded machine cut QoS 1 rounds mid-stream, which looked like a broker stall).
Every wait has a deadline and child processes are always terminated.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from typing import Any

# A sibling module (its folder is first on sys.path when run as a script): the broker child
# process and the driver's side of it, shared with the other broker benchmarks.
from broker_process import (
    ask,
    nodelay,
    own_cpu,
    percentile,
    pin,
    pinning,
    proc_cpu,
    quiet,
    run_child,
    serve,
    stock_main,
    threads_line,
)

N_SUBSCRIBERS = 10
SUB_PROCS = 2
# Variants, from the command line (``--qos``, ``--payload``) through the environment, so the
# spawned broker and subscriber processes see them too.
QOS = int(os.environ.get("BENCH_QOS", "0"))
PAYLOAD = b"x" * max(8, int(os.environ.get("BENCH_PAYLOAD", "64")))
LATENCY_SAMPLE = 20_000  # per subscriber process: end-to-end latencies kept (the first ones)
TOPIC = "bench/t"
PRICE = 1_000  # wei per message on the paid topic
DEPOSIT = 10**18  # per channel: far more than a run can spend
CREDIT_MESSAGES = int(
    os.environ.get("BENCH_CREDIT", "50")
)  # broker: unpaid messages a channel may owe before delivery pauses
PAY_EVERY: int | None = (
    int(os.environ["BENCH_PAY_EVERY"]) if os.environ.get("BENCH_PAY_EVERY") else None
)  # SDK Subscriber: None = the SDK's default schedule (a voucher per half the quoted credit)
PAY_EVERY_MESSAGES = PAY_EVERY or max(1, -(-CREDIT_MESSAGES // 2))
"""Paid messages per voucher: what raw paying clients (``bench_latency.py``) use to pay as the
SDK does (its default threshold is half the quoted credit, at least one message)."""
IDLE_STOP_S = 2.0  # a subscriber stops this long after its last message
RUN_DEADLINE_S = 20.0  # per configuration, from subscriber start
START_TIMEOUT_S = 40.0  # broker start-up (chain set-up included)
TOTAL_BUDGET_S = 200.0  # every wait is clamped to end by then; cleanup adds at most ~10 s
EST_RUN_S = {"a": 10.0, "b": 14.0, "c": 28.0, "d": 28.0, "e": 30.0}  # worst case, for the budget
ANCHORING: dict[str, Any] = {
    "anchoring": {
        key: int(os.environ[env])
        for key, env in (
            ("batch_max_leaves", "BENCH_ANCHOR_LEAVES"),
            ("max_roots_per_hour", "BENCH_ANCHOR_ROOTS"),
        )
        if os.environ.get(env)
    }
}
"""``BENCH_ANCHOR_LEAVES=N``: a root is due once N sold leaves are pending (default 1,000);
``BENCH_ANCHOR_ROOTS=R``: ``max_roots_per_hour``, so roots are paced 3600 / R seconds apart
(default 360: 10 s). Each root takes every pending sold leaf (up to 100,000). The roots of
before 2026-12-05 (at most 1,000 leaves each, one a second at 1,000 messages/s) are
``BENCH_ANCHOR_ROOTS=3600`` at that rate."""
CHAIN = os.environ.get("BENCH_CHAIN", "anvil")  # (c), (d): "anvil" (a node) or "embedded"
OPERATOR_KEY_ENV = "BENCH_OPERATOR_KEY"  # (e): the broker reads its TEST-ONLY key from here
POLL_PATHS = ("/api/status", "/api/topics", "/api/channels", "/api/anchors")
POLL_INTERVAL_S = 0.1  # (d): 10x the dashboard's 1 s poll


# --------------------------------------------------------------------------- broker process
def _blendsm_config(data_dir: str, http: bool = False, node: dict[str, Any] | None = None) -> Any:
    """The broker config of (b)-(e). ``node`` (e): ``{"endpoint": url, "deployment": path,
    "key_env": VAR}`` puts the broker on that JSON-RPC node instead of the embedded chain,
    with the same confirmations and poll interval."""
    from blendsm.broker import parse_config

    extra: dict[str, Any] = {"http": {"host": "127.0.0.1", "port": 0}} if http else {}
    chain: dict[str, Any] = {"endpoint": "embedded", "confirmations": 0, "poll_interval": 2.0}
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
            "data_dir": data_dir,
            **ANCHORING,
            "public_topics": True,
            "log_level": "WARNING",
        }
    )


def _blendsm_stats(running: Any) -> dict[str, int]:
    service = running.service
    return {
        "metered": service.meter.delivered,
        "denied_no_credit": service.meter.denied_no_credit,
        "vouchers_accepted": service.stats.vouchers_accepted,
        "vouchers_refused": service.stats.vouchers_refused,
        "payment_requests": service.stats.payment_requests,
        "quotes": service.stats.quotes,
        "inflight_dropped": service.stats.inflight_dropped,
        # Where deliveries that were neither metered nor refused for credit went:
        "deliveries_denied": service.stats.deliveries_denied,
        "view_misses_unhealthy": service.view.misses_unhealthy,
        **{
            name: getattr(service.stats, name)
            for name in _LOSS_COUNTERS
            if hasattr(service.stats, name)
        },
        **_stuck(running),
        **_commit_times(running),
    }


def _time_commits(running: Any) -> None:
    """Record how long each voucher batch's commit takes, from the loop's side (the worker
    thread's transaction with its fsync, and the wait for it): a voucher counts only once
    durable, so this is part of every voucher's round trip, which the credit must cover."""
    store = running.service.store
    if store is None:
        return
    inner = store.accept_many
    times: list[float] = []

    async def accept_many(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await inner(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t)

    store.accept_many = accept_many
    running.blendsm_commit_times = times


def _commit_times(running: Any) -> dict[str, float]:
    times = sorted(getattr(running, "blendsm_commit_times", []))
    if not times:
        return {}
    return {
        "commits": len(times),
        "commit_p50_ms": percentile(times, 0.5) * 1e3,
        "commit_p90_ms": percentile(times, 0.9) * 1e3,
        "commit_max_ms": times[-1] * 1e3,
    }


def _stuck(running: Any) -> dict[str, int]:
    """What is still inside the broker when a round ends: broadcasts not yet fanned out,
    deliveries on amqtt's path (tasks), held for credit, in flight (QoS 1/2 unacknowledged)."""
    broker = running.broker
    sessions = [s for s, _h in getattr(broker, "_sessions", {}).values()]
    return {
        "stuck_broadcasts": broker._broadcast_queue.qsize(),
        "stuck_tasked": sum(getattr(s, "blendsm_tasks", 0) for s in sessions),
        "stuck_held": sum(
            len(h.items) for s in sessions if (h := getattr(s, "blendsm_credit_hold", None))
        ),
        "stuck_inflight": sum(len(getattr(s, "inflight_out", ())) for s in sessions),
        "deliveries_held_for_credit": service_stat(running, "deliveries_held_for_credit"),
    }


def service_stat(running: Any, name: str) -> int:
    return int(getattr(running.service.stats, name, 0))


_LOSS_COUNTERS = (
    "deliveries_denied",
    "view_misses_unhealthy",
    "deliveries_dropped_slow_consumer",
    "deliveries_queued_slow_consumer",
    "slow_consumers_paused",
    "slow_consumers_disconnected",
    "deliveries_held_dropped",
    "duplicates_dropped",
    "envelopes_refused",
    "stuck_broadcasts",
    "stuck_tasked",
    "stuck_held",
    "stuck_inflight",
    "deliveries_held_for_credit",
)


def _public_main(conn: Any, data_dir: str) -> None:
    """(b): ``start_broker`` with the embedded chain it creates itself; no market topics."""
    quiet()
    from blendsm.broker import start_broker

    async def run() -> None:
        running = await start_broker(_blendsm_config(data_dir))
        conn.send(("ready", {"port": running.port}))
        await serve(conn, lambda: _blendsm_stats(running), running.stop)

    run_child(conn, run)


def _market_accounts(n_buyers: int) -> tuple[Any, Any, Any, Any, list[Any]]:
    """deployer (the Registry's oracle), operator, seller, device, buyers: TEST-ONLY keys on a
    chain that holds no value."""
    from blendsm.contracts import test_account

    return (
        test_account("bench-deployer"),
        test_account("bench-operator"),
        test_account("bench-seller"),
        test_account("bench-device"),
        [test_account(f"bench-buyer-{i}") for i in range(n_buyers)],
    )


async def _build_market(w3: Any, n_buyers: int) -> Any:
    """Deploy the suite on ``w3`` (accounts already funded) and enrol seller, operator,
    buyers and device, create the paid topic and open one channel per buyer; the
    deployment."""
    from blendsm.contracts import Marketplace, Policy, Role, deploy_suite

    deployer, operator, seller, device, buyers = _market_accounts(n_buyers)
    deployment = await deploy_suite(w3, deployer)
    oracle = Marketplace(w3, deployment, deployer)
    for account, role in [
        (seller, Role.SELLER),
        (operator, Role.OPERATOR),
        *[(b, Role.BUYER) for b in buyers],
    ]:
        await Marketplace(w3, deployment, account).registry.apply_for_role(role)
        await oracle.registry.approve(account.address)
    as_seller = Marketplace(w3, deployment, seller)
    await as_seller.registry.add_device(device.address)
    await as_seller.market.create_topic(TOPIC, PRICE, None, Policy.OPEN)
    for buyer in buyers:
        await Marketplace(w3, deployment, buyer).channels.open(
            seller.address, operator.address, None, DEPOSIT
        )
    return deployment


def _market_ready(running: Any, deployment: Any, operator: Any, setup_s: float) -> Any:
    return (
        "ready",
        {
            "port": running.port,
            "chain_id": deployment.chain_id,
            "channels": deployment.address("PaymentChannels"),
            "operator": operator.address,
            "registry": deployment.address("Registry"),
            "setup_s": setup_s,
            "http_port": running.http.port if running.http is not None else None,
        },
    )


def _market_main(conn: Any, data_dir: str, n_buyers: int, http: bool = False) -> None:
    """(c), and (d) with ``http``: build the chain and the market here (the in-process EVM
    cannot cross processes), then start the broker on it."""
    quiet()
    from blendsm.broker import ChainConnection, start_broker
    from blendsm.contracts import EMBEDDED, connect, new_embedded_chain

    async def run() -> None:
        t_setup = time.time()
        deployer, operator, seller, device, buyers = _market_accounts(n_buyers)
        tester = new_embedded_chain(
            fund=[a.address for a in (deployer, operator, seller, device, *buyers)],
            amount=10**21,
        )
        w3 = connect(EMBEDDED, ethereum_tester=tester)
        deployment = await _build_market(w3, n_buyers)
        setup_s = time.time() - t_setup
        running = await start_broker(
            _blendsm_config(data_dir, http),
            chain=ChainConnection(w3, deployment, operator, tester, owned=False),
        )
        _time_commits(running)
        conn.send(_market_ready(running, deployment, operator, setup_s))
        await serve(conn, lambda: _blendsm_stats(running), running.stop)

    run_child(conn, run)


def _anvil_market_main(
    conn: Any, data_dir: str, n_buyers: int, url: str, http: bool = False
) -> None:
    """(e): the market of (c), built over JSON-RPC on the anvil node at ``url`` (started by
    the driver): fund the accounts (anvil_setBalance), deploy and enrol exactly as (c), write
    the deployment file, then ``start_broker`` from its config alone (``chain.endpoint`` =
    ``url``, the operator key from an environment variable), as a production broker starts."""
    quiet()
    from blendsm.broker import start_broker
    from blendsm.contracts import connect, disconnect

    async def run() -> None:
        t_setup = time.time()
        deployer, operator, seller, device, buyers = _market_accounts(n_buyers)
        w3 = connect(url, request_timeout=30)
        try:
            for account in (deployer, operator, seller, device, *buyers):
                await w3.provider.make_request("anvil_setBalance", [account.address, hex(10**21)])
            deployment = await _build_market(w3, n_buyers)
        finally:
            await disconnect(w3)
        deployment_file = os.path.join(data_dir, "bench-deployment.json")
        deployment.save(deployment_file)
        os.environ[OPERATOR_KEY_ENV] = operator.key.hex()  # TEST-ONLY key, this process only
        setup_s = time.time() - t_setup
        node = {"endpoint": url, "deployment": deployment_file, "key_env": OPERATOR_KEY_ENV}
        running = await start_broker(_blendsm_config(data_dir, http, node=node))
        _time_commits(running)
        conn.send(_market_ready(running, deployment, operator, setup_s))
        await serve(conn, lambda: _blendsm_stats(running), running.stop)

    run_child(conn, run)


# --------------------------------------------------------------------------- subscriber process
def _subscriber_main(
    kind: str,
    port: int,
    first_index: int,
    n_clients: int,
    info: dict[str, Any],
    expected: int,
    ready: Any,
    results: Any,
    deadline: float,
    published: Any = None,
    window: Any = None,
) -> None:
    quiet()
    counts = [0] * n_clients
    last = [0.0] * n_clients
    stop_clients: list[Any] = []
    subs: list[Any] = []
    extra: dict[str, int] = {}
    lock = threading.Lock()

    latencies: list[float] = []

    def count(i: int, payload: bytes = b"") -> None:
        now = time.time()
        counts[i] += 1
        last[i] = now
        if len(latencies) < LATENCY_SAMPLE and len(payload) >= 8:
            # The publisher puts its send time in the last 8 bytes (also of an envelope).
            latencies.append(now - struct.unpack("!d", payload[-8:])[0])

    ok = True
    try:
        if kind == "c":
            from blendsm.contracts import test_account
            from blendsm.device_sdk import PaymentEventKind, Subscriber

            def on_payment(_s: Any, event: Any) -> None:
                if event.kind is PaymentEventKind.REFUSAL:
                    key = f"refused:{getattr(event.notice, 'code', '?')}"
                    with lock:
                        extra[key] = extra.get(key, 0) + 1

            for j in range(n_clients):
                sub = Subscriber(
                    test_account(f"bench-buyer-{first_index + j}"),  # TEST-ONLY key
                    host="127.0.0.1",
                    port=port,
                    broker=info["operator"],
                    chain_id=info["chain_id"],
                    channels_contract=info["channels"],
                    pay_every=PAY_EVERY,
                )

                def on_message(_s: Any, m: Any, i: int = j) -> None:
                    if m.topic == TOPIC:  # data only; notices never reach on_message anyway
                        count(i, m.payload)

                sub.on_message = on_message
                sub.on_payment = on_payment
                sub.connect(timeout=max(0.5, deadline - time.time()))
                sub.subscribe(TOPIC, QOS, timeout=max(0.5, deadline - time.time()))
                subs.append(sub)
                stop_clients.append(sub.disconnect)
        else:
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            subscribed = [False] * n_clients
            for j in range(n_clients):
                c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}-{j}")

                def on_msg(_c: Any, _u: Any, m: Any, i: int = j) -> None:
                    if m.topic == TOPIC:
                        count(i, m.payload)

                def on_subscribe(*_a: Any, i: int = j) -> None:
                    subscribed[i] = True

                c.on_message = on_msg
                c.on_subscribe = on_subscribe
                c.on_socket_open = nodelay
                c.connect("127.0.0.1", port)
                c.loop_start()
                c.subscribe(TOPIC, QOS)
                stop_clients.append(lambda c=c: (c.disconnect(), c.loop_stop()))
            while not all(subscribed) and time.time() < deadline:
                time.sleep(0.01)
            ok = all(subscribed)
    except Exception as exc:
        print(f"subscriber process: {exc!r}", file=sys.stderr, flush=True)
        ok = False
    ready.put(ok)
    cpu0 = own_cpu()
    cut = 0
    while ok:
        # Until the driver starts publishing, the set-up deadline (+ a window); then the
        # measured window's end, which it sets at its first publish: a slow set-up on a
        # loaded machine must not eat the window (the subscribers used to stop 20 s after
        # they started, mid-stream, which looked like a broker stall).
        limit = window.value if window is not None and window.value else deadline
        if window is not None and not window.value:
            limit += RUN_DEADLINE_S
        if time.time() >= limit:
            cut = 1
            break
        total = sum(counts)
        if total >= expected * n_clients:
            break
        # Idle: IDLE_STOP_S after the last message, counted from the end of publishing at
        # the earliest (a device still publishing, or still waiting for its PUBACKs, is not
        # done: its stall is measured, not mistaken for the end of the stream).
        newest = max(last)
        if published is not None:
            newest = max(newest, published.value) if published.value else time.time()
        if total and time.time() - newest > IDLE_STOP_S:
            break
        time.sleep(0.01)
    extra["cpu_us"] = int((own_cpu() - cpu0) * 1e6)
    extra["cut_by_deadline"] = cut
    for sub in subs:
        s = sub.stats
        for name in ("vouchers_sent", "receipts", "refusals", "payment_requests"):
            extra[name] = extra.get(name, 0) + getattr(s, name)
    for stop in stop_clients:
        with contextlib.suppress(Exception):
            stop()
    results.put((sum(counts), max(last) if any(counts) else 0.0, extra, latencies))


# --------------------------------------------------------------------------- driver
def _publisher(kind: str, port: int, info: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A connected publisher: its publish, close and flush (wait, at most the given seconds,
    until the broker acknowledged every QoS 1 message) functions; plain paho for (a)/(b), the
    SDK Publisher of the seller's registered device for (c)."""
    if kind == "c":
        import tempfile

        from blendsm.contracts import test_account
        from blendsm.device_sdk import Publisher

        state = tempfile.mkdtemp(prefix="bench-device-")
        pub = Publisher(
            test_account("bench-device"),  # TEST-ONLY key
            host="127.0.0.1",
            port=port,
            broker=info["operator"],
            chain_id=info["chain_id"],
            registry=info["registry"],
            state_dir=state,
        )
        pub.connect(timeout=10)

        def publish_signed(topic: str, payload: bytes) -> Any:
            return pub.publish(topic, payload, qos=QOS)  # a signed envelope, 103 B header

        def close_signed() -> None:
            pub.close()
            shutil.rmtree(state, ignore_errors=True)

        return publish_signed, close_signed, (pub.flush if QOS else None)
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub")
    c.on_socket_open = nodelay
    c.connect("127.0.0.1", port)
    c.loop_start()

    def close() -> None:
        c.disconnect()
        c.loop_stop()

    infos: list[Any] = []

    def publish(topic: str, payload: bytes) -> Any:
        info = c.publish(topic, payload, qos=QOS)
        infos[:] = [info]
        return info

    def flush(timeout: float) -> None:
        if infos:  # paho sends in order: the last one acknowledged, all were
            infos[0].wait_for_publish(timeout)

    return publish, close, (flush if QOS else None)


class _Poller:
    """(d): a thread of the driver (blocking http.client on one keep-alive connection, so it
    shares no event loop with the publisher) that GETs ``POLL_PATHS`` in turn every
    ``POLL_INTERVAL_S`` while ``go`` is set, counting answers (HTTP 200, body read) and failures
    (anything else, a timeout or a broken connection, after which it reconnects). ``cpu`` is its
    own thread CPU so far (updated every cycle), so the driver can keep it out of the
    publisher's figure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.go = threading.Event()
        self.done = threading.Event()
        self.answers = 0
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.cpu = 0.0
        self.t_start = 0.0
        self.t_end = 0.0
        self.thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import http.client

        conn: http.client.HTTPConnection | None = None
        cpu0 = time.thread_time()
        while not self.go.wait(0.05):
            if self.done.is_set():
                return
        self.t_start = time.time()
        tick = self.t_start
        try:
            while not self.done.is_set():
                for path in POLL_PATHS:
                    try:
                        if conn is None:
                            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                        conn.request("GET", path)
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status == 200:
                            self.answers += 1
                        else:
                            self.failures += 1
                            key = f"{path} {resp.status}"
                            self.errors[key] = self.errors.get(key, 0) + 1
                    except Exception as exc:
                        self.failures += 1
                        key = f"{path} {type(exc).__name__}"
                        self.errors[key] = self.errors.get(key, 0) + 1
                        if conn is not None:
                            conn.close()
                        conn = None
                self.cpu = time.thread_time() - cpu0
                tick += POLL_INTERVAL_S
                self.done.wait(max(0.0, tick - time.time()))
        finally:
            self.t_end = time.time()
            self.cpu = time.thread_time() - cpu0
            if conn is not None:
                conn.close()

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.thread.join(timeout=5)
        span = max(self.t_end - self.t_start, 1e-9) if self.t_start else float("nan")
        return {
            "poll_answers": self.answers,
            "poll_failures": self.failures,
            "poll_rps": self.answers / span,
            "poll_s": span,
            "poll_errors": dict(self.errors),
        }


def run_one(
    kind: str, messages: int, hard_end: float = float("inf"), rate: float = 0.0
) -> dict[str, Any]:
    """One configuration; every wait ends by ``hard_end`` (time.time()) at the latest.
    ``rate``: publish at this many messages/s (0: as fast as possible)."""

    def left(wanted: float) -> float:
        return max(0.5, min(wanted, hard_end - time.time()))

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    data_dir = tempfile.mkdtemp(prefix="bench-paid-")
    anvil: Any = None
    on_anvil = kind in ("c", "d") and CHAIN == "anvil"
    if on_anvil:
        from blendsm.contracts import AnvilNode

        t_anvil = time.time()
        anvil = AnvilNode().start(timeout=left(20))  # automine: every transaction mined at once
        anvil_start_s = time.time() - t_anvil
    target: Any = {
        "a": stock_main,
        "b": _public_main,
        "c": _market_main,
        "d": _market_main,
        "e": _market_main,
    }[kind]
    args: tuple[Any, ...] = {
        "a": (child,),
        "b": (child, data_dir),
        "c": (child, data_dir, N_SUBSCRIBERS),
        "d": (child, data_dir, N_SUBSCRIBERS, True),
        "e": (child, data_dir, N_SUBSCRIBERS),
    }[kind]
    if on_anvil:  # the chain is a node of its own: the broker starts from its config alone
        target = _anvil_market_main
        args = (child, data_dir, N_SUBSCRIBERS, anvil.url, kind == "d")
    clients = "c" if kind in ("d", "e") else kind  # (d) and (e) use exactly the clients of (c)
    broker = ctx.Process(target=target, args=args, daemon=True)
    try:
        broker.start()
    except BaseException:
        if anvil is not None:
            anvil.stop()
        raise
    subs: list[Any] = []
    close_pub: Any = None
    poller: _Poller | None = None
    try:
        if not parent.poll(left(START_TIMEOUT_S)):
            raise RuntimeError("broker did not start in time")
        tag, info = parent.recv()
        if tag != "ready":
            raise RuntimeError(f"broker failed to start: {info}")
        port = int(info["port"])
        t_clients = time.time()
        deadline = t_clients + left(RUN_DEADLINE_S)
        ready, results = ctx.Queue(), ctx.Queue()
        published = ctx.Value("d", 0.0)  # time.time() when the publisher is done, else 0
        window = ctx.Value("d", 0.0)  # the measured window's end, set at the first publish
        per = N_SUBSCRIBERS // SUB_PROCS
        for p_index in range(SUB_PROCS):
            p = ctx.Process(
                target=_subscriber_main,
                args=(
                    clients,
                    port,
                    p_index * per,
                    per,
                    info,
                    messages,
                    ready,
                    results,
                    deadline,
                    published,
                    window,
                ),
                daemon=True,
            )
            p.start()
            subs.append(p)
        if not all(ready.get(timeout=max(1.0, deadline - time.time())) for _ in subs):
            raise RuntimeError("subscribers not ready")
        publish, close_pub, flush_pub = _publisher(clients, port, info)
        if kind == "d":
            if not info.get("http_port"):
                raise RuntimeError("broker started without its HTTP API")
            poller = _Poller(int(info["http_port"]))
        time.sleep(0.2)
        if poller is not None:
            poller.go.set()  # polling covers the whole measured window
        cpu0 = ask(parent, "cpu", left(10))
        anvil_cpu0 = proc_cpu(anvil.process.pid) if anvil is not None else 0.0
        pub_cpu0 = own_cpu()
        poll_cpu0 = poller.cpu if poller is not None else 0.0
        t0 = time.time()
        deadline = window.value = t0 + left(RUN_DEADLINE_S)
        body = PAYLOAD[:-8]
        gap = 1.0 / rate if rate else 0.0
        pub_max_s = 0.0  # the longest publish() call (a device's outbox insert, at QoS 1)
        for k in range(messages):
            t_call = time.time()
            publish(TOPIC, body + struct.pack("!d", t_call))
            pub_max_s = max(pub_max_s, time.time() - t_call)
            if gap:  # a fixed rate: the schedule, not the previous send, sets the next one
                time.sleep(max(0.0, t0 + (k + 1) * gap - time.time()))
        t_pub = time.time() - t0
        if flush_pub is not None:  # QoS 1/2: done once the broker acknowledged everything
            with contextlib.suppress(Exception):
                flush_pub(max(1.0, deadline - time.time()))
        t_acked = time.time() - t0
        published.value = time.time()
        got, t_last = 0, t0
        extra: dict[str, int] = {}
        latencies: list[float] = []
        for _ in subs:
            n, tl, ex, lat = results.get(timeout=left(max(1.0, deadline - time.time() + 5)))
            latencies += lat
            got += n
            t_last = max(t_last, tl)
            for k, v in ex.items():
                extra[k] = extra.get(k, 0) + v
        pub_cpu = own_cpu() - pub_cpu0
        if poller is not None:  # the poller thread's CPU is not the publisher's
            pub_cpu -= poller.cpu - poll_cpu0
        cpu1 = ask(parent, "cpu", left(10))
        anvil_cpu = proc_cpu(anvil.process.pid) - anvil_cpu0 if anvil is not None else 0.0
        polled = poller.stop() if poller is not None else {}
        poller = None
        stats = ask(parent, "stats", left(10))
        elapsed = max(t_last - t0, 1e-9)
        latencies.sort()
        return {
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "deliveries": got,
            "expected": messages * N_SUBSCRIBERS,
            "dropped": messages * N_SUBSCRIBERS - got,
            "rate": got / elapsed,
            "cpu_us": (cpu1 - cpu0) / max(got, 1) * 1e6,
            "sub_cpu_us": extra.pop("cpu_us", 0) / max(got, 1),
            "pub_cpu_us": pub_cpu / max(got, 1) * 1e6,
            "publish_s": t_pub,
            "acked_s": t_acked,
            "clients_s": t0 - t_clients,  # subscribers started and publisher connected
            "pub_max_ms": pub_max_s * 1e3,
            "elapsed_s": elapsed,
            "setup_s": float(info.get("setup_s", 0.0)),
            **stats,
            **polled,  # (d)
            **(
                {"anvil_cpu_us": anvil_cpu / max(got, 1) * 1e6, "anvil_start_s": anvil_start_s}
                if anvil is not None
                else {}
            ),  # (e)
            **{f"sub_{k}": v for k, v in extra.items()},  # SDK counters (c), (d)
        }
    finally:
        if poller is not None:
            poller.stop()
        if close_pub is not None:
            with contextlib.suppress(Exception):
                close_pub()
        try:
            parent.send("stop")
            if parent.poll(min(10.0, max(1.0, hard_end + 5 - time.time()))):
                parent.recv()
        except (OSError, EOFError):
            pass
        for p in [*subs, broker]:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        if anvil is not None:
            anvil.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


LABELS = {
    "a": "stock amqtt, AnonymousAuth only, paho",
    "b": "BlendSM, public topic, paho",
    "c": "BlendSM, paid topic, SDK (vouchers)",
    "d": "BlendSM, paid topic + HTTP API polled",
    "e": "BlendSM, paid, SDK, embedded EVM",
}


def _options() -> Any:
    import argparse

    parser = argparse.ArgumentParser(description="Paid delivery: BlendSM next to stock amqtt.")
    parser.add_argument("messages", nargs="?", type=int, default=3000)
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument(
        "--qos", type=int, choices=(0, 1), default=QOS, help="publish and subscribe QoS"
    )
    parser.add_argument("--payload", type=int, default=len(PAYLOAD), help="payload bytes (>= 8)")
    parser.add_argument("--configs", default="".join(LABELS), help="which of abcde to run")
    parser.add_argument(
        "--chain",
        choices=("anvil", "embedded"),
        default=CHAIN,
        help="the chain of (c) and (d): an anvil node in its own process (default) or the"
        " embedded EVM inside the broker process; (e) is always the embedded EVM",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="run bench_latency.py instead (paced raw clients, p50/p99 at --fraction of stock's"
        " saturation; rounds = the positional rounds, --configs default abc)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="--latency: the fixed rate as a fraction of stock's saturation rate (default 0.5)",
    )
    return parser.parse_args()


def main() -> None:
    global QOS, PAYLOAD, CHAIN
    options = _options()
    QOS, PAYLOAD, CHAIN = options.qos, b"x" * max(8, options.payload), options.chain
    os.environ["BENCH_QOS"], os.environ["BENCH_PAYLOAD"] = str(QOS), str(len(PAYLOAD))
    os.environ["BENCH_CHAIN"] = CHAIN
    if options.latency:
        import bench_latency

        configs = options.configs if options.configs != "".join(LABELS) else "abc"
        bench_latency.main(
            [
                f"--rounds={options.rounds}",
                f"--fraction={options.fraction}",
                f"--configs={configs}",
                f"--chain={CHAIN}",
            ]
        )
        return
    pin("clients")  # the driver and its children; each broker process re-pins itself
    messages, rounds = options.messages, options.rounds
    configs = {k: v for k, v in LABELS.items() if k in options.configs}
    start = time.time()
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in LABELS}
    print(
        f"1 pub -> {N_SUBSCRIBERS} subs, QoS {QOS}, {len(PAYLOAD)} B, {messages} messages,"
        f" {rounds} round(s); paid topic: credit_messages {CREDIT_MESSAGES},"
        f" pay_every {PAY_EVERY or f'SDK default ({PAY_EVERY_MESSAGES})'}, price {PRICE} wei;"
        f" (c)/(d) chain: {CHAIN}\n  {pinning()};"
        f" load average {os.getloadavg()}",
        flush=True,
    )
    for r in range(rounds):
        for k in configs:
            if time.time() - start + EST_RUN_S[k] > TOTAL_BUDGET_S:
                print(f"  time budget reached, skipping {k} round {r + 1}", flush=True)
                continue
            try:
                out = run_one(k, messages, start + TOTAL_BUDGET_S)
            except Exception as exc:
                print(f"  round {r + 1} {k}: FAILED {exc!r}", flush=True)
                continue
            res[k].append(out)
            line = (
                f"  round {r + 1} {k}: {out['rate']:8.0f} deliveries/s"
                f"  CPU/delivery: broker {out['cpu_us']:5.1f} us, subscribers"
                f" {out['sub_cpu_us']:5.1f} us, publisher {out['pub_cpu_us']:4.1f} us"
                f"\n           received {out['deliveries']}/{out['expected']} (dropped {out['dropped']})"
                f"  latency p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms"
                f"  publish {out['publish_s']:.2f} s (longest call {out['pub_max_ms']:.0f} ms,"
                f" all acknowledged {out['acked_s']:.2f} s), last receipt {out['elapsed_s']:.2f} s"
                + (
                    f"  CUT: {out['sub_cut_by_deadline']} subscriber process(es) reached the"
                    f" {RUN_DEADLINE_S:.0f} s window"
                    if out.get("sub_cut_by_deadline")
                    else ""
                )
                + f"; clients ready in {out['clients_s']:.1f} s"
            )
            if "anvil_cpu_us" in out:
                line += f"  anvil {out['anvil_cpu_us']:5.1f} us"
            if k in ("c", "d", "e"):
                line += (
                    f"\n           metered {out['metered']}, denied_no_credit"
                    f" {out['denied_no_credit']}, vouchers sent {out.get('sub_vouchers_sent', 0)}"
                    f" / accepted {out['vouchers_accepted']} / refused {out['vouchers_refused']},"
                    f" receipts seen {out.get('sub_receipts', 0)}, payment requests"
                    f" {out['payment_requests']}, in-flight window full"
                    f" {out.get('inflight_dropped', 0)}, chain set-up {out['setup_s']:.1f} s"
                    + (
                        f" (+ anvil start {out['anvil_start_s']:.1f} s)"
                        if "anvil_start_s" in out
                        else ""
                    )
                    + "".join(
                        f", {name[4:]} {n}"
                        for name, n in out.items()
                        if name.startswith("sub_refused:")
                    )
                    + "".join(f", {name} {out[name]}" for name in _LOSS_COUNTERS if out.get(name))
                    + (
                        f"; {out['commits']} voucher commits, p50 {out['commit_p50_ms']:.1f} /"
                        f" p90 {out['commit_p90_ms']:.1f} / max {out['commit_max_ms']:.1f} ms"
                        if "commits" in out
                        else ""
                    )
                )
            if k == "d":
                line += (
                    f"\n           HTTP poller: {out['poll_answers']} answers,"
                    f" {out['poll_failures']} failures in {out['poll_s']:.2f} s"
                    f" ({out['poll_rps']:.1f} requests/s)"
                    + "".join(f", {name} x{n}" for name, n in out["poll_errors"].items())
                )
            print(line + threads_line(out, out["deliveries"]), flush=True)
    print("median:")
    base = statistics.median(x["rate"] for x in res["a"]) if res["a"] else float("nan")
    base_cpu = statistics.median(x["cpu_us"] for x in res["a"]) if res["a"] else float("nan")
    for k, label in LABELS.items():
        if not res[k]:
            continue
        rate = statistics.median(x["rate"] for x in res[k])
        cpu = statistics.median(x["cpu_us"] for x in res[k])
        dropped = statistics.median(x["dropped"] for x in res[k])
        sub_cpu = statistics.median(x["sub_cpu_us"] for x in res[k])
        every = statistics.median(x["cpu_us"] + x["sub_cpu_us"] + x["pub_cpu_us"] for x in res[k])
        print(
            f"  {k} {label:38s} {rate:7.0f} deliveries/s  broker {cpu:5.1f} us/delivery"
            f" (subscribers {sub_cpu:5.1f}, all processes {every:5.1f})  dropped {dropped:5.0f}"
            f"  rate {k}/a {rate / base:4.2f}  broker CPU {k}/a {cpu / base_cpu:4.2f}"
            f"  broker-bound rate {k}/a {base_cpu / cpu:4.2f}"
        )
    print(
        "  (broker-bound rate = a's broker CPU per delivery / this one's: the rate ratio if the"
        " broker alone bounded it. The broker has its own core when pinned; subscribers,"
        " publisher and chain node share the other(s), so when 'all processes' exceeds a's the"
        " clients bound the measured rate.)"
    )
    if res["c"] and res["d"]:
        rate_c = statistics.median(x["rate"] for x in res["c"])
        cpu_c = statistics.median(x["cpu_us"] for x in res["c"])
        rate_d = statistics.median(x["rate"] for x in res["d"])
        cpu_d = statistics.median(x["cpu_us"] for x in res["d"])
        rps = statistics.median(x["poll_rps"] for x in res["d"])
        failures = sum(x["poll_failures"] for x in res["d"])
        print(
            f"  d/c (HTTP API polled vs not): rate {rate_d / rate_c:4.2f}"
            f"  broker CPU {cpu_d / cpu_c:4.2f}  poller {rps:.1f} requests/s (median),"
            f" {failures} failure(s) in all"
        )
    if res["c"] and res["e"]:
        rate_c = statistics.median(x["rate"] for x in res["c"])
        cpu_c = statistics.median(x["cpu_us"] for x in res["c"])
        rate_e = statistics.median(x["rate"] for x in res["e"])
        cpu_e = statistics.median(x["cpu_us"] for x in res["e"])
        print(
            f"  e/c (embedded EVM in the broker process vs chain {CHAIN}): rate"
            f" {rate_e / rate_c:4.2f}  broker CPU {cpu_e / cpu_c:4.2f}"
        )
    anvil_rows = [x["anvil_cpu_us"] for v in res.values() for x in v if "anvil_cpu_us" in x]
    if anvil_rows:
        print(
            f"  anvil node: {statistics.median(anvil_rows):5.1f} us/delivery (median; its own"
            " process, not in the broker's figure)"
        )
    print(f"load average {os.getloadavg()}; total {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
