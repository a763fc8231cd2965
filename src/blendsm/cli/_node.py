"""``blendsm node``: the embedded chain served over JSON-RPC until SIGINT or SIGTERM.

``blendsm deploy --chain embedded`` deploys to an EVM that vanishes with the command, so a
developer without anvil has no chain for the multi-step commands (registry, market,
channel...) or ``blendsm broker``. This command runs
:func:`~blendsm.contracts.start_dev_node` (funded TEST-ONLY accounts, the suite deployed, the
``operator`` enrolled), writes the deployment file and prints what other shells need: the
URL, the deployment and the keys as ``export`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from blendsm.cli._support import DEFAULT_DEPLOYMENT, run_async
from blendsm.errors import ConfigError

if TYPE_CHECKING:  # importing web3 at CLI start would slow every command down
    from blendsm.contracts import DevNode

__all__ = ["register"]

_TEST_ONLY_WARNING = (
    "TEST ONLY: these private keys are public (keccak256 of 'blendsm-test:<label>');"
    " never send anything of value to these accounts or use them on a real network."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm node``."""
    from blendsm.contracts import DEFAULT_CHALLENGE_PERIOD, DEV_ACCOUNT_LABELS

    node = sub.add_parser(
        "node",
        help="run a local development chain (the embedded EVM) over JSON-RPC, with the suite"
        " deployed and TEST-ONLY accounts funded (until SIGINT/SIGTERM)",
    )
    node.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    node.add_argument(
        "--port", type=int, default=8545, help="TCP port, 0 = a free one (default: %(default)s)"
    )
    node.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_DEPLOYMENT),
        metavar="FILE",
        help="where to write the deployment file (default: %(default)s)",
    )
    node.add_argument(
        "--no-deploy", action="store_true", help="only fund the accounts, deploy nothing"
    )
    node.add_argument(
        "--accounts",
        default=",".join(DEV_ACCOUNT_LABELS),
        metavar="LABEL,...",
        help="TEST-ONLY accounts to fund; the first deploys and is the oracle, 'operator' is"
        " enrolled as an Operator (default: %(default)s)",
    )
    node.add_argument(
        "--challenge-period",
        type=int,
        default=DEFAULT_CHALLENGE_PERIOD,
        metavar="SECONDS",
        help="PaymentChannels challenge period (default: %(default)s)",
    )
    node.add_argument(
        "--json", action="store_true", help="print one JSON object (url, accounts...) when ready"
    )
    node.set_defaults(func=_cmd_node)


def _cmd_node(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: 0-65535, got {args.port}")
    if args.challenge_period <= 0:
        raise ConfigError(f"--challenge-period: must be > 0 seconds, got {args.challenge_period}")
    args.out = Path(args.out).resolve()  # printed absolute: other shells paste it as is
    run_async(lambda: _serve(args))
    return 0


def _labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if not labels or any(not label for label in labels):
        raise ConfigError(f"--accounts: comma-separated labels, got {text!r}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--accounts: duplicate label in {text!r}")
    return labels


async def _serve(args: argparse.Namespace) -> None:
    from blendsm.contracts import start_dev_node

    node = await start_dev_node(
        args.host,
        args.port,
        labels=_labels(args.accounts),
        deploy=not args.no_deploy,
        challenge_period=args.challenge_period,
        deployment_path=args.out,
    )
    try:
        _print_started(args, node)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print("blendsm node: stopping (the chain is gone with it)", file=sys.stderr, flush=True)
    finally:
        await node.stop()


def _print_started(args: argparse.Namespace, node: DevNode) -> None:
    accounts = {
        label: {"address": a.address, "private_key": "0x" + a.key.hex()}
        for label, a in node.accounts.items()
    }
    deployment_path: Path | None = None if node.deployment is None else args.out
    if args.json:
        data = {
            "url": node.url,
            "chain_id": node.chain_id,
            "deployment": None if deployment_path is None else str(deployment_path),
            "oracle": None if node.deployment is None else node.deployment.deployer,
            "operator_enrolled": node.operator_enrolled,
            "accounts": accounts,
            "test_only": True,
        }
        print(json.dumps(data, sort_keys=True), flush=True)
        print(f"blendsm node: {_TEST_ONLY_WARNING}", file=sys.stderr, flush=True)
        return
    lines = [
        f"blendsm node: the embedded chain (eth-tester + py-evm) listening on {node.url}",
        f"  chain id     {node.chain_id}",
    ]
    if node.deployment is not None and deployment_path is not None:
        lines += [
            f"  deployment   {deployment_path}"
            f" (challenge period {node.deployment.challenge_period} s)",
            f"  oracle       {node.deployment.deployer} (deployed the suite)",
        ]
    else:
        lines.append("  deployment   none (--no-deploy)")
    if node.operator_enrolled:
        lines.append(
            f"  operator     {node.operator_enrolled} enrolled by the node as an active"
            " Operator in the Registry (ready for `blendsm broker`)"
        )
    lines += [
        "",
        "!" * 78,
        f"!! {_TEST_ONLY_WARNING}",
        "!" * 78,
    ]
    for label, account in accounts.items():
        lines.append(f"# {label}: {account['address']}")
        lines.append(f"export BLENDSM_KEY={account['private_key']}")
        if account["address"] == node.operator_enrolled:
            lines.append(f"export BLENDSM_OPERATOR_KEY={account['private_key']}  # blendsm broker")
    lines += [
        "",
        f"export BLENDSM_CHAIN={node.url}",
    ]
    if deployment_path is not None:
        lines.append(f"export BLENDSM_DEPLOYMENT={deployment_path}")
    lines.append("Serving until Ctrl-C (SIGINT) or SIGTERM.")
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
