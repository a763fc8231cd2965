"""The packet-size reader follows MQTT framing through whatever reads amqtt makes and refuses a
packet as soon as its fixed header says it is too large, before the body is read."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.adapters import BufferReader
from amqtt.errors import NoDataError
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket
from support import connect_packet, subscribe_packet

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


class Trickle:
    """A reader handing out at most ``piece`` bytes per read (how a WebSocket frame or a TCP
    segment may cut the stream)."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece = data, piece

    async def read(self, n: int = -1) -> bytes:
        size = self.piece if n < 0 else min(n, self.piece)
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def feed_eof(self) -> None:
        pass


def _raw_publish(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + payload
    length = len(body)
    encoded = b""
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x32" + encoded + body


async def _drain(reader: PacketSizeLimit) -> bytes:
    """Read as amqtt does (a fixed header, then its body) until the stream ends; the bytes
    of every packet read whole."""
    got = b""
    try:
        while (header := await MQTTFixedHeader.from_stream(reader)) is not None:
            body = b""
            while len(body) < header.remaining_length:
                chunk = await reader.read(header.remaining_length - len(body))
                if not chunk:
                    return got
                body += chunk
            got += bytes(header.to_bytes()) + body
    except (asyncio.IncompleteReadError, NoDataError):
        pass
    return got


@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
async def test_with_the_rules_a_valid_stream_passes_unchanged_in_any_pieces(piece: int) -> None:
    stream = (
        connect_packet("ok", 30)
        + subscribe_packet(1, "a/#", 1)
        + _raw_publish("t/ü".encode(), b"x")
        + _raw_publish(b"t/big", b"p" * 70_000)  # a body past what the rules keep
        + b"\xc0\x00"  # PINGREQ
    )
    refused: list[int] = []
    violations: list[str] = []
    reader = PacketSizeLimit(Trickle(stream, piece), 10**6, refused.append, violations.append)
    assert await _drain(reader) == stream
    assert (refused, violations) == ([], [])


@pytest.mark.parametrize("piece", [1, 5, 4096])
async def test_with_the_rules_a_bad_packet_ends_the_stream_before_it_is_whole(piece: int) -> None:
    good = connect_packet("ok", 30) + _raw_publish(b"t/1", b"x")
    bad = _raw_publish(b"t/\xc3", b"x")
    violations: list[str] = []
    reader = PacketSizeLimit(Trickle(good + bad + good, piece), 10**6, [].append, violations.append)
    assert await _drain(reader) == good  # the bad packet never reaches amqtt whole
    assert violations == ["PUBLISH topic: ill-formed UTF-8 (MQTT-1.5.3-1)"]
    assert reader.refused


async def test_with_the_rules_a_long_subscribe_is_read_to_its_last_filter() -> None:
    """A SUBSCRIBE is kept whole (unlike a PUBLISH's payload): a bad filter after 70 KB of
    good ones is found."""
    filters = b"".join(len(f).to_bytes(2, "big") + f + b"\x00" for f in [b"a" * 1000] * 70)
    body = b"\x00\x01" + filters + b"\x00\x02a\xff\x00"
    length, encoded = len(body), b""
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    good = connect_packet("ok", 30)
    violations: list[str] = []
    stream = good + b"\x82" + encoded + body
    reader = PacketSizeLimit(Trickle(stream, 4096), 10**6, [].append, violations.append)
    assert await _drain(reader) == good
    assert violations == ["topic filter: ill-formed UTF-8 (MQTT-1.5.3-1)"]
