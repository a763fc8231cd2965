"""A member that floods the control tree and never reads its notices holds a bounded number
of broker tasks, and the log gets a bounded number of lines (the issue measured 245 MB of
broker memory for a 10 MB flood of wrong-topic control publishes)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
from support import connect_packet, eventually, publish_packet

from .conftest import Market

FLOOD = 20_000
TASK_BOUND = 40
"""The broker keeps at most 16 control tasks per session (MAX_CONTROL_TASKS), plus its own."""


def _flood(port: int, connect: bytes, topic: str, done: threading.Event) -> None:
    """Connect as a member, then publish FLOOD wrong-topic control messages without ever
    reading what the broker sends back; keep the socket open until ``done`` (closing with
    unread data resets the connection, and the broker would lose what it has not read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer set before connecting, so the window is small from the start:
    # shrunk on an open connection, Linux can stall the flood's own sending for good once the
    # unread refusals fill it (a zero window whose updates are lost, probes backing off).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(connect)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        packet = publish_packet(topic, b"x")
        sock.sendall(packet * FLOOD)
        done.wait(60.0)
    finally:
        sock.close()


async def test_a_control_flood_holds_bounded_tasks_and_log_lines(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    address = market.chain.addr("buyer").lower()
    client_id = f"flood-{time.monotonic_ns()}"
    token = market.signer("buyer").token(client_id)
    connect = connect_packet(client_id, 60, username=market.chain.addr("buyer"), password=token)
    service = market.service
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(service._tasks))
            await asyncio.sleep(0.005)

    def handled() -> int:
        return service.stats.vouchers_refused + service.stats.control_dropped

    sampler = asyncio.create_task(sample())
    done = threading.Event()
    topic = f"blendsm/ctl/{address}/not-a-voucher"
    with caplog.at_level(logging.INFO, logger="blendsm.broker"):
        flood = asyncio.create_task(asyncio.to_thread(_flood, market.port, connect, topic, done))
        try:
            # every publish is refused or dropped, each counted, while the client reads nothing
            await eventually(lambda: handled() == FLOOD, 60.0, what="the flood worked through")
        finally:
            done.set()
            await flood
    sampler.cancel()
    refused = [r for r in caplog.records if "control PUBLISH" in r.getMessage()]
    assert len(refused) <= 3, f"{len(refused)} log lines for one flood"
    assert peak <= TASK_BOUND, f"{peak} broker tasks at the peak of one flood"
    assert handled() == FLOOD
