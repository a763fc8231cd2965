"""Backpressure with a real subscriber that stops reading its socket (issue 11).

The non-reading client is a raw socket with a 4 KiB receive buffer that subscribes and then
never reads. To fill the kernel quickly, the broker's send buffer for that one connection is
shrunk in-process (otherwise Linux autotunes it to megabytes and the test would need a flood of
that size before the broker's own buffer is used at all); nothing else about the broker is
touched. What is measured is the broker's memory for that connection: its asyncio transport's
write buffer and the deliveries it holds (``Flow.held()``), sampled while the flood runs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import pytest
from support import Client, connect_packet, eventually, publish_packet, subscribe_packet

from blendsm.broker import SessionsConfig

from .conftest import PRICE, Market, StartMarket, voucher_payload

BOUND = 64 * 1024
"""``sessions.max_outgoing_bytes`` in these tests (the default is 1 MiB)."""
SIZE = 2048
"""Payload bytes of each flooded message."""
FLOOD = 400
"""Messages published: 800 KiB, far beyond what the non-reader's kernel buffers and BOUND hold."""
SLOW = 1.0
"""``sessions.slow_consumer_seconds`` in these tests."""


def _bounded(**overrides: Any) -> SessionsConfig:
    options: dict[str, Any] = {
        "max_outgoing_bytes": BOUND,
        "max_outgoing_messages": 1000,
        "slow_consumer_seconds": SLOW,
    }
    options.update(overrides)
    return SessionsConfig(**options)


class NonReader:
    """A raw MQTT client that connects, subscribes, and then reads nothing until told to."""

    def __init__(self, port: int, connect: bytes, topic: str, qos: int = 0) -> None:
        self.port, self.connect, self.topic, self.qos = port, connect, topic, qos
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect

    def start(self) -> None:
        """CONNECT and SUBSCRIBE (blocking: run on a thread)."""
        sock = self.sock
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(self.connect)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(subscribe_packet(1, self.topic, self.qos))
        suback = b""
        while len(suback) < 5:
            suback += sock.recv(5 - len(suback))
        assert suback[0] == 0x90, suback
        assert suback[4] == self.qos, suback

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until_closed(self, within: float = 10.0) -> tuple[bytes, bool]:
        """Everything left to read, and whether the broker closed the connection."""
        sock = self.sock
        sock.settimeout(within)
        got = bytearray()
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return bytes(got), True
                got += chunk
        except ConnectionResetError:
            return bytes(got), True
        except TimeoutError:
            return bytes(got), False

    def close(self) -> None:
        self.sock.close()


def _connection(market: Market, client_id: str) -> tuple[Any, Any]:
    """The broker's (session, handler) of a connected client."""
    return market.running.broker._sessions[client_id]


def _shrink_send_buffer(handler: Any) -> None:
    """The broker's kernel send buffer of this one connection: 4 KiB (Linux doubles it)."""
    sock = handler.writer._writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def _connected_non_reader(market: Market, reader: NonReader, client_id: str) -> Any:
    await asyncio.to_thread(reader.start)
    await eventually(lambda: client_id in market.running.broker._sessions, 5.0)
    _, handler = _connection(market, client_id)
    _shrink_send_buffer(handler)
    return handler


class Peak:
    """The largest ``Flow.held()`` bytes and transport buffer of one connection, sampled."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.held = 0
        self.buffered = 0
        self.tasks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        transport = self.writer._writer.transport
        while True:
            if not transport.is_closing():
                self.buffered = max(self.buffered, transport.get_write_buffer_size())
                flow: Any = getattr(self.writer, "blendsm_flow", None)
                if flow is not None:
                    self.held = max(self.held, flow.held()[0])
            self.tasks = max(self.tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0.002)

    def __enter__(self) -> Peak:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _flood(publisher: Client, topic: str, count: int, qos: int = 0) -> None:
    """``count`` messages of SIZE bytes, paced a little so an honest reader keeps up."""
    for i in range(count):
        await publisher.publish(topic, b"BPMARK%06d" % i + b"x" * (SIZE - 12), qos=qos)
        if i % 20 == 19:
            await asyncio.sleep(0.01)


async def test_a_non_reading_subscriber_is_paused_then_disconnected_and_honest_ones_get_all(
    start_market: StartMarket, caplog: pytest.LogCaptureFixture
) -> None:
    """QoS 0 on a public topic (the inline fan-out): the broker holds at most the bound for
    the non-reader, disconnects it after ``slow_consumer_seconds``, and an honest subscriber
    on the same topic receives every message."""
    market = await start_market(sessions=_bounded())
    service = market.service
    topic = "public/flood"
    honest = market.client(None)
    assert await honest.connect() == 0
    assert await honest.subscribe(topic) == [0]
    client_id = f"nonreader-{time.monotonic_ns()}"
    reader = NonReader(market.port, connect_packet(client_id, 60), topic)
    try:
        handler = await _connected_non_reader(market, reader, client_id)
        publisher = market.client(None)
        assert await publisher.connect() == 0
        with caplog.at_level(logging.INFO, logger="blendsm.broker"), Peak(handler.writer) as peak:
            await _flood(publisher, topic, FLOOD)
            got = await honest.got.drain(within=2.0, until=FLOOD)
            await eventually(
                lambda: service.stats.slow_consumers_disconnected == 1,
                SLOW + 5.0,
                what="the non-reader disconnected",
            )
        assert [m.payload[:12] for m in got] == [b"BPMARK%06d" % i for i in range(FLOOD)]
        # the broker held at most the bound (plus one message) for the non-reader
        assert peak.buffered > BOUND // 2, "the flood never filled the broker's buffer"
        assert peak.buffered <= BOUND + SIZE + 64, peak.buffered
        assert peak.held <= BOUND + SIZE + 64, peak.held
        assert service.stats.deliveries_dropped_slow_consumer > 0
        assert service.stats.slow_consumers_paused == 1
        lines = [r for r in caplog.records if "slow consumer" in r.getMessage()]
        assert len(lines) == 1
        assert client_id in lines[0].getMessage()
        assert lines[0].levelno == logging.WARNING
        _, closed = await asyncio.to_thread(reader.read_until_closed)
        assert closed, "the broker did not close the non-reader's connection"
        assert service.backpressure.paused == 0
    finally:
        reader.close()


async def test_tasks_of_amqtts_path_are_bounded_and_end_at_the_disconnect(
    start_market: StartMarket,
) -> None:
    """QoS 1 to a clean session (amqtt's path: a task per delivery, each awaiting drain):
    no task is started for a session over its bound, and the ones blocked on its drain end
    when it is disconnected."""
    market = await start_market(sessions=_bounded())
    service = market.service
    topic = "public/flood1"
    client_id = f"nonreader1-{time.monotonic_ns()}"
    reader = NonReader(market.port, connect_packet(client_id, 60), topic, qos=1)
    try:
        handler = await _connected_non_reader(market, reader, client_id)
        baseline = len(asyncio.all_tasks())
        publisher = market.client(None)
        assert await publisher.connect() == 0
        with Peak(handler.writer) as peak:
            await _flood(publisher, topic, FLOOD, qos=1)
            await eventually(
                lambda: service.stats.slow_consumers_disconnected == 1,
                SLOW + 5.0,
                what="the non-reader disconnected",
            )
            # the tasks blocked behind its drain ended
            await eventually(
                lambda: len(asyncio.all_tasks()) <= baseline + 3, 5.0, what="delivery tasks ended"
            )
        assert peak.held <= BOUND + SIZE + 64, peak.held
        # at most the deliveries that fit in the bound were ever tasks at once
        assert peak.tasks - baseline <= BOUND // SIZE + 10, (peak.tasks, baseline)
        assert service.stats.deliveries_dropped_slow_consumer > 0
    finally:
        reader.close()


async def test_a_non_reading_buyer_is_charged_only_for_what_its_transport_took(
    start_market: StartMarket,
) -> None:
    """A paid topic: every charge is a PUBLISH handed to the buyer's transport, and once it
    is paused nothing more is charged (the deliveries are not admitted at all)."""
    market = await start_market(sessions=_bounded())
    service = market.service
    chain = market.chain
    channel = await market.open_channel("buyer")
    await market.wait_channel(channel)
    client_id = f"paidreader-{time.monotonic_ns()}"
    token = market.signer("buyer").token(client_id)
    connect = connect_packet(client_id, 60, username=chain.addr("buyer"), password=token)
    reader = NonReader(market.port, connect, market.topic)
    try:
        handler = await _connected_non_reader(market, reader, client_id)
        # prepaid for the whole flood, so no delivery waits for credit
        voucher_topic = f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher"
        amount = (FLOOD + 10) * PRICE
        await asyncio.to_thread(
            reader.send,
            publish_packet(voucher_topic, voucher_payload(chain, "buyer", channel, amount)),
        )
        meter = service.meter
        await eventually(lambda: meter.accounts[channel].paid == amount, 10.0, what="the voucher")
        transport = handler.writer._writer.transport
        handed = 0
        write = transport.write

        def counting(data: bytes) -> None:
            nonlocal handed
            handed += bytes(data).count(b"BPMARK")
            write(data)

        transport.write = counting
        charged_at_pause: list[int] = []
        flow: Any = None

        async def watch() -> None:
            nonlocal flow
            while not charged_at_pause:
                flow = getattr(handler.writer, "blendsm_flow", None)
                if flow is not None and flow.paused_since is not None:
                    # admitted so far: charged, or reserved and charged once written (a
                    # batch's deliveries before its pause are written after it)
                    account = meter.accounts[channel]
                    charged_at_pause.append(account.charged + account.reserved)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        device = await market.connected_device()
        await _flood(device, market.topic, FLOOD)
        await eventually(
            lambda: service.stats.slow_consumers_disconnected == 1,
            SLOW + 10.0,
            what="the buyer disconnected",
        )
        watcher.cancel()
        charged = meter.accounts[channel].charged
        assert charged == handed * PRICE, (charged, handed)
        assert 0 < handed < FLOOD
        assert len(charged_at_pause) == 1
        assert charged <= charged_at_pause[0], "admitted and charged while paused"
        assert service.stats.deliveries_dropped_slow_consumer > 0
        data, closed = await asyncio.to_thread(reader.read_until_closed)
        assert closed
        # what it received was charged (the broker's buffer dropped at the abort was too)
        assert data.count(b"BPMARK") <= handed
    finally:
        reader.close()


def _control_flood(reader: NonReader, packet: bytes, count: int, done: threading.Event) -> None:
    # In small bursts: the connection reader handles a whole segment's packets in one go, and
    # a session's control publishes beyond 16 in process are dropped unanswered, so one
    # 5,000-packet write would be refused only 16 at a time and raise too few notices.
    for start in range(0, count, 8):
        reader.sock.sendall(packet * min(8, count - start))
        time.sleep(0.001)
    done.wait(60.0)


async def test_notices_share_the_bound(start_market: StartMarket) -> None:
    """A member that floods wrong-topic control publishes and never reads the refusals: the
    notices beyond its outgoing bound are not written (counted), the broker's buffer for it
    stays under the bound (below asyncio's own 64 KiB high-water mark)."""
    small = 8192
    market = await start_market(
        sessions=_bounded(max_outgoing_bytes=small, slow_consumer_seconds=60.0)
    )
    service = market.service
    chain = market.chain
    address = chain.addr("buyer").lower()
    client_id = f"noticeflood-{time.monotonic_ns()}"
    token = market.signer("buyer").token(client_id)
    connect = connect_packet(client_id, 60, username=chain.addr("buyer"), password=token)
    reader = NonReader(market.port, connect, f"blendsm/ctl/{address}/notice")
    count = 5000
    done = threading.Event()
    try:
        handler = await _connected_non_reader(market, reader, client_id)
        packet = publish_packet(f"blendsm/ctl/{address}/not-a-voucher", b"x")
        with Peak(handler.writer) as peak:
            flood = asyncio.create_task(
                asyncio.to_thread(_control_flood, reader, packet, count, done)
            )
            try:
                await eventually(
                    lambda: service.stats.vouchers_refused + service.stats.control_dropped == count,
                    60.0,
                    what="the flood worked through",
                )
            finally:
                done.set()
                await flood
        assert service.stats.notices_dropped_slow_consumer > 0
        assert peak.buffered <= small + 1024, peak.buffered
        assert peak.held <= small + 1024, peak.held
    finally:
        reader.close()


async def test_a_paused_persistent_session_keeps_its_qos1_messages_for_its_reconnect(
    start_market: StartMarket,
) -> None:
    """QoS 1 to a persistent session that stops reading: what is over its bound goes to its
    offline queue (bounded there), what was written stays in flight; after the slow-consumer
    disconnect, the client reconnects, reads, and gets every message (at least once)."""
    market = await start_market(sessions=_bounded())
    service = market.service
    chain = market.chain
    topic = "public/persistent"
    client_id = f"persistent-{time.monotonic_ns()}"
    token = market.signer("buyer").token(client_id)
    connect = connect_packet(
        client_id, 60, username=chain.addr("buyer"), password=token, clean=False
    )
    reader = NonReader(market.port, connect, topic, qos=1)
    try:
        await _connected_non_reader(market, reader, client_id)
        publisher = market.client(None)
        assert await publisher.connect() == 0
        await _flood(publisher, topic, FLOOD, qos=1)
        await eventually(
            lambda: service.stats.slow_consumers_disconnected == 1,
            SLOW + 5.0,
            what="the non-reader disconnected",
        )
    finally:
        reader.close()
    assert service.stats.deliveries_queued_slow_consumer > 0
    assert service.stats.deliveries_dropped_slow_consumer == 0
    back = market.client("buyer", client_id=client_id, clean_session=False)
    assert await back.connect() == 0
    got = await back.got.drain(within=2.0)
    marks = {m.payload[:12] for m in got if m.topic == topic}
    assert marks == {b"BPMARK%06d" % i for i in range(FLOOD)}, FLOOD - len(marks)
