"""The fan-out's inline QoS 1/2 path, white-box: its PUBLISH encoding against amqtt's, the
packet a PACKET_SENT listener gets, and the order between a delivery held on amqtt's path (a
reconnect's redelivery in progress) and the next one, which must not overtake it. A real
broker on 127.0.0.1 (embedded chain) and a raw-socket subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqtt.mqtt.publish import PublishPacket
from support import RawPacket, ack_packet, connect_packet, read_packet, subscribe_packet

from blendsm.broker import ChainConnection, RunningBroker, parse_config, start_broker
from blendsm.broker._fanout import Outbox, deliver
from blendsm.broker._fanout_acked import AckedFrame
from blendsm.broker._handler import PublishedPayload
from blendsm.broker._inflight import release_hold

PUBLISH, PUBACK = 3, 4


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("topic", ["t", "public/ü/" + "x" * 200])
@pytest.mark.parametrize("size", [0, 1, 120, 200, 16_370, 16_400, 2_097_200])
def test_the_shared_encoding_is_amqtts_byte_for_byte(qos: int, topic: str, size: int) -> None:
    """Header and topic encoded once, the packet id per session: the same bytes as amqtt's
    encoder, across the remaining-length boundaries (127/128, 16383/16384, 2097151/2)."""
    payload = bytes(range(256)) * (size // 256) + b"p" * (size % 256)
    frame = AckedFrame(topic, payload, qos)
    for packet_id in (1, 255, 256, 65535):
        expected = PublishPacket.build(topic, payload, packet_id, False, qos, False).to_bytes()
        assert frame.encode(packet_id) == expected


@pytest.fixture
async def running_broker(chain: Any, w3: Any, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 0.05},
            "data_dir": str(tmp_path / "data"),
            "public_topics": True,
        }
    )
    running = await start_broker(
        config,
        chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
    )
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def raw_sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        with contextlib.suppress(OSError):
            sock.close()


async def _subscriber(
    running: RunningBroker, opened: list[socket.socket], client_id: str, topic: str
) -> socket.socket:
    """An anonymous raw-socket session subscribed to ``topic`` at QoS 1."""

    def connect() -> socket.socket:
        sock = socket.create_connection((running.host, running.port), timeout=5)
        opened.append(sock)
        sock.sendall(connect_packet(client_id, 60))
        connack = read_packet(sock)
        assert connack is not None
        assert (connack.kind, connack.body[1]) == (2, 0), connack
        sock.sendall(subscribe_packet(1, topic, 1))
        suback = read_packet(sock)
        assert suback is not None
        assert (suback.kind, suback.body[2]) == (9, 1), suback
        return sock

    return await asyncio.to_thread(connect)


async def _read(sock: socket.socket, n: int) -> list[RawPacket]:
    got = []
    for _ in range(n):
        packet = await asyncio.to_thread(read_packet, sock, 5.0)
        assert packet is not None, f"got {got}"
        got.append(packet)
    return got


def _broadcast(topic: str, payload: bytes, qos: int) -> dict[str, Any]:
    return {"topic": topic, "data": PublishedPayload.of(payload, qos), "session": None}


async def test_a_packet_sent_listener_gets_the_packet_with_its_packet_id(
    running_broker: RunningBroker, raw_sockets: list[socket.socket]
) -> None:
    broker: Any = running_broker.broker
    sock = await _subscriber(running_broker, raw_sockets, "listened", "public/l")
    session = broker.sessions["listened"][0]
    tasks: deque[asyncio.Task[Any]] = deque()
    outbox = Outbox(listeners=True)
    await deliver(broker, _broadcast("public/l", b"one", 1), tasks, outbox)
    sent = outbox.flush(broker.service.meter)
    assert not tasks, "delivered inline"
    (wire,) = await _read(sock, 1)
    assert [(s, p.packet_id, p.qos, p.data) for s, p in sent] == [
        (session, wire.packet_id, 1, b"one")
    ]
    assert list(session.inflight_out) == [wire.packet_id]
    await asyncio.to_thread(sock.sendall, ack_packet(PUBACK, wire.packet_id or 0))
    for _ in range(100):  # bounded: 5 s
        if not session.inflight_out:
            break
        await asyncio.sleep(0.05)
    assert not session.inflight_out, "the PUBACK clears it"


async def test_a_delivery_held_on_amqtts_path_is_not_overtaken(
    running_broker: RunningBroker, raw_sockets: list[socket.socket]
) -> None:
    """A reconnect holds new deliveries (a Task each) until its redelivery ran; once released,
    the next broadcast may reach the fan-out before the held Task resumed. It must go behind
    that Task, not inline in front of it."""
    broker: Any = running_broker.broker
    sock = await _subscriber(running_broker, raw_sockets, "ordered", "public/o")
    session = broker.sessions["ordered"][0]
    session.blendsm_hold = asyncio.Event()  # as a reconnect's redelivery in progress does
    tasks: deque[asyncio.Task[Any]] = deque()
    outbox = Outbox(listeners=False)
    await deliver(broker, _broadcast("public/o", b"m0", 1), tasks, outbox)
    assert len(tasks) == 1, "held: amqtt's path"
    release_hold(session)  # the redelivery is done; the held Task has not resumed yet
    outbox = Outbox(listeners=False)  # the next batch
    await deliver(broker, _broadcast("public/o", b"m1", 1), tasks, outbox)
    outbox.flush(broker.service.meter)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    got = await _read(sock, 2)
    assert [(p.kind, p.payload) for p in got] == [(PUBLISH, b"m0"), (PUBLISH, b"m1")]
    assert len({p.packet_id for p in got}) == 2


async def test_a_persistent_session_aborted_but_not_yet_disconnected_keeps_its_qos1_message(
    running_broker: RunningBroker, raw_sockets: list[socket.socket]
) -> None:
    """Between its transport being aborted (a slow consumer, a reset) and amqtt marking the
    session disconnected, a QoS 1 delivery to a persistent session goes to its offline queue
    for the reconnect, as it would a moment later; it used to be dropped without a trace."""
    broker: Any = running_broker.broker
    await _subscriber(running_broker, raw_sockets, "aborted", "public/a")
    session = broker.sessions["aborted"][0]
    session.clean_session = False  # what a member's CONNECT with clean session 0 sets
    session.is_anonymous = False
    broker._get_handler(session).writer._writer.transport.abort()
    assert session.transitions.state == "connected", "amqtt has not seen the abort yet"
    tasks: deque[asyncio.Task[Any]] = deque()
    outbox = Outbox(listeners=False)
    await deliver(broker, _broadcast("public/a", b"kept", 1), tasks, outbox)
    outbox.flush(broker.service.meter)
    assert not tasks
    queued = list(session.retained_messages._queue)
    assert [bytes(m.data) for m in queued] == [b"kept"]
