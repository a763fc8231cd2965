"""What the broker's JSON-RPC client costs per call: web3 8's AsyncHTTPProvider as shipped
against ours (:mod:`blendsm.contracts._http_provider`: kept-alive connections, no thread hop
for the session), in the same run, against anvil.

Every chain call of the broker (anchors, claims, the chain view's polls) runs on the event loop
that delivers messages, so its client CPU is taken from deliveries. Measured per variant,
interleaved over ``--rounds``: a raw read (``eth_blockNumber``), a contract view through our
bindings (``DataAnchors.latestBatchId``) and an anchor transaction (build, sign, send, receipt:
what the anchorer does per root). Prints client CPU and wall time per call and the ratios.
The client is pinned to one CPU and anvil to the other where there are two; every
(round, client) gets a fresh node: anchors sent to one node take longer as they pile up
(10 -> 58 ms of wall time each over 320 in one node, not investigated; 50 ms is the
Transactor's receipt poll interval).

Usage: ``python benchmarks/bench_chain_client.py [--rounds 3] [--reads 300] [--anchors 40]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from web3 import AsyncWeb3
from web3.providers import AsyncHTTPProvider

from blendsm.contracts import (
    AnvilNode,
    Marketplace,
    connect,
    deploy_suite,
    disconnect,
    enrol_operator,
    test_account,
)


def _cpu() -> float:
    return time.process_time()  # this process, every thread (web3's lock hop runs in one)


async def _timed(n: int, call: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
    """(client CPU ms, wall ms) per call over ``n`` sequential calls."""
    cpu, wall = _cpu(), time.perf_counter()
    for i in range(n):
        await call(i)
    return (_cpu() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


def _client(kind: str, url: str) -> AsyncWeb3[Any]:
    if kind == "web3":
        return AsyncWeb3(AsyncHTTPProvider(url, request_kwargs={"timeout": 30}))
    return connect(url, request_timeout=30)


async def _variant(
    w3: AsyncWeb3[Any], deployment: Any, operator: Any, first: int, args: argparse.Namespace
) -> dict[str, float]:
    """One round of one client: ms of CPU and wall per read, view and anchor."""
    anchors = Marketplace(w3, deployment, operator).anchors
    try:
        await w3.eth.block_number  # the session exists before timing

        async def read(_i: int) -> Any:
            return await w3.eth.block_number

        async def view(_i: int) -> Any:
            return await anchors.latest_batch_id(operator.address)

        async def anchor(i: int) -> Any:
            return await anchors.anchor(first + i, os.urandom(32), 100)

        out: dict[str, float] = {}
        for name, call, n in (
            ("read", read, args.reads),
            ("view", view, args.reads),
            ("anchor", anchor, args.anchors),
        ):
            out[f"{name} cpu"], out[f"{name} wall"] = await _timed(n, call)
        return out
    finally:
        await disconnect(w3)


async def _fresh_node(cpus: list[int]) -> tuple[AnvilNode, Any, Any]:
    """A new anvil (on the second CPU) with the suite deployed and the operator enrolled: the
    anchors take longer as they pile up in one node, so every measured client gets a node of
    the same age."""
    node = AnvilNode().start(timeout=30)
    if len(cpus) >= 2 and node.process is not None:
        os.sched_setaffinity(node.process.pid, {cpus[1]})
    deployer, operator = test_account("deployer"), test_account("operator")  # TEST ONLY
    setup = connect(node.url, request_timeout=30)
    try:
        for account in (deployer, operator):
            await setup.provider.make_request("anvil_setBalance", [account.address, hex(10**21)])
        deployment = await deploy_suite(setup, deployer)
        await enrol_operator(setup, deployment, operator, deployer)
    finally:
        await disconnect(setup)
    return node, deployment, operator


async def main(args: argparse.Namespace) -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0]})
    print(
        f"chain client: Python {sys.version.split()[0]}, client on CPU {cpus[:1]},"
        f" anvil on {cpus[1:2]}; {args.reads} reads, {args.anchors} anchors per round,"
        " a fresh node per client and round"
    )
    results: dict[str, dict[str, list[float]]] = {}
    for round_no in range(args.rounds):
        for kind in ("web3", "ours") if round_no % 2 == 0 else ("ours", "web3"):
            node, deployment, operator = await _fresh_node(cpus)
            try:
                measured = await _variant(_client(kind, node.url), deployment, operator, 1, args)
            finally:
                node.stop()
            print(
                f"  round {round_no + 1} {kind:<5} "
                + "  ".join(f"{key} {value:.3f}" for key, value in measured.items())
            )
            for key, value in measured.items():
                results.setdefault(kind, {}).setdefault(key, []).append(value)
    print(f"  {'per call (median of rounds), ms':<34} {'web3 8':>9} {'ours':>9} {'ours/web3':>10}")
    for name in ("read", "view", "anchor"):
        for what in ("cpu", "wall"):
            key = f"{name} {what}"
            base = statistics.median(results["web3"][key])
            ours = statistics.median(results["ours"][key])
            print(f"  {key:<34} {base:9.3f} {ours:9.3f} {ours / base:9.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--anchors", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
