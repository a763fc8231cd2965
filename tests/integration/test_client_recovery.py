"""Clients after a broker restart: the broker process is SIGKILLed during paid streaming and
restarted on the same port and data dir (a real ``blendsm broker`` subprocess on anvil, real
SDK Publisher and Subscriber). The buyer must be paying again soon after the broker listens,
with no voucher refused, and every stored voucher must become visible to it as a Receipt.

``BLENDSM_RECOVERY_KILLS`` (default 3) sets the number of kills of the streaming test, and
``BLENDSM_RECOVERY_SEED`` its seed (printed); docs/benchmarks.md has the figures over 20 kills:
``BLENDSM_RECOVERY_KILLS=20 pytest tests/integration/test_client_recovery.py -k streaming -s``.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import poll

from blendsm.device_sdk import (
    PaymentEvent,
    PaymentEventKind,
    Publisher,
    ReceivedMessage,
    Subscriber,
)
from blendsm.errors import BrokerConnectionError, BrokerRefusedError

from .conftest import enrol_market, open_channel

PRICE = 1_000
TOPIC = "paid/r"
KILLS = int(os.environ.get("BLENDSM_RECOVERY_KILLS", "3"))
BOUND = 6.0
"""Seconds from the restarted broker listening to the buyer paying again: a generous bound for
a loaded 2-core machine (measured: the printed figures; 20 kills in docs/benchmarks.md)."""


@dataclass
class Tape:
    """What the Subscriber's callbacks reported, with monotonic times (threads append)."""

    messages: list[float] = field(default_factory=list)
    receipts: list[tuple[float, int]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, sub: Subscriber) -> None:
        sub.on_message = self._message
        sub.on_payment = self._payment

    def _message(self, _sub: Subscriber, message: ReceivedMessage) -> None:
        if message.paid:
            with self.lock:
                self.messages.append(time.monotonic())

    def _payment(self, _sub: Subscriber, event: PaymentEvent) -> None:
        with self.lock:
            if event.kind is PaymentEventKind.RECEIPT:
                self.receipts.append((time.monotonic(), event.amount or 0))
            elif event.kind is PaymentEventKind.REFUSAL:
                self.refusals.append(event.detail)

    def first_after(self, since: float) -> tuple[float | None, float | None]:
        """Seconds after ``since`` to the first paid message and the first receipt."""
        with self.lock:
            msg = next((t - since for t in self.messages if t >= since), None)
            rec = next((t - since for t, _ in self.receipts if t >= since), None)
        return msg, rec


def _subscriber(chain: Any, port: int) -> Subscriber:
    deployment = chain.deployment
    return Subscriber(
        chain.accounts["buyer"],
        host="127.0.0.1",
        port=port,
        broker=chain.addr("operator"),
        chain_id=deployment.chain_id,
        channels_contract=deployment.address("PaymentChannels"),
    )


def _publisher(chain: Any, port: int, state_dir: Path) -> Publisher:
    deployment = chain.deployment
    return Publisher(
        chain.accounts["device"],
        host="127.0.0.1",
        port=port,
        broker=chain.addr("operator"),
        chain_id=deployment.chain_id,
        registry=deployment.address("Registry"),
        state_dir=state_dir,
        reconnect_max_delay=1.0,  # the device back as fast as the buyer: data to pay for
    )


async def _connect(client: Subscriber | Publisher) -> None:
    """Connect, retrying while the fresh broker has not read the chain yet."""
    deadline = time.monotonic() + 20
    while True:
        try:
            client.connect(5)
            return
        except (BrokerRefusedError, BrokerConnectionError):
            assert time.monotonic() < deadline, "could not connect"
            await poll(lambda: False, 0.2)


async def _market(mp: Any, chain: Any) -> bytes:
    await enrol_market(mp, chain, TOPIC, price=PRICE, buyers=("buyer",))
    return await open_channel(mp, chain, "buyer")


def _kill(proc: Any) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_stored_voucher_whose_receipt_died_with_the_broker_is_confirmed_after_restart(
    chain: Any, mp: Any, tmp_path: Path, broker_process: Any
) -> None:
    """Receipts are batched QoS 0 notices: the broker here holds them for 60 s after the
    first, so when it is killed the last vouchers are stored but never confirmed. After the
    restart the SDK re-sends its latest voucher and the broker answers with a Receipt."""
    channel = await _market(mp, chain)
    broker = broker_process(
        payments={"intake": {"receipt_every": 10_000, "receipt_delay_seconds": 60}}
    )
    proc = broker.start()
    sub = _subscriber(chain, broker.port)
    tape = Tape()
    tape.attach(sub)
    pub = _publisher(chain, broker.port, tmp_path / "device")
    try:
        await _connect(sub)
        sub.subscribe(TOPIC)
        await _connect(pub)
        pub.publish(TOPIC, b"first")
        assert await poll(lambda: sub.confirmed(channel) == PRICE, 10)  # first receipt: at once
        for i in range(4):
            pub.publish(TOPIC, b"m%d" % i)
        assert await poll(lambda: sub.vouchered(channel) == 5 * PRICE, 10)
        await poll(lambda: False, 0.5)  # the broker stores it (receipt held back)
        assert sub.confirmed(channel) == PRICE
        _kill(proc)
        proc = broker.start()
        listening = time.monotonic()
        assert await poll(lambda: sub.confirmed(channel) == 5 * PRICE, BOUND)
        print(f"\nconfirmed {time.monotonic() - listening:.2f} s after the broker listened")
        assert tape.refusals == []
        assert sub.spent == 5 * PRICE  # the re-sent voucher cost nothing new
    finally:
        pub.close()
        sub.disconnect()
        broker.stop(proc)


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_streaming_buyer_pays_again_soon_after_each_kill_without_refusals(
    chain: Any, mp: Any, tmp_path: Path, broker_process: Any
) -> None:
    seed = int(os.environ.get("BLENDSM_RECOVERY_SEED", random.randrange(2**32)))
    print(f"\nseed {seed}, {KILLS} kills")
    rng = random.Random(seed)
    channel = await _market(mp, chain)
    broker = broker_process()
    proc = broker.start()
    sub = _subscriber(chain, broker.port)
    tape = Tape()
    tape.attach(sub)
    pub = _publisher(chain, broker.port, tmp_path / "device")
    stop = threading.Event()

    def stream() -> None:  # ~50 messages/s through the durable outbox, across the kills
        i = 0
        while not stop.wait(0.02):
            pub.publish(TOPIC, b"r%d" % i)
            i += 1

    streamer = threading.Thread(target=stream, daemon=True)
    to_message: list[float] = []
    to_receipt: list[float] = []
    try:
        await _connect(sub)
        sub.subscribe(TOPIC)
        await _connect(pub)
        streamer.start()
        assert await poll(lambda: sub.confirmed(channel) > 0, 10)
        for kill in range(KILLS):
            await poll(lambda: False, rng.uniform(0.3, 1.5))  # vouchers in flight
            _kill(proc)
            await poll(lambda: False, 3.0)
            proc = broker.start()
            listening = time.monotonic()
            back = functools.partial(tape.first_after, listening)
            assert await poll(lambda: None not in back(), 3 * BOUND), (  # noqa: B023 (awaited here)
                f"kill {kill}: the buyer did not pay again"
            )
            msg, rec = back()
            assert msg is not None
            assert rec is not None
            to_message.append(msg)
            to_receipt.append(rec)
        stop.set()
        streamer.join(5)
        pub.flush(20)
        sub.pay_outstanding()
        assert await poll(lambda: sub.confirmed(channel) == sub.vouchered(channel), 10)
    finally:
        stop.set()
        pub.close()
        sub.disconnect()
        broker.stop(proc)
    for name, figures in (("paid message", to_message), ("receipt", to_receipt)):
        print(
            f"restart -> first {name}: median {statistics.median(figures):.2f} s,"
            f" worst {max(figures):.2f} s over {len(figures)} kills"
        )
    print(f"refusals: {len(tape.refusals)} {tape.refusals[:3]}")
    assert tape.refusals == []
    assert max(to_receipt) < BOUND
    assert max(to_message) < BOUND
