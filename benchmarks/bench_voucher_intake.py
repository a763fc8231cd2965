"""Voucher intake: broker CPU per voucher, the real broker fed by real MQTT clients.

Run as ``python benchmarks/bench_voucher_intake.py [vouchers_per_payer] [payers]`` (defaults
300 and 10; about 40 s on a 2-core machine).

The broker runs in its own process on the embedded chain, exactly as configuration (c) of
``bench_paid_delivery.py`` builds it (suite deployed, seller, operator and ``payers`` buyers
enrolled, one funded channel per buyer naming the operator). The driver connects one paho client
per buyer with a CONNECT token (TEST-ONLY keys), subscribes it to its notice topic and pre-signs
increasing cumulative vouchers for its channel (signing is not measured). Two scenarios:

  burst   every payer publishes all its vouchers back to back (QoS 0, as the SDK does), all
          payers at once: the broker sees many vouchers arriving together.
  paced   every payer publishes one voucher every ``1 / PACED_RATE`` s (the SDK's steady state:
          a voucher per few messages received), all payers interleaved.

``BENCH_PROFILE=file.prof`` profiles the broker's event loop (cProfile) during the paced
scenario and writes the profile there when it stops, to see where the intake's CPU goes.

Measured: the broker process's CPU (``resource.getrusage`` in the broker, every thread: ECDSA
recovery, SQLite with fsync on its worker thread, notices) from just before the first voucher
until every payer saw a Receipt covering its last voucher, divided by the vouchers sent (also
shown without the idle broker's own CPU over that time, measured first: the chain view polls the
embedded EVM in the broker process); the
broker's counters (accepted, refused, superseded: a voucher a newer one of the same channel
covered in the same commit) and the voucher store's commits (transactions, each one fsync).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from bench_paid_delivery import _blendsm_config, _build_market, _market_accounts
from broker_process import ask, nodelay, quiet, run_child, serve

PACED_RATE = 100.0  # vouchers/s per payer in the paced scenario
START_TIMEOUT_S = 40.0
WAIT_S = 30.0  # per scenario, for the last receipts
IDLE_S = 3.0  # the idle broker's CPU is measured this long first
PROFILE_ENV = "BENCH_PROFILE"  # set to a file name: the broker process runs under cProfile


def _intake_stats(running: Any) -> dict[str, Any]:
    service = running.service
    stats = service.stats
    store = service.store
    return {
        "accepted": stats.vouchers_accepted,
        "refused": stats.vouchers_refused,
        "superseded": getattr(stats, "vouchers_superseded", 0),
        "dropped": stats.control_dropped,
        "receipts": getattr(stats, "receipts_sent", 0),
        "commits": store.commits if store is not None else 0,
    }


def _broker_main(conn: Any, data_dir: str, n_payers: int) -> None:
    quiet()
    from blendsm.broker import ChainConnection, start_broker
    from blendsm.contracts import EMBEDDED, connect, new_embedded_chain

    async def run() -> None:
        deployer, operator, seller, device, buyers = _market_accounts(n_payers)
        tester = new_embedded_chain(
            fund=[a.address for a in (deployer, operator, seller, device, *buyers)],
            amount=10**21,
        )
        w3 = connect(EMBEDDED, ethereum_tester=tester)
        deployment = await _build_market(w3, n_payers)
        running = await start_broker(
            _blendsm_config(data_dir),
            chain=ChainConnection(w3, deployment, operator, tester, owned=False),
        )
        view = running.service.view
        channels = {b.address: view.channels_of(b.address)[-1].channel_id for b in buyers}
        conn.send(
            (
                "ready",
                {
                    "port": running.port,
                    "chain_id": deployment.chain_id,
                    "channels_contract": deployment.address("PaymentChannels"),
                    "operator": operator.address,
                    "channels": channels,
                },
            )
        )
        await serve(conn, lambda: _intake_stats(running), running.stop)

    profile = os.environ.get(PROFILE_ENV)
    if not profile:
        run_child(conn, run)
        return
    import cProfile

    profiler = cProfile.Profile()
    # The driver toggles the profile around the paced scenario only (SIGUSR1 on, SIGUSR2 off).
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    signal.signal(signal.SIGUSR2, lambda *_: profiler.disable())
    try:
        run_child(conn, run)
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


class _Payer:
    """One buyer's raw paho connection, its notice counters and pre-signed vouchers."""

    def __init__(self, account: Any, info: dict[str, Any], index: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from blendsm.device_sdk import (
            NOTICE,
            VOUCHER,
            ConnectTokenSigner,
            VoucherDomain,
            VoucherSigner,
            control_topic,
        )

        self.address = account.address
        self.channel_id: bytes = info["channels"][account.address]
        key = bytes(account.key)
        self.signer = VoucherSigner(key, VoucherDomain(info["chain_id"], info["channels_contract"]))
        self.lane: str = info["operator"]  # the broker's lane: the operator's own
        self.voucher_topic = control_topic(account.address, VOUCHER)
        self.notice_topic = control_topic(account.address, NOTICE)
        self.confirmed = 0
        self.refusals = 0
        self.receipts = 0
        self.cond = threading.Condition()
        client_id = f"bench-intake-{index}"
        token = ConnectTokenSigner(key, info["chain_id"], info["operator"]).token(client_id)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        c.username_pw_set(account.address, token)
        c.on_socket_open = nodelay
        c.on_message = self._on_message
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect("127.0.0.1", info["port"])
        c.loop_start()
        c.subscribe(self.notice_topic, 1)
        if not subscribed.wait(10):
            raise RuntimeError(f"{self.address}: not subscribed to its notices")
        self.client = c
        self.vouchers: list[bytes] = []

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        from blendsm.device_sdk import Receipt, decode_any_notice

        notice = decode_any_notice(message.payload)
        with self.cond:
            if isinstance(notice, Receipt):
                self.receipts += 1
                self.confirmed = max(self.confirmed, notice.amount)
                self.cond.notify_all()
            else:
                self.refusals += 1

    def sign(self, first: int, count: int) -> int:
        """Pre-sign ``count`` vouchers above ``first``; the last amount."""
        from blendsm.device_sdk import encode_voucher

        self.vouchers = [
            encode_voucher(self.signer.sign(self.channel_id, self.lane, first + i + 1))
            for i in range(count)
        ]
        return first + count

    def send(self, i: int) -> None:
        self.client.publish(self.voucher_topic, self.vouchers[i], qos=0)

    def wait(self, amount: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.confirmed >= amount, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _scenario(
    name: str, parent: Any, payers: list[_Payer], per_payer: int, first: int, pid: int
) -> tuple[int, dict[str, Any]]:
    last = [p.sign(first, per_payer) for p in payers]
    profiling = name == "paced" and bool(os.environ.get(PROFILE_ENV))
    if profiling:
        os.kill(pid, signal.SIGUSR1)
    before = ask(parent, "stats")
    cpu0 = ask(parent, "cpu")
    t0 = time.time()
    if name == "burst":
        for i in range(per_payer):
            for p in payers:
                p.send(i)
    else:
        gap = 1.0 / PACED_RATE
        for i in range(per_payer):
            tick = t0 + i * gap
            for p in payers:
                p.send(i)
            time.sleep(max(0.0, tick + gap - time.time()))
    ok = all(p.wait(amount, WAIT_S) for p, amount in zip(payers, last, strict=True))
    elapsed = time.time() - t0
    cpu = ask(parent, "cpu") - cpu0
    if profiling:
        os.kill(pid, signal.SIGUSR2)
    after = ask(parent, "stats")
    sent = per_payer * len(payers)
    out = {k: after[k] - before[k] for k in after}
    out.update(
        sent=sent,
        all_confirmed=ok,
        cpu_us=cpu / sent * 1e6,
        elapsed_s=elapsed,
        rate=sent / elapsed,
    )
    return first + per_payer, out


def main() -> None:
    per_payer = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    n_payers = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    from blendsm.contracts import test_account

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    data_dir = tempfile.mkdtemp(prefix="bench-intake-")
    broker = ctx.Process(target=_broker_main, args=(child, data_dir, n_payers), daemon=True)
    broker.start()
    payers: list[_Payer] = []
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError("broker did not start in time")
        tag, info = parent.recv()
        if tag != "ready":
            raise RuntimeError(f"broker failed to start: {info}")
        payers = [
            _Payer(test_account(f"bench-buyer-{i}"), info, i)  # TEST-ONLY keys
            for i in range(n_payers)
        ]
        print(
            f"voucher intake: {n_payers} payers x {per_payer} vouchers, QoS 0;"
            f" paced at {PACED_RATE:.0f}/s per payer"
        )
        cpu0, t0 = ask(parent, "cpu"), time.time()
        time.sleep(IDLE_S)
        idle = (ask(parent, "cpu") - cpu0) / (time.time() - t0)
        print(
            f"  idle   broker {idle * 1e3:6.1f} ms CPU per s (chain view polling the embedded EVM)"
        )
        amount = 0
        for name in ("burst", "paced", "burst"):
            amount, out = _scenario(name, parent, payers, per_payer, amount, broker.pid)
            net = out["cpu_us"] - idle * out["elapsed_s"] / out["sent"] * 1e6
            print(
                f"  {name:6s} broker {out['cpu_us']:6.1f} us/voucher ({net:6.1f} without idle)"
                f"  {out['rate']:7.0f} vouchers/s"
                f"  sent {out['sent']}, accepted {out['accepted']}, superseded"
                f" {out['superseded']}, refused {out['refused']}, dropped {out['dropped']},"
                f" commits {out['commits']}, receipts seen {sum(p.receipts for p in payers)},"
                f" all confirmed {out['all_confirmed']}",
                flush=True,
            )
            for p in payers:
                p.receipts = 0
    finally:
        for p in payers:
            p.close()
        try:
            parent.send("stop")
            parent.poll(10)
        except (OSError, EOFError):
            pass
        broker.join(timeout=10)
        if broker.is_alive():
            broker.terminate()
            broker.join(timeout=2)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
