"""Cost of amqtt 0.12.1 topic plugins on the delivery hot path.

Run as ``python benchmarks/bench_amqtt_plugin_overhead.py [messages] [rounds]``
(defaults 3000 messages, 2 rounds; about 20-30 s, hard-capped below 60 s).

Each configuration starts a real amqtt broker in its own process on 127.0.0.1 (free port),
connects 10 paho subscribers (two processes, five clients each) to ``bench/t`` at QoS 0, then
one paho publisher sends ``messages`` 64-byte QoS 0 PUBLISHes as fast as it can. Reported:
deliveries/s (total received / time from first publish to last receipt), broker CPU per
delivery, and the ratio to configuration (a).

Configurations:
  a  minimal plugins: AnonymousAuthPlugin only (topic filtering is "enabled" because a
     ``plugins:`` map is given, but with no topic plugin ``_map_plugin_method`` creates no Task)
  b  a + one allow-all topic plugin (one asyncio Task per RECEIVE per subscriber per message,
     see amqtt/plugins/manager.py:361-391)
  c  a + the same allow-all decision made synchronously in a Broker subclass that overrides
     ``Broker._topic_filtering`` (amqtt/broker.py:893) - no Task per delivery
  d  a + one event plugin with ``on_mqtt_packet_sent`` (a fire-and-forget Task per packet
     sent, amqtt/plugins/manager.py:328-358), i.e. naive metering by event
  e  c + the recommended gate/meter: the broker swaps each connection's handler class to a
     BrokerProtocolHandler subclass whose ``mqtt_publish`` checks credit synchronously and whose
     ``_send_packet`` commits the charge after the PUBLISH is written (no Task, no plugin call)

Everything stops by itself: every wait has a deadline and child processes are terminated.
Absolute figures depend on the machine; the ratios are the point. On a busy 2-core machine the
deliveries/s figures are noisy (broker, publisher and subscribers share the cores); broker CPU
per delivery is the stable figure.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin, BaseTopicPlugin

N_SUBSCRIBERS = 10
SUB_PROCS = 2
PAYLOAD = b"x" * 64
TOPIC = "bench/t"
RUN_DEADLINE_S = 12.0
TOTAL_BUDGET_S = 55.0


# --------------------------------------------------------------------------- plugins
class AllowAllTopicPlugin(BaseTopicPlugin):
    """Allows everything; measures the pure cost of the plugin call machinery."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Any = None, topic: Any = None, action: Any = None
    ) -> bool:
        return True


class CountSentPlugin(BasePlugin[Any]):
    """Counts PUBLISH packets sent, the naive event-based metering."""

    @dataclass
    class Config:
        pass

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.sent = 0

    async def on_mqtt_packet_sent(self, *, packet: Any, session: Any = None) -> None:
        self.sent += 1


# --------------------------------------------------------------------------- broker process
def _plugins(kind: str) -> dict[str, Any]:
    plugins: dict[str, Any] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
    }
    if kind == "b":
        plugins[
            f"{__name__ if __name__ != '__main__' else 'bench_amqtt_plugin_overhead'}.AllowAllTopicPlugin"
        ] = {}
    if kind == "d":
        plugins[
            f"{__name__ if __name__ != '__main__' else 'bench_amqtt_plugin_overhead'}.CountSentPlugin"
        ] = {}
    return plugins


def _broker_main(kind: str, port: int, conn: Any, bench_dir: str) -> None:
    sys.path.insert(0, bench_dir)
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from amqtt.broker import Broker
    from amqtt.contexts import Action

    class SyncGateBroker(Broker):
        """Decides RECEIVE synchronously (stand-in for an in-memory cache lookup)."""

        async def _topic_filtering(self, session: Any, topic: str, action: Action) -> bool:
            if action is Action.RECEIVE:
                return (
                    True  # e.g. self.gate.allow(session.client_id, topic): dict lookups, no await
                )
            return await super()._topic_filtering(session, topic, action)

    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.mqtt.publish import PublishPacket

    ledger: dict[
        str, list[int]
    ] = {}  # client_id -> [reserved, charged]; stand-in for the credit cache

    class MeteredHandler(BrokerProtocolHandler):
        async def mqtt_publish(
            self, topic: str, data: Any, qos: Any, retain: bool, ack_timeout: Any = None
        ) -> Any:
            entry = ledger.setdefault(self.session.client_id, [0, 0])  # type: ignore[union-attr]
            if entry[0] - entry[1] > 1_000_000:  # credit check: plain arithmetic, no await
                return None
            entry[0] += 1
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)

        async def _send_packet(self, packet: Any) -> None:
            await super()._send_packet(packet)
            if type(packet) is PublishPacket and not packet.dup_flag and self.session is not None:
                ledger[self.session.client_id][1] += 1

    class MeteredBroker(SyncGateBroker):
        async def _initialize_client_session(self, *args: Any) -> Any:
            handler, session = await super()._initialize_client_session(*args)
            handler.__class__ = MeteredHandler
            return handler, session

    async def run() -> None:
        cfg = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": _plugins(kind),
        }
        broker = {"c": SyncGateBroker, "e": MeteredBroker}.get(kind, Broker)(cfg)
        await broker.start()
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "cpu":
                t = os.times()
                conn.send(t.user + t.system)
            elif cmd == "stop":
                break
        charged = sum(v[1] for k, v in ledger.items() if k != "pub")
        await asyncio.wait_for(broker.shutdown(), 5)
        conn.send(("stopped", charged))

    asyncio.run(run())


# --------------------------------------------------------------------------- subscriber process
def _subscriber_main(
    port: int, n_clients: int, expected: int, ready: Any, results: Any, deadline: float
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    counts = [0] * n_clients
    first = [0.0] * n_clients
    last = [0.0] * n_clients
    subscribed = [False] * n_clients
    clients = []
    for i in range(n_clients):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}-{i}")

        def on_message(_c: Any, _u: Any, _m: Any, i: int = i) -> None:
            now = time.time()
            if counts[i] == 0:
                first[i] = now
            counts[i] += 1
            last[i] = now

        def on_subscribe(*_a: Any, i: int = i) -> None:
            subscribed[i] = True

        c.on_message = on_message
        c.on_subscribe = on_subscribe
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(TOPIC, 0)
        clients.append(c)
    while not all(subscribed) and time.time() < deadline:
        time.sleep(0.01)
    ready.put(all(subscribed))
    while sum(counts) < expected * n_clients and time.time() < deadline:
        time.sleep(0.01)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    results.put((sum(counts), max(last) if any(counts) else 0.0))


# --------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one(kind: str, messages: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ctx = mp.get_context("spawn")
    port = _free_port()
    parent, child = ctx.Pipe()
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    broker = ctx.Process(target=_broker_main, args=(kind, port, child, bench_dir), daemon=True)
    broker.start()
    subs: list[Any] = []
    try:
        if not parent.poll(10) or parent.recv() != "ready":
            raise RuntimeError("broker did not start")
        deadline = time.time() + RUN_DEADLINE_S
        ready, results = ctx.Queue(), ctx.Queue()
        per = N_SUBSCRIBERS // SUB_PROCS
        for _ in range(SUB_PROCS):
            p = ctx.Process(
                target=_subscriber_main,
                args=(port, per, messages, ready, results, deadline),
                daemon=True,
            )
            p.start()
            subs.append(p)
        if not all(ready.get(timeout=10) for _ in subs):
            raise RuntimeError("subscribers not ready")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        time.sleep(0.2)
        parent.send("cpu")
        cpu0 = parent.recv()
        t0 = time.time()
        for _ in range(messages):
            pub.publish(TOPIC, PAYLOAD, qos=0)
        got, t_last = 0, t0
        for _ in subs:
            n, tl = results.get(timeout=max(1.0, deadline - time.time() + 5))
            got += n
            t_last = max(t_last, tl)
        parent.send("cpu")
        cpu1 = parent.recv()
        pub.disconnect()
        pub.loop_stop()
        parent.send("stop")
        charged = parent.recv()[1] if parent.poll(6) else -1
        elapsed = max(t_last - t0, 1e-9)
        return {
            "deliveries": got,
            "expected": messages * N_SUBSCRIBERS,
            "rate": got / elapsed,
            "cpu_us": (cpu1 - cpu0) / max(got, 1) * 1e6,
            "charged": charged,
        }
    finally:
        for p in [*subs, broker]:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)


def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    labels = {
        "a": "minimal plugins (AnonymousAuth only)",
        "b": "+ one allow-all topic plugin",
        "c": "+ sync RECEIVE gate in Broker subclass",
        "d": "+ one on_mqtt_packet_sent event plugin",
        "e": "c + sync credit gate/meter in handler",
    }
    start = time.time()
    res: dict[str, list[dict[str, float]]] = {k: [] for k in labels}
    print(
        f"amqtt 1 pub -> {N_SUBSCRIBERS} subs, QoS 0, {len(PAYLOAD)} B, {messages} messages, {rounds} round(s)"
    )
    for r in range(rounds):
        for k in labels:
            if time.time() - start > TOTAL_BUDGET_S - RUN_DEADLINE_S - 8:
                print(f"time budget reached, skipping {k} round {r + 1}")
                continue
            out = run_one(k, messages)
            res[k].append(out)
            print(
                f"  round {r + 1} {k}: {out['rate']:8.0f} deliveries/s  {out['cpu_us']:5.1f} us CPU/delivery"
                f"  ({int(out['deliveries'])}/{int(out['expected'])})"
                + (f"  metered {int(out['charged'])}" if k == "e" else ""),
                flush=True,
            )
    base = statistics.median(x["rate"] for x in res["a"]) if res["a"] else float("nan")
    base_cpu = statistics.median(x["cpu_us"] for x in res["a"]) if res["a"] else float("nan")
    print("median:")
    for k, label in labels.items():
        if not res[k]:
            continue
        rate = statistics.median(x["rate"] for x in res[k])
        cpu = statistics.median(x["cpu_us"] for x in res[k])
        print(
            f"  {k} {label:42s} {rate:8.0f} deliveries/s  {cpu:5.1f} us/delivery  rate ratio {rate / base:4.2f}"
            f"  CPU ratio {cpu / base_cpu:4.2f}"
        )
    print(f"total {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
