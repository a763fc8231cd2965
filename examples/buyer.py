"""A buyer application: opens a payment channel, subscribes to a paid topic, verifies and
pays for N readings, then prints a one-line JSON summary and exits.

The buyer key comes from the environment (``BUYER_KEY``, hex). In the walkthrough it is a
TEST-ONLY key derived from a public label: never use such a key on a real network.

    BUYER_KEY=0x... python examples/buyer.py --chain http://127.0.0.1:8545 \\
        --deployment deployment.json --port 1883 --broker 0xOPERATOR --seller 0xSELLER \\
        --topic example/temperature --count 10

It prints ``READY`` on stdout once subscribed, then the summary line when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from blendsm.contracts import Deployment, Marketplace, connect, disconnect
from blendsm.device_sdk import Subscriber, Web3ChainReader, account_from_env
from blendsm.errors import BlendsmError, SubscriptionRefusedError


async def open_channel(sub: Subscriber, args: argparse.Namespace, account: Any) -> bytes:
    w3 = connect(args.chain)
    try:
        deployment = Deployment.load(args.deployment)
        return await sub.open_channel(
            Marketplace(w3, deployment, account), args.seller, args.deposit
        )
    finally:
        await disconnect(w3)


def subscribe_when_ready(sub: Subscriber, topic: str, within: float) -> None:
    """The broker admits the subscription once its chain view has seen the channel."""
    deadline = time.monotonic() + within
    while True:
        try:
            if not sub.connected:
                sub.connect()
            sub.subscribe(topic, 0)
            return
        except (SubscriptionRefusedError, BlendsmError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", required=True, help="JSON-RPC endpoint")
    parser.add_argument("--deployment", required=True, help="deployment.json of the suite")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--broker", required=True, help="the broker operator's address")
    parser.add_argument("--seller", required=True, help="the topic's seller")
    parser.add_argument("--topic", default="example/temperature")
    parser.add_argument("--count", type=int, default=10, help="readings to receive")
    parser.add_argument("--deposit", type=int, default=10**16, help="channel deposit (wei)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--key-env", default="BUYER_KEY", help="variable holding the buyer key")
    args = parser.parse_args(argv)

    account = account_from_env(args.key_env)
    deployment = Deployment.load(args.deployment)
    sub = Subscriber(
        account,
        host=args.host,
        port=args.port,
        broker=args.broker,
        chain_id=deployment.chain_id,
        channels_contract=deployment.address("PaymentChannels"),
        registry=deployment.address("Registry"),
        chain_reader=Web3ChainReader(args.chain, deployment),
        budget=args.deposit,
        pay_every=1,
    )
    lock = threading.Lock()
    done = threading.Event()
    tally = {"received": 0, "paid": 0, "verified": 0, "integrity": 0}

    def on_message(_s: Subscriber, m: Any) -> None:
        with lock:
            tally["received"] += 1
            tally["paid"] += int(bool(m.paid))
            tally["verified"] += int(bool(m.verified))
            if tally["received"] >= args.count:
                done.set()

    def on_integrity(_s: Subscriber, _e: Any) -> None:
        with lock:
            tally["integrity"] += 1

    sub.on_message = on_message
    sub.on_integrity = on_integrity

    channel = asyncio.run(open_channel(sub, args, account))
    try:
        subscribe_when_ready(sub, args.topic, args.timeout)
        print("READY", flush=True)
        done.wait(args.timeout)
        sub.wait_idle(10)
        sub.pay_outstanding(channel)
        vouchered = sub.vouchered(channel)
        confirmed = sub.wait_confirmed(channel, vouchered, 15)
        with lock:
            summary = {
                "buyer": account.address,
                "channel": "0x" + channel.hex(),
                **tally,
                "vouchered_wei": vouchered,
                "confirmed_wei": sub.confirmed(channel),
                "broker_confirmed_all": confirmed,
            }
    finally:
        sub.disconnect()
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["received"] >= args.count and confirmed else 1


if __name__ == "__main__":
    sys.exit(main())
