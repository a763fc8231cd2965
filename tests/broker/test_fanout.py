"""The fan-out's outbox over real TCP connections: a session's queued deliveries go out in one
write, and each charge is committed only if its bytes were handed to an open transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from amqtt.adapters import StreamWriterAdapter
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from blendsm.broker._fanout import Outbox
from blendsm.broker._meter import Account, Charge, Meter

PRICE = 100


@pytest.fixture
async def connections() -> AsyncIterator[Any]:
    """``await connect()`` -> (broker-side writer adapter, client-side reader), on 127.0.0.1."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_client(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    opened: list[asyncio.StreamWriter] = []

    async def connect() -> tuple[StreamWriterAdapter, asyncio.StreamReader]:
        reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
        broker_side = await asyncio.wait_for(accepted.get(), 5)
        opened.extend((client_writer, broker_side))
        return StreamWriterAdapter(broker_side), reader

    yield connect
    for w in opened:
        w.close()
    server.close()
    await server.wait_closed()


def _account(n: int) -> Account:
    return Account(bytes([n]) * 32, "0xB0", "0x5E", None, 10**18, True)


def _publish(n: int) -> tuple[PublishPacket, bytes]:
    packet = PublishPacket.build("paid/t", b"m%d" % n, None, False, 0, False)
    return packet, packet.to_bytes()


def _charge(meter: Meter, account: Account) -> Charge:
    charge = meter.reserve(account, PRICE, "paid/t")
    assert isinstance(charge, Charge)
    return charge


async def test_written_deliveries_are_charged_and_those_to_a_closed_transport_are_not(
    connections: Any,
) -> None:
    meter = Meter("0x" + "0a" * 20, credit_messages=10)
    live, gone = _account(1), _account(2)
    (live_writer, live_reader), (gone_writer, _) = await connections(), await connections()
    outbox = Outbox(listeners=True)
    expected = b""
    for n in range(3):  # a burst to one session: one write
        packet, data = _publish(n)
        outbox.add(Session(), live_writer, packet, data, _charge(meter, live))
        expected += data
    packet, data = _publish(9)
    outbox.add(Session(), gone_writer, packet, data, _charge(meter, gone))
    gone_writer._writer.transport.abort()  # the subscriber's connection died meanwhile
    assert (live.reserved, gone.reserved) == (3 * PRICE, PRICE)

    sent = outbox.flush(meter)

    assert (live.charged, live.reserved, live.delivered) == (3 * PRICE, 0, 3)
    assert (gone.charged, gone.reserved, gone.delivered) == (0, 0, 0)
    assert len(sent) == 3, "PACKET_SENT is owed for what was written only"
    got = await asyncio.wait_for(live_reader.readexactly(len(expected)), 5)
    assert got == expected


async def _one_queued(connections: Any) -> tuple[Meter, Account, Any, Any, Outbox, bytes]:
    """An outbox holding one charged delivery for a fresh connection."""
    meter = Meter("0x" + "0a" * 20, credit_messages=10)
    account = _account(1)
    writer, reader = await connections()
    outbox = Outbox(listeners=False)
    packet, data = _publish(1)
    outbox.add(Session(), writer, packet, data, _charge(meter, account))
    return meter, account, writer, reader, outbox, data


async def test_a_flushed_outbox_is_empty(connections: Any) -> None:
    meter, account, _, reader, outbox, data = await _one_queued(connections)
    assert outbox.flush(meter) == []  # nobody listens to PACKET_SENT
    assert outbox.flush(meter) == []
    assert (account.charged, account.reserved) == (PRICE, 0)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data


async def test_a_delivery_on_amqtts_path_writes_what_was_queued_first(connections: Any) -> None:
    """Order per session: before a task is started for a session, its queued bytes are written
    (and charged); its later deliveries of the batch are not queued behind the task's back."""
    meter, account, writer, reader, outbox, data = await _one_queued(connections)
    assert outbox.takes(writer)
    outbox.before_task(writer, meter)
    assert (account.charged, account.reserved) == (PRICE, 0), "written before the task runs"
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
    assert not outbox.takes(writer)
    assert outbox.flush(meter) == []
