"""Fault injection, bounded and seeded: the broker process SIGKILLed at random moments of paid
streaming, over and over, against one anvil node; then the money and the data are checked
against the chain and the broker's SQLite stores.

The seed is printed; ``BLENDSM_FAULT_SEED`` replays a run, ``BLENDSM_FAULT_ROUNDS`` changes
the number of kills (20 in CI)."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import select
import signal
import socket
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import (
    Client,
    anchor_logs,
    anchored_sequences,
    claim_logs,
    confirmed_batches,
    confirmed_claims,
    connect_packet,
    eventually,
    leaf_sequences,
    leaf_times,
    open_claims,
    poll,
    read_packet,
    remaining_length,
    stored_delivered,
    stored_voucher,
    subscribe_packet,
)
from support.raw import PUBACK

from blendsm.broker import PaymentsConfig, SettlementConfig
from blendsm.contracts import free_port
from blendsm.device_sdk import (
    ConnectTokenSigner,
    Publisher,
    Quote,
    Receipt,
    decode_any_notice,
    decode_envelope,
)

from .conftest import (
    Participants,
    StartProxiedBroker,
    enrol_market,
    open_channel,
    proxied_config,
    voucher_payload,
)

PRICE = 1_000
TOPIC = "paid/faults"
ROUNDS = int(os.environ.get("BLENDSM_FAULT_ROUNDS", "20"))
STREAM_SECONDS = (0.2, 1.5)
"""Each round streams for a seeded random time in this range, then the broker is killed."""
RATE = 100
CREDIT = 20
"""Messages a channel may owe (the broker's ``payments.credit_messages``)."""
"""Device messages per second while streaming."""


def _seed() -> int:
    given = os.environ.get("BLENDSM_FAULT_SEED")
    return int(given) if given else random.SystemRandom().randrange(2**32)


@dataclass
class Buyer:
    """A raw paying subscriber with the SDK's rule: pays a cumulative voucher for every paid
    message it gets, and when a subscription is quoted after a kill raises its count to what
    the broker says it charged (the messages lost in flight with the killed broker), never
    lowers it.

    It cannot tell a free re-send after a crash (delivered uncharged, and it may reach the
    buyer before the Quote) from a new message, so it pays for it too, as the SDK does: the
    broker takes that voucher as credit above its delivered value and never claims it. A
    buyer that lowered its count to a Quote's ``charged`` (this test's earlier model) signed
    vouchers below one the broker already held, refused ``not_newer`` for the rest of the
    run (fault seed 3210706479)."""

    client: Client
    chain: Any
    channel: bytes
    amount: int = 0
    receipts: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    """Indexes of the device messages received (their payloads end in the index)."""
    topic: str = TOPIC

    def resend(self) -> None:
        """Send the latest voucher again (one lost with a killed broker, or dropped)."""
        topic = f"blendsm/ctl/{self.chain.addr('buyer').lower()}/voucher"
        payload = voucher_payload(self.chain, "buyer", self.channel, self.amount)
        self.client.mqtt.publish(topic, payload, qos=0)

    def pump(self) -> None:
        """Handle what arrived: quotes set the base, messages are paid, receipts kept."""
        while True:
            try:
                m = self.client.got.messages.get_nowait()
            except queue.Empty:
                return
            if m.topic == self.topic:
                self.received.append(int(decode_envelope(m.payload).payload.split()[-1]))
                self.amount += PRICE
                topic = f"blendsm/ctl/{self.chain.addr('buyer').lower()}/voucher"
                self.client.mqtt.publish(
                    topic, voucher_payload(self.chain, "buyer", self.channel, self.amount), qos=0
                )
            elif m.topic.endswith("/notice"):
                notice = decode_any_notice(m.payload)
                if isinstance(notice, Quote):
                    self.amount = max(self.amount, notice.charged)
                elif isinstance(notice, Receipt):
                    self.receipts.append(notice.amount)


async def _connect_buyer(chain: Any, port: int, buyer: Buyer | None, channel: bytes) -> Buyer:
    signer = ConnectTokenSigner(
        bytes(chain.accounts["buyer"].key), chain.deployment.chain_id, chain.addr("operator")
    )
    deadline = time.monotonic() + 20
    while True:
        c = Client("127.0.0.1", port, account=chain.accounts["buyer"], signer=signer)
        if await c.connect() == 0:
            break
        c.close()
        assert time.monotonic() < deadline, "buyer could not connect"
        await asyncio.sleep(0.1)
    assert await c.subscribe(f"blendsm/ctl/{chain.addr('buyer').lower()}/notice") == [0]
    assert await c.subscribe(TOPIC) == [0]
    if buyer is None:
        return Buyer(c, chain, channel)
    buyer.client = c
    return buyer


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_random_sigkills_lose_no_voucher_or_leaf_and_settle_each_once(
    chain: Any, mp: Any, tmp_path: Path, broker_process: Any
) -> None:
    metrics_port = free_port()
    counted: Counter[str] = Counter()  # broker counters summed over runs, read before each kill
    seed = _seed()
    rng = random.Random(seed)
    print(f"\nfault seed {seed} (BLENDSM_FAULT_SEED={seed} replays it), {ROUNDS} kills")
    await enrol_market(mp, chain, TOPIC, price=PRICE, buyers=("buyer",))
    channel = await open_channel(mp, chain, "buyer")
    broker = broker_process(
        payments={
            "credit_messages": CREDIT,
            "settlement": {"threshold": str(10 * PRICE), "interval_seconds": 0.5},
        },
        anchoring={"batch_seconds": 0.3, "batch_max_leaves": 20, "unsold_batch_seconds": 0},
        metrics={"port": metrics_port},
    )
    vouchers_db = tmp_path / "data" / "vouchers.sqlite3"
    leaves_db = tmp_path / "data" / "leaves.sqlite3"
    device = Publisher(
        chain.accounts["device"],
        host="127.0.0.1",
        port=broker.port,
        broker=chain.addr("operator"),
        chain_id=chain.deployment.chain_id,
        registry=chain.deployment.address("Registry"),
        state_dir=tmp_path / "device",
        reconnect_max_delay=0.3,
    )
    sequences: dict[int, int] = {}  # device sequence -> message index
    buyer: Buyer | None = None
    windows: list[tuple[float, float]] = []  # (subscribed, killed) per round, wall clock
    proc = broker.start()
    started = time.monotonic()
    try:
        device.start()
        for round_ in range(ROUNDS):
            buyer = await _connect_buyer(chain, broker.port, buyer, channel)
            subscribed = time.time()
            stream_for = rng.uniform(*STREAM_SECONDS)
            until = time.monotonic() + stream_for
            while time.monotonic() < until:
                index = len(sequences)
                sequences[device.publish(TOPIC, b"m %d" % index, qos=1)] = index
                buyer.pump()
                await asyncio.sleep(1 / RATE)
            counted.update(await asyncio.to_thread(_scrape, metrics_port))
            proc.send_signal(signal.SIGKILL)  # vouchers, deliveries, claims, batches in flight
            proc.wait(10)
            windows.append((subscribed, time.time()))
            await asyncio.sleep(0.1)
            buyer.pump()
            buyer.client.close()
            # Every voucher the broker acknowledged (a Receipt) survived the kill.
            held = stored_voucher(vouchers_db, channel)
            assert held >= max(buyer.receipts, default=0), (round_, held, buyer.receipts[-3:])
            proc = broker.start()

        # The last run: everything queued at the device lands, is paid, claimed and anchored.
        buyer = await _connect_buyer(chain, broker.port, buyer, channel)
        flushing = asyncio.create_task(asyncio.to_thread(device.flush, 60))
        while not flushing.done():
            buyer.pump()
            await asyncio.sleep(0.01)
        await flushing
        await asyncio.sleep(0.5)
        buyer.pump()
        counted.update(await asyncio.to_thread(_scrape, metrics_port))

        looks = 0

        def settled() -> bool:
            nonlocal looks
            assert buyer is not None
            buyer.pump()
            looks += 1
            if stored_voucher(vouchers_db, channel) == buyer.amount:
                return True
            if looks % 100 == 0:  # about once a second, as the SDK does on a PaymentRequest
                buyer.resend()
            return False

        if not await poll(settled, 20):
            raise AssertionError(
                f"the last voucher not stored: {stored_voucher(vouchers_db, channel)} held,"
                f" {buyer.amount} signed, receipts {buyer.receipts[-3:]},"
                f" counters {await asyncio.to_thread(_scrape, metrics_port)}"
            )
        final = stored_voucher(vouchers_db, channel)

        # Settled: no claim intent left undecided, and the chain holds the highest claim the
        # broker could make: within a credit of the delivered value it stored, never above it
        # (a kill sets that back by the deliveries since its last write) nor above the latest
        # voucher. The latest voucher may stay above the delivered value by what the buyer
        # paid for free re-sends and for deliveries a killed broker forgot: never claimed.
        def claims_settled() -> bool:
            logs = claim_logs(chain, channel)
            delivered = stored_delivered(vouchers_db, channel)
            return (
                open_claims(vouchers_db, channel) == 0
                and bool(logs)
                and delivered - CREDIT * PRICE <= logs[-1][0] <= min(final, delivered)
            )

        await eventually(claims_settled, 30, what="the last claim on chain, none undecided")
        await eventually(
            lambda: anchored_sequences(leaves_db, TOPIC) == set(sequences),
            30,
            what="every device message anchored in a confirmed batch",
        )
    finally:
        device.close()
        if buyer is not None:
            buyer.client.close()
        broker.stop(proc)
    elapsed = time.monotonic() - started

    # Claims: exactly once each, strictly increasing, their payouts summing to the claim.
    claims = claim_logs(chain, channel)
    amounts = [a for a, _ in claims]
    assert amounts == sorted(set(amounts))
    assert sum(p for _, p in claims) == amounts[-1]
    assert confirmed_claims(vouchers_db, channel) == len(claims)
    # Anchors: each batch once, ids increasing, the store's confirmed batches are the chain's.
    anchors = anchor_logs(chain)
    ids = [b for b, _, _ in anchors]
    assert ids == sorted(set(ids))
    assert confirmed_batches(leaves_db) == {b: root for b, root, _ in anchors}
    assert sum(n for _, _, n in anchors) >= len(sequences)

    assert buyer is not None
    missed = set(sequences.values()) - set(buyer.received)
    print(
        f"{ROUNDS} kills in {elapsed:.1f}s: {len(sequences)} messages, all anchored in"
        f" {len(anchors)} batches (none twice); {len(claims)} claims up to {amounts[-1]} wei"
        f" (none twice; latest voucher {final}, delivered value"
        f" {stored_delivered(vouchers_db, channel)}); buyer received {len(buyer.received)} ({len(set(buyer.received))} distinct),"
        f" never received {len(missed)}"
    )
    _report_missed(leaves_db, sequences, set(buyer.received), windows)
    print(f"broker counters (summed over runs, read before each kill): {dict(counted)}")


def _scrape(port: int) -> Counter[str]:
    """The broker's delivery counters from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    wanted = (
        "paid_deliveries",
        "deliveries_denied",
        "deliveries_denied_no_credit",
        "duplicates",
        "inflight_dropped",
        "offline",
        "notices_dropped",
        "control_dropped",
        "envelopes_refused",
        "vouchers_",
        "resends_delivered",
        "leaves_unhanded",
        "handoff_timeouts",
    )
    found: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("blendsm_") and not line.startswith("#"):
            name, _, value = line.partition(" ")
            short = name.removeprefix("blendsm_").removesuffix("_total")
            if short.startswith(wanted) and "{" not in short:
                found[short] += int(float(value))
    return found


def _report_missed(
    leaves_db: Path,
    sequences: dict[int, int],
    received: set[int],
    windows: list[tuple[float, float]],
) -> None:
    """Print where the messages the buyer never got were when it was connected (figures for
    the issue's note)."""
    stored = leaf_times(leaves_db, TOPIC)
    during = [
        seq
        for seq, at in stored.items()
        if sequences[seq] not in received and any(a <= at < b for a, b in windows)
    ]
    before_kill = sorted(
        round(at - next(b for a, b in windows if a <= at < b), 3)
        for seq, at in stored.items()
        if seq in during
    )
    last = sum(1 for t in before_kill if t > -0.2)
    print(
        f"stored as leaves while the buyer was subscribed and never delivered to it:"
        f" {len(during)}, {last} of them in the last 0.2 s before a kill (compare with"
        f" deliveries_denied_no_credit below: refused for credit, counted and logged)"
    )


async def reconnect_until(
    device: Any, token: ConnectTokenSigner, address: str, done: Any, *, within: float
) -> bool:
    """Keep ``device`` connected, with a fresh CONNECT token for each attempt, until ``done()``
    holds or ``within`` seconds pass. paho sends its unacknowledged messages again after each
    accepted CONNECT; a refused CONNECT or a closed connection is tried again, as a device
    does (paho's own retries reuse the first token, which the broker no longer takes)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if done():
            return True
        if device.mqtt.is_connected():
            await asyncio.sleep(0.05)
            continue
        device.mqtt.loop_stop()
        while not device.got.connack.empty():
            device.got.connack.get_nowait()
        device.mqtt.username_pw_set(address, token.token(device.client_id))
        try:
            await asyncio.to_thread(device.mqtt.reconnect)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        device.mqtt.loop_start()
        try:
            code = await asyncio.to_thread(device.got.connack.get, True, 5)
        except queue.Empty:
            code = -1
        if code != 0:
            await asyncio.sleep(0.5)
    return done()


OUTAGE = float(os.environ.get("BLENDSM_OUTAGE_SECONDS", "6"))
"""How long the chain node stays away (6 s in CI; the issue's 60 s is run by hand with
``BLENDSM_OUTAGE_SECONDS=60``)."""


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_chain_node_outage_fails_closed_then_claims_and_anchors_land(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    proxied_broker: StartProxiedBroker,
) -> None:
    await enrol_market(mp, chain, "paid/o", price=PRICE, buyers=("buyer",))
    channel = await open_channel(mp, chain, "buyer")
    config = proxied_config(
        chain,
        tmp_path / "data",
        payments={"settlement": {"threshold": 1, "interval_seconds": 0.5}},
        anchoring={"batch_seconds": 0.3, "unsold_batch_seconds": 0},
    )
    # A 2 s staleness bound: under CI load the view once lagged 1.1 s behind before the
    # outage (the bound of 1 s failed the first paid messages closed); the outage is 6 s.
    proxied = await proxied_broker(
        config,
        max_staleness=2.0,
        settler_options={"backoff_base": 0.5, "backoff_max": 1.0, "tick": 0.1},
    )
    running, proxy, view = proxied.running, proxied.proxy, proxied.view
    service = running.service
    vouchers_db = config.data_dir / "vouchers.sqlite3"
    leaves_db = config.data_dir / "leaves.sqlite3"
    market = Participants(chain, running.port)
    try:
        await eventually(lambda: view.channel(channel) is not None, 10, what="channel seen")
        buyer, device, anon = market.client("buyer"), market.client("device"), market.client(None)
        for c in (buyer, device, anon):
            assert await c.connect() == 0
        assert await buyer.subscribe(f"blendsm/ctl/{chain.addr('buyer').lower()}/notice") == [0]
        assert await buyer.subscribe("paid/o") == [0]
        assert await anon.subscribe("public/o") == [0]
        paid = Buyer(buyer, chain, channel, topic="paid/o")
        for i in range(5):
            await device.publish("paid/o", b"m %d" % i, qos=1)
        await eventually(lambda: (paid.pump(), len(paid.received) == 5)[1], 5, what="5 paid")

        await proxy.stop()  # the node goes away
        await eventually(lambda: not view.healthy, 5, what="the chain view unhealthy")
        outage_started = time.monotonic()
        # A device's QoS 1 message now cannot be decided: it is not acknowledged (the
        # connection is closed), so paho keeps it and sends it again once it is back.
        device.sequence += 1
        assert device.envelope_signer is not None
        during = device.envelope_signer.sign(
            "paid/o", b"during 100", device.sequence, int(time.time() * 1000)
        ).encode()
        unacked = device.mqtt.publish("paid/o", during, qos=1)
        assert await device.wait_disconnected(5), "a QoS 1 PUBLISH was taken while undecidable"
        assert not unacked.is_published()
        checks = 0
        while time.monotonic() - outage_started < OUTAGE:
            # market decisions fail closed; public topics and the broker keep running
            await anon.publish("public/o", b"alive %d" % checks)
            assert [m.payload for m in await anon.got.drain(within=0.5)] == [b"alive %d" % checks]
            paid.pump()
            assert len(paid.received) == 5, "a paid message went out while the chain was away"
            late = market.client("buyer")
            assert await late.connect() == 5
            late.close()
            checks += 1
            await asyncio.sleep(0.5)
        failures = service.settler.failures if service.settler is not None else 0

        await proxy.start()  # the node is back
        await eventually(lambda: view.healthy, 15, what="the chain view healthy again")
        # The device comes back with a fresh CONNECT token (paho gives up after the refusals
        # of the outage) and sends its unacknowledged message again (DUP): stored now. A busy
        # machine can see the view lag past its 2 s bound again just after the recovery (the
        # CONNECT refused, or the message again not acknowledged): the device tries again.
        key = bytes(chain.accounts["device"].key)
        token = ConnectTokenSigner(key, chain.deployment.chain_id, chain.addr("operator"))
        assert await reconnect_until(
            device,
            token,
            chain.addr("device"),
            lambda: device.sequence in leaf_sequences(leaves_db, "paid/o"),
            within=30,
        ), "the message refused while the chain was away, not stored after it came back"
        for i in range(5, 10):
            await device.publish("paid/o", b"m %d" % i, qos=1)
        await eventually(
            lambda: (paid.pump(), stored_voucher(vouchers_db, channel) == paid.amount > 0)[1],
            10,
            what="the buyer's vouchers stored after the outage",
        )
        final = stored_voucher(vouchers_db, channel)
        await eventually(
            lambda: [a for a, _ in claim_logs(chain, channel)][-1:] == [final],
            30,
            what="the latest voucher claimed on chain",
        )
        await eventually(
            lambda: anchored_sequences(leaves_db, "paid/o") == leaf_sequences(leaves_db, "paid/o"),
            30,
            what="every stored leaf anchored",
        )
        fresh = market.client("buyer")
        assert await fresh.connect() == 0  # the market is open again
    finally:
        market.close()
    anchors = anchor_logs(chain)
    assert [b for b, _, _ in anchors] == sorted({b for b, _, _ in anchors})
    assert confirmed_batches(leaves_db) == {b: root for b, root, _ in anchors}
    amounts = [a for a, _ in claim_logs(chain, channel)]
    assert amounts == sorted(set(amounts))
    print(
        f"\nchain node away {OUTAGE:.0f}s: {checks} fail-closed checks, {failures} claim"
        f" failures while away; afterwards {len(amounts)} claims up to {final} wei and"
        f" {len(anchors)} batches anchored ({len(leaf_sequences(leaves_db, 'paid/o'))} leaves)"
    )


async def test_a_paid_message_refused_for_credit_is_counted_per_channel_and_logged(
    start_market: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A connected subscriber that does not pay gets its credit's worth; each message past
    it is held for a voucher, then (none came within ``payments.hold_seconds``) dropped,
    counted on its channel and logged (rate-limited), never silently lost."""
    caplog.set_level(logging.INFO)
    market = await start_market(
        payments=PaymentsConfig(
            credit_messages=5, hold_seconds=0.3, settlement=SettlementConfig(interval_seconds=3600)
        )
    )
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    device = await market.connected_device()
    credit = market.service.meter.credit_messages
    for i in range(credit + 3):
        await device.publish(market.topic, b"m %d" % i, qos=1)
    got = [m for m in await buyer.got.drain(within=1.0) if m.topic == market.topic]
    assert len(got) == credit
    account = market.service.meter.accounts[channel]
    for _ in range(300):
        if account.denied_no_credit == 3:
            break
        await asyncio.sleep(0.01)
    assert account.denied_no_credit == 3
    assert market.service.stats.deliveries_held_dropped == 3
    dropped = [r.getMessage() for r in caplog.records if "waiting for credit" in r.getMessage()]
    assert len(dropped) == 1, dropped  # rate-limited too
    lines = [r.getMessage() for r in caplog.records if "refused for credit" in r.getMessage()]
    assert len(lines) == 1, lines  # rate-limited: one line, the rest counted
    assert market.topic in lines[0]
    assert channel.hex() in lines[0]


def _raw_connect(market: Any, label: str, client_id: str) -> socket.socket:
    """A raw-socket client for ``label`` (blocking), CONNECT accepted."""
    token = market.signer(label).token(client_id)
    address = market.chain.accounts[label].address
    sock = socket.create_connection((market.host, market.port), timeout=5)
    sock.sendall(connect_packet(client_id, 60, username=address, password=token))
    return sock


def _qos1_publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + remaining_length(len(body)) + body


async def test_a_puback_means_the_message_was_already_written_to_the_subscribers(
    start_market: Any,
) -> None:
    """A kill right after a device's PUBACK must not lose the message for the connected
    subscribers: the broker acknowledges a QoS 1 market message only once the fan-out wrote
    it. The broker shares this test's event loop, so the test checks between two of its
    turns: the moment the PUBACK is readable, the subscriber's copy must be readable too
    (the broker stopped there, as a SIGKILL would stop it). amqtt acknowledged when it
    queued the message, two loop turns or more before the fan-out wrote it."""
    market = await start_market()
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    sub = await asyncio.to_thread(_raw_connect, market, "buyer", "ack-order-buyer")
    dev = await asyncio.to_thread(_raw_connect, market, "device", "ack-order-device")
    try:
        for sock in (sub, dev):
            got = await asyncio.to_thread(read_packet, sock)
            assert got is not None
            assert (got.kind, got.body[1]) == (2, 0)
        sub.sendall(subscribe_packet(1, market.topic, 0))
        suback = await asyncio.to_thread(read_packet, sub)
        assert suback is not None
        assert suback.kind == 9
        assert suback.body[2:] == b"\x00"
        signer = market.envelope_signer("device")
        now = int(time.time() * 1000)
        for i in range(1, 6):  # within the credit: each one is delivered
            envelope = signer.sign(market.topic, b"ordered %d" % i, i, now).encode()
            dev.sendall(_qos1_publish(market.topic, i, envelope))
            deadline = time.monotonic() + 10
            while not _readable(dev):  # one broker turn at a time
                assert time.monotonic() < deadline, "no PUBACK"
                await asyncio.sleep(0)
            readable = _readable(sub)  # nothing ran on the loop since the PUBACK was seen
            puback = read_packet(dev, 1)
            assert puback is not None
            assert (puback.kind, puback.packet_id) == (PUBACK, i)
            assert readable, f"message {i} acknowledged before it was written to the subscriber"
            got = [p for p in _drain(sub) if p.kind == 3 and p.topic == market.topic]
            assert [p.payload for p in got] == [envelope]
    finally:
        sub.close()
        dev.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _drain(sock: socket.socket) -> list[Any]:
    """Every packet already in ``sock``'s buffer (none waited for)."""
    packets = []
    while _readable(sock):
        packet = read_packet(sock, 1)
        if packet is None:
            break
        packets.append(packet)
    return packets
