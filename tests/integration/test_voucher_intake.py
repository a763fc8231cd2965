"""Voucher intake end to end: vouchers that arrive together share one verification per channel
and one commit, every one of them is durable before any receipt, receipts are batched and
cumulative, a re-sent voucher is not refused, and SDK subscribers paying on the default schedule
at a steady rate are never paused for credit."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support import connect_packet, eventually, publish_packet

from blendsm.device_sdk import (
    Receipt,
    Refusal,
    decode_notice,
    encode_voucher,
    sign_voucher,
)

from .conftest import Market, Payer, split_messages

BURST = 50


def _read_notices(sock: socket.socket, until: float) -> list[Any]:
    """Decode the QoS 0 PUBLISHes the broker sends until ``until`` (monotonic) passes."""
    buffer, notices = b"", []
    sock.settimeout(0.1)
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 2:
            length, shift, index = 0, 0, 1
            while index < len(buffer) and buffer[index] & 0x80:
                length |= (buffer[index] & 0x7F) << shift
                shift, index = shift + 7, index + 1
            if index >= len(buffer):
                break
            length |= buffer[index] << shift
            end = index + 1 + length
            if len(buffer) < end:
                break
            packet, buffer = buffer[:end], buffer[end:]
            if packet[0] >> 4 == 3:  # PUBLISH, QoS 0: topic length, topic, payload
                body = packet[index + 1 :]
                topic_len = int.from_bytes(body[:2], "big")
                if body[2 : 2 + topic_len].endswith(b"/notice"):
                    notices.append(decode_notice(body[2 + topic_len :]))
    return notices


def _exchange(port: int, connect: bytes, subscribe: bytes, burst: bytes) -> list[Any]:
    """Connect, subscribe to the notices, write ``burst`` in one go and read notices for 1 s
    (blocking: run it in a thread, the broker runs on the test's event loop)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(subscribe)
        assert sock.recv(5) == b"\x90\x03\x00\x01\x00"
        sock.sendall(burst)
        return _read_notices(sock, time.monotonic() + 1.0)


@pytest.mark.parametrize("pending", [64, 4])
async def test_a_burst_of_vouchers_is_one_commit_all_durable_and_one_receipt_covers_them(
    market: Market, pending: int
) -> None:
    """50 vouchers written to the socket at once arrive within the intake's linger: one
    verification, one transaction, one Receipt for the highest; the store holds the highest
    (durable before the receipt)."""
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    service = market.service
    chain = market.chain
    address = chain.addr("buyer").lower()
    client_id = f"burst-{time.monotonic_ns()}"
    token = market.signer("buyer").token(client_id)
    payer = Payer(market, "buyer", None)
    amounts = [(i + 1) * market.price for i in range(BURST)]
    burst = b"".join(
        publish_packet(
            payer.topic,
            encode_voucher(sign_voucher(payer.key, payer.domain, channel, payer.lane, a)),
        )
        for a in amounts
    )
    subscribe = (
        b"\x82"
        + bytes([2 + 2 + len(f"blendsm/ctl/{address}/notice") + 1])
        + b"\x00\x01"
        + len(f"blendsm/ctl/{address}/notice").to_bytes(2, "big")
        + f"blendsm/ctl/{address}/notice".encode()
        + b"\x00"
    )
    connect = connect_packet(client_id, 60, username=chain.addr("buyer"), password=token)
    # Generous on a loaded machine: the whole burst is in the socket before the linger ends.
    # ``pending`` 4: past the per-session bound each newer voucher replaces the latest queued.
    service.intake.config = replace(
        service.intake.config, linger_seconds=0.3, max_pending_per_session=pending
    )
    commits, batches = service.store.commits, service.stats.voucher_batches
    notices = await asyncio.to_thread(_exchange, market.port, connect, subscribe, burst)
    await eventually(
        lambda: service.meter.paid_of(channel) == amounts[-1], 10, what="the burst accepted"
    )
    assert service.store.commits - commits == 1
    assert service.stats.voucher_batches - batches == 1
    assert service.stats.vouchers_accepted == 1
    assert service.stats.vouchers_superseded == BURST - 1
    assert service.stats.vouchers_refused == 0
    latest = await service.store.latest(channel)
    assert latest is not None
    assert latest.cumulative_amount == amounts[-1]
    assert notices == [Receipt(channel, amounts[-1], market.chain.addr("operator"))]


async def test_a_resent_voucher_is_receipted_not_refused(market: Market) -> None:
    """The payer re-sends its latest voucher (unsure it arrived): the broker holds it already,
    answers with a Receipt and counts no refusal; an older one is still refused."""
    buyer, channel = await market.channel_client("buyer")
    payer = Payer(market, "buyer", buyer)
    await payer.pay(channel, 3 * market.price)
    _, notices = split_messages(await buyer.got.drain(within=1.0, until=1), market.topic)
    assert notices == [Receipt(channel, 3 * market.price, market.chain.addr("operator"))]
    await payer.pay(channel, 3 * market.price)
    _, notices = split_messages(await buyer.got.drain(within=1.0, until=1), market.topic)
    assert notices == [Receipt(channel, 3 * market.price, market.chain.addr("operator"))]
    assert market.service.stats.vouchers_refused == 0
    assert market.service.stats.vouchers_repeated == 1
    await payer.pay(channel, 2 * market.price)
    _, notices = split_messages(await buyer.got.drain(within=1.0, until=1), market.topic)
    assert len(notices) == 1
    assert isinstance(notices[0], Refusal)
    assert notices[0].code == "not_newer"


async def test_sdk_subscribers_on_the_default_schedule_are_never_paused_for_credit(
    market: Market, tmp_path: Path
) -> None:
    """Two SDK subscribers with the default ``pay_every``, a device publishing at a steady 100
    messages/s for 3 s: no delivery is paused for credit, no payment request, no voucher
    refused or dropped; the SDK gets far fewer receipts than it sends vouchers and still sees
    everything confirmed. The credit (20 messages, 200 ms here) must cover a voucher's round
    trip; 5 messages (50 ms) is less than a shared 2-core test machine can promise for the
    threads of this one process (subscribers, publisher, broker), so it is raised as in
    test_accounting."""
    service = market.service
    service.meter.credit_messages = 20
    subscribers, channels = [], []
    for label in ("buyer", "buyer2"):
        sub = market.sdk_subscriber(label)
        channel = await sub.open_channel(market.mp(label), market.chain.addr("seller"), 10**16)
        await market.wait_channel(channel)
        await asyncio.to_thread(sub.connect)
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        subscribers.append(sub)
        channels.append(channel)
    device = market.sdk_publisher(tmp_path / "device")
    await asyncio.to_thread(device.connect)
    messages, gap = 300, 0.01
    stop = threading.Event()

    def publish() -> None:
        start = time.monotonic()
        for i in range(messages):
            if stop.is_set():
                return
            device.publish(market.topic, b"%063d" % i, qos=0)
            time.sleep(max(0.0, start + (i + 1) * gap - time.monotonic()))

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        await eventually(
            lambda: all(s.stats.paid_messages == messages for s in subscribers),
            30,
            what="every message delivered",
        )
    finally:
        stop.set()
        await asyncio.to_thread(publisher.join)
        await asyncio.to_thread(device.disconnect)
    try:
        total = messages * market.price
        for sub, channel in zip(subscribers, channels, strict=True):
            assert await asyncio.to_thread(sub.wait_confirmed, channel, total, 5.0)
            assert sub.stats.refusals == 0
            assert sub.stats.receipts < sub.stats.vouchers_sent / 2
        assert service.meter.denied_no_credit == 0
        assert service.stats.payment_requests == 0
        assert service.stats.vouchers_refused == 0
        assert service.stats.control_dropped == 0
    finally:
        for sub in subscribers:
            await asyncio.to_thread(sub.disconnect)


async def test_when_the_loops_turns_are_long_a_batchs_vouchers_are_not_one_per_turn(
    market: Market,
) -> None:
    """One signature recovery per loop turn keeps paced deliveries from waiting behind a
    batch's; but when every turn is long anyway (a publisher's burst is read in 10 ms
    slices), that held each payer's credit a turn per voucher ahead of it. A callback that
    makes every turn last 5 ms stands for the burst: six channels' vouchers of one batch
    are verified within three turns (two, unless the machine stalls the run), not six."""
    service = market.service
    service.intake.config = replace(service.intake.config, linger_seconds=0.2)
    payers = []
    for label in ("buyer", "buyer", "buyer", "buyer2", "buyer2", "buyer2"):
        client, channel = await market.channel_client(label)
        payers.append((Payer(market, label, client), channel))
    turns = 0
    hogging = True

    def hog() -> None:  # a long loop turn, again and again
        nonlocal turns
        turns += 1
        time.sleep(0.005)
        if hogging:
            asyncio.get_running_loop().call_soon(hog)

    verified_in: list[int] = []
    verify = service.intake._verify

    def counted(entry: Any) -> Any:
        verified_in.append(turns)
        return verify(entry)

    service.intake._verify = counted  # the real check, observed
    batches = service.stats.voucher_batches
    try:
        for payer, channel in payers:  # all six within the linger: one batch
            await payer.pay(channel, market.price)
        asyncio.get_running_loop().call_soon(hog)
        await eventually(
            lambda: all(service.meter.paid_of(c) == market.price for _, c in payers),
            10,
            what="the six vouchers accepted",
        )
    finally:
        hogging = False
        del service.intake._verify
    assert service.stats.voucher_batches - batches == 1
    assert len(verified_in) == 6
    assert verified_in[-1] - verified_in[0] <= 2, verified_in  # one per turn: 5


async def test_vouchers_no_delivery_waits_for_share_one_commit(market: Market) -> None:
    """Two payers' vouchers 0.2 s apart, nothing held for credit: the first waits for the
    second (``unawaited_linger_seconds``) and both are one commit, one fsync. Without that
    linger each was a commit of its own (the intake's 0.5 ms burst linger is long over)."""
    service = market.service
    service.intake.config = replace(service.intake.config, unawaited_linger_seconds=1.0)
    payers = []
    for label in ("buyer", "buyer2"):
        client, channel = await market.channel_client(label)
        payers.append((Payer(market, label, client), channel))
    batches, commits = service.stats.voucher_batches, service.store.commits
    (first, first_channel), (second, second_channel) = payers
    await first.pay(first_channel, market.price)
    await asyncio.sleep(0.2)
    assert service.meter.paid_of(first_channel) == 0  # still lingering: nobody waits
    await second.pay(second_channel, market.price)
    await eventually(
        lambda: all(service.meter.paid_of(c) == market.price for _, c in payers),
        5,
        what="both vouchers accepted",
    )
    assert service.stats.voucher_batches - batches == 1
    assert service.store.commits - commits == 1


async def test_a_fast_payers_voucher_lingers_a_quarter_of_its_pace(market: Market) -> None:
    """A payer's second voucher 0.4 s after its first lingers at most 0.1 s (a quarter of
    that gap: about a quarter of the time its credit lasts), not the 5 s set here: the
    batch holding both is taken at once, though no delivery waits on it."""
    service = market.service
    service.intake.config = replace(service.intake.config, unawaited_linger_seconds=5.0)
    client, channel = await market.channel_client("buyer")
    payer = Payer(market, "buyer", client)
    await payer.pay(channel, market.price)
    await asyncio.sleep(0.4)
    assert service.meter.paid_of(channel) == 0  # the first lingers: its pace is not known
    await payer.pay(channel, 2 * market.price)
    await eventually(
        lambda: service.meter.paid_of(channel) == 2 * market.price, 2, what="both counted"
    )
