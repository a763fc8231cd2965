"""Log lines a client can cause are bounded: connections that end before their CONNECT, or
send garbage instead of one, are counted, not logged one line each (a port scanner or a
load balancer's health check opens thousands)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from support import connect_packet

from .conftest import StartMarket

PROBES = 200


async def _probe(port: int, send: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if send:
        writer.write(send)
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 5.0)
    writer.close()


@pytest.mark.parametrize(
    "send",
    [b"", b"\x10", b"GET / HTTP/1.1\r\n\r\n", b"\x82\x02\x00\x01"],
    ids=["nothing", "half_a_header", "http", "subscribe_first"],
)
async def test_connections_ending_before_connect_log_a_bounded_number_of_lines(
    start_market: StartMarket, caplog: pytest.LogCaptureFixture, send: bytes
) -> None:
    market = await start_market()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(PROBES // 20):
            await asyncio.gather(*(_probe(market.port, send) for _ in range(20)))
        await asyncio.sleep(0.2)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 5, f"{len(lines)} log lines for {PROBES} probes; first: " + repr(
        [(r.name, r.getMessage()) for r in lines[:4]]
    )
    client = market.client(None)
    assert await client.connect() == 0


async def test_repeated_take_overs_log_a_bounded_number_of_lines(
    start_market: StartMarket, caplog: pytest.LogCaptureFixture
) -> None:
    """One client id connecting again and again (a crash loop, or two devices sharing an id)
    takes its session over each time: counted in the log, not a line each."""
    market = await start_market()
    caplog.clear()
    held = []
    with caplog.at_level(logging.INFO):
        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", market.port)
            writer.write(connect_packet("same-id", 30, clean=False))
            connack = await asyncio.wait_for(reader.readexactly(4), 5.0)
            assert connack[:2] == b"\x20\x02"
            assert connack[3] == 0  # accepted (session present after the first)
            held.append(writer)
        await asyncio.sleep(0.2)
    for writer in held:
        writer.close()
    lines = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        or (r.levelno >= logging.INFO and r.name.startswith("blendsm"))
    ]
    assert len(lines) <= 5, [r.getMessage() for r in lines[:6]]
