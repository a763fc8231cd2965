"""A member that floods the control tree and never reads its notices holds a bounded number
of broker tasks, and the log gets a bounded number of lines (the issue measured 245 MB of
broker memory for a 10 MB flood of wrong-topic control publishes)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from support import connect_packet, publish_packet

from .conftest import Market

FLOOD = 20_000
TASK_BOUND = 40
"""The broker keeps at most 16 control tasks per session (MAX_CONTROL_TASKS), plus its own."""


def _flood(port: int, connect: bytes, topic: str) -> None:
    """Connect as a member, then publish FLOOD wrong-topic control messages without ever
    reading what the broker sends back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(connect)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        packet = publish_packet(topic, b"x")
        sock.sendall(packet * FLOOD)
        time.sleep(2.0)  # the broker works through it while nothing is read
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

    sampler = asyncio.create_task(sample())
    with caplog.at_level(logging.INFO, logger="blendsm.broker"):
        await asyncio.to_thread(
            _flood, market.port, connect, f"blendsm/ctl/{address}/not-a-voucher"
        )
    sampler.cancel()
    refused = [r for r in caplog.records if "control PUBLISH" in r.getMessage()]
    assert len(refused) <= 3, f"{len(refused)} log lines for one flood"
    assert peak <= TASK_BOUND, f"{peak} broker tasks at the peak of one flood"
    assert service.stats.vouchers_refused + service.stats.control_dropped == FLOOD
