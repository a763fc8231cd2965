"""Walkthrough: one anvil chain, one broker, one device and one buyer, each its own process.

    npm ci && pip install '.[broker]'
    python examples/walkthrough.py [--count 10] [--price 1000]

Steps: start anvil; deploy the suite; the oracle enrols an operator, a seller (with one
device) and a buyer; the seller lists a paid topic; the broker starts from
``examples/operator.yaml`` (``blendsm broker -c``); ``buyer.py`` opens a channel and
subscribes; ``device.py`` publishes N signed readings; the buyer pays and prints a JSON
summary, which this script checks (received N, vouchered N * price). Every child process is
terminated on the way out. The last stdout line is the buyer's summary.

Every key here is TEST-ONLY: derived from a public label (``test_account("example:...")``)
and funded on a throwaway anvil chain. Never send value to these addresses on a real network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from blendsm.contracts import (
    AnvilNode,
    Deployment,
    Marketplace,
    Policy,
    Role,
    connect,
    deploy_suite,
    disconnect,
    free_port,
    test_account,
)

HERE = Path(__file__).resolve().parent
TOPIC = "example/temperature"
LABELS = ("oracle", "operator", "seller", "device", "buyer")


def say(text: str) -> None:
    print(f"[walkthrough] {text}", file=sys.stderr, flush=True)


async def set_up_chain(url: str, accounts: dict[str, Any], price: int, out: Path) -> Deployment:
    """Fund the TEST-ONLY accounts, deploy, enrol everyone and list the paid topic."""
    w3 = connect(url)
    try:
        for acct in accounts.values():
            await w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**22)])
        deployment = await deploy_suite(w3, accounts["oracle"])
        deployment.save(out)
        mp = {label: Marketplace(w3, deployment, acct) for label, acct in accounts.items()}
        for label, role in (
            ("operator", Role.OPERATOR),
            ("seller", Role.SELLER),
            ("buyer", Role.BUYER),
        ):
            await mp[label].registry.apply_for_role(role)
            await mp["oracle"].registry.approve(accounts[label].address)
        await mp["seller"].registry.add_device(accounts["device"].address)
        await mp["seller"].market.create_topic(TOPIC, price, None, Policy.OPEN)
        return deployment
    finally:
        await disconnect(w3)


def write_config(tmp: Path, chain_url: str, port: int) -> Path:
    config = yaml.safe_load((HERE / "operator.yaml").read_text())
    config["listen"]["port"] = port
    config["chain"]["endpoint"] = chain_url
    config["chain"]["deployment"] = str(tmp / "deployment.json")
    config["data_dir"] = str(tmp / "broker-data")
    path = tmp / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_line(proc: subprocess.Popen[str], marker: str, within: float, what: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return
    raise RuntimeError(f"{what} did not print {marker!r}:\n" + "".join(seen))


def terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="readings the device sends")
    parser.add_argument("--price", type=int, default=1_000, help="wei per reading")
    args = parser.parse_args(argv)

    accounts = {label: test_account(f"example:{label}") for label in LABELS}  # TEST ONLY
    addr = {label: acct.address for label, acct in accounts.items()}
    children: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="blendsm-example-") as tmp_name, AnvilNode() as anvil:
        tmp = Path(tmp_name)
        try:
            say(f"anvil on {anvil.url}; deploying and enrolling TEST-ONLY participants")
            deployment = asyncio.run(
                set_up_chain(anvil.url, accounts, args.price, tmp / "deployment.json")
            )
            port = free_port()
            config = write_config(tmp, anvil.url, port)
            base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}

            say(f"starting the broker on 127.0.0.1:{port} (operator {addr['operator']})")
            broker = subprocess.Popen(
                [sys.executable, "-m", "blendsm.cli", "broker", "-c", str(config)],
                env={**base_env, "BLENDSM_OPERATOR_KEY": accounts["operator"].key.hex()},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=tmp,
            )
            children.append(broker)
            wait_for_line(broker, "listening on", 60, "the broker")
            # keep reading the broker's output so a chatty log never blocks it on a full pipe
            threading.Thread(target=broker.communicate, daemon=True).start()

            common = ["--port", str(port), "--broker", addr["operator"], "--topic", TOPIC]
            count = ["--count", str(args.count)]
            say("starting the buyer (opens a channel, subscribes)")
            buyer = subprocess.Popen(
                [
                    *(sys.executable, str(HERE / "buyer.py"), *common, *count),
                    *("--chain", anvil.url, "--deployment", str(tmp / "deployment.json")),
                    *("--seller", addr["seller"]),
                ],
                env={**base_env, "BUYER_KEY": accounts["buyer"].key.hex()},  # TEST ONLY
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(buyer)
            wait_for_line(buyer, "READY", 60, "the buyer")

            say(f"starting the device ({args.count} signed readings)")
            device = subprocess.Popen(
                [
                    *(sys.executable, str(HERE / "device.py"), *common, *count),
                    *("--chain-id", str(deployment.chain_id)),
                    *("--registry", deployment.address("Registry")),
                ],
                env={**base_env, "DEVICE_KEY": accounts["device"].key.hex()},  # TEST ONLY
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(device)
            device_out, _ = device.communicate(timeout=60)
            buyer_out, _ = buyer.communicate(timeout=60)
        finally:
            for proc in reversed(children):
                terminate(proc)

    lines = [line for line in buyer_out.splitlines() if line.startswith("{")]
    if device.returncode != 0 or buyer.returncode != 0 or not lines:
        say(f"failed: device exit {device.returncode}, buyer exit {buyer.returncode}")
        say(f"device said: {device_out.strip()!r}; buyer said: {buyer_out.strip()!r}")
        return 1
    summary = json.loads(lines[-1])
    expected = args.count * args.price
    ok = summary["received"] == args.count and summary["vouchered_wei"] == expected
    say(
        f"buyer received {summary['received']}/{args.count} readings,"
        f" vouchered {summary['vouchered_wei']}/{expected} wei: {'OK' if ok else 'MISMATCH'}"
    )
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
