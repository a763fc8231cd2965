"""The packet-size reader follows MQTT framing through whatever reads amqtt makes and refuses a
packet as soon as its fixed header says it is too large, before the body is read."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket

from blendsm.broker._packet_limit import PacketSizeLimit


def _publish(payload_size: int) -> bytes:
    return bytes(PublishPacket.build("t/x", b"p" * payload_size, None, False, 0, False).to_bytes())


class Counting:
    """A reader that counts the bytes asked of it (so a test sees a body never requested)."""

    def __init__(self, data: bytes) -> None:
        self.inner = BufferReader(data)
        self.asked = 0

    async def read(self, n: int = -1) -> bytes:
        self.asked += n
        data: bytes = await self.inner.read(n)
        return data

    def feed_eof(self) -> None:
        pass


async def _read_packets(reader: PacketSizeLimit) -> list[PublishPacket]:
    packets = []
    while True:
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            return packets
        packets.append(await PublishPacket.from_stream(reader, fixed_header=header))


async def test_packets_up_to_the_limit_pass() -> None:
    small, exact = _publish(10), _publish(300)
    refused: list[int] = []
    reader = PacketSizeLimit(BufferReader(small + exact + small), len(exact), refused.append)
    packets = await _read_packets(reader)
    assert [len(p.data) for p in packets] == [10, 300, 10]
    assert refused == []


async def test_a_packet_over_the_limit_ends_the_stream_before_its_body() -> None:
    big = _publish(128 * 1024)  # a 3-byte remaining length
    source = Counting(_publish(10) + big)
    refused: list[int] = []
    reader = PacketSizeLimit(source, len(big) - 1, refused.append)
    assert len(await _read_packets(reader)) == 1  # then EOF, as amqtt sees it
    assert refused == [len(big)]
    assert source.asked < 100  # the 128 KiB body was never asked for
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(1)  # and nothing more is read from it


async def test_a_fifth_remaining_length_byte_is_refused() -> None:
    refused: list[int] = []
    reader = PacketSizeLimit(BufferReader(b"\x30\xff\xff\xff\xff\x01"), 10**9, refused.append)
    assert await MQTTFixedHeader.from_stream(reader) is None
    assert len(refused) == 1
