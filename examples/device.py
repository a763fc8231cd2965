"""A device (publisher): sends N signed readings to one topic through the broker, then exits.

The device key comes from the environment (``DEVICE_KEY``, hex). In the walkthrough it is a
TEST-ONLY key derived from a public label: never use such a key on a real network.

    DEVICE_KEY=0x... python examples/device.py --port 1883 --broker 0xOPERATOR \\
        --chain-id 31337 --registry 0xREGISTRY --topic example/temperature --count 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time

from blendsm.device_sdk import Publisher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--broker", required=True, help="the broker operator's address")
    parser.add_argument("--chain-id", type=int, required=True)
    parser.add_argument("--registry", required=True, help="the Registry contract's address")
    parser.add_argument("--topic", default="example/temperature")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between readings")
    parser.add_argument("--key-env", default="DEVICE_KEY", help="variable holding the device key")
    parser.add_argument("--state-dir", help="sequences + durable outbox (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="blendsm-device-") as tmp:
        device = Publisher.from_env(
            args.key_env,
            host=args.host,
            port=args.port,
            broker=args.broker,
            chain_id=args.chain_id,
            registry=args.registry,
            state_dir=args.state_dir or tmp,
        )
        try:
            device.connect()
            for n in range(args.count):
                reading = {
                    "n": n,
                    "celsius": round(20 + random.uniform(-2, 2), 2),
                    "t": time.time(),
                }
                device.publish(args.topic, json.dumps(reading).encode(), qos=1)
                time.sleep(args.interval)
            device.flush(30)  # every reading acknowledged by the broker
        finally:
            device.close()
    print(json.dumps({"device": device.address, "published": args.count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
