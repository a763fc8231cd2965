"""``blendsm demo``: the whole marketplace, embedded, in one command.

An in-process EVM starts with TEST-ONLY accounts (keys derived from labels, holding no
value), the suite is deployed and the broker runs on 127.0.0.1 with every plugin. The
oracle enrols a seller with three devices and two buyers; the seller lists three paid topics,
one marked end-to-end encrypted on chain (its keys served by a ``TopicKeyService``). Each
buyer opens a payment channel with an operator fee, and SDK Subscribers receive, verify
(signature, device, sampled Merkle proofs against the chain) and pay as the devices stream
signed readings. Then: outstanding vouchers are paid, claimed on chain, the last leaves
anchored and proven, both sides rate each other, the channels close, the chain's clock
jumps past the challenge period and the buyers withdraw what is left.

Money and integrity invariants are checked at the end; :func:`run_demo` returns a
:class:`~blendsm.cli._demo_report.DemoReport` and the command exits 1 if any is broken.
The stages are in :mod:`blendsm.cli._demo_stages`, the report in
:mod:`blendsm.cli._demo_report`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from blendsm.cli._demo_parts import RATE_HZ, LoopChainReader, Progress
from blendsm.cli._demo_report import DemoReport, build_report
from blendsm.cli._demo_stages import (
    DemoMarket,
    close_and_withdraw,
    connect_parties,
    enrol_parties,
    set_up_chain,
    settle,
    start_demo_broker,
    stream,
)

__all__ = ["run_demo"]


async def run_demo(
    duration: float = 10.0,
    *,
    progress: IO[str] | None = None,
    quiet: bool = False,
    rate_hz: float = RATE_HZ,
) -> DemoReport:
    """Run the embedded marketplace for ``duration`` seconds of streaming; the report."""
    with tempfile.TemporaryDirectory(prefix="blendsm-demo-") as tmp:
        return await _run(
            Path(tmp), duration, Progress(progress or sys.stderr, quiet=quiet), rate_hz
        )


async def _run(tmp: Path, duration: float, view: Progress, rate_hz: float) -> DemoReport:
    started = time.monotonic()
    chain = await set_up_chain(view)
    await enrol_parties(chain, view)
    running = await start_demo_broker(chain, tmp / "broker", duration, view)
    reader = LoopChainReader(asyncio.get_running_loop(), chain.reader)
    market = DemoMarket(chain, running, tmp, view, reader)
    try:
        await connect_parties(market)
        await stream(market, duration, rate_hz)
        settled = await settle(market)
        closed = await close_and_withdraw(market)
        return await build_report(market, settled, closed, duration=duration, started=started)
    finally:
        await market.close()
