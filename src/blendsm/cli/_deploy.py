"""``blendsm deploy``: deploy the marketplace contracts and print (or save) their addresses.

``--chain embedded`` (the default) deploys to an in-process EVM that is gone when the command
exits: a quick look at the suite; ``blendsm node`` keeps one alive. A JSON-RPC endpoint needs
the deployer's key from ``--key-env`` or ``--keystore`` (never from an argument).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from blendsm.cli._support import signing_account
from blendsm.errors import ConfigError

__all__ = ["register"]

_T = TypeVar("_T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm deploy``."""
    deploy = sub.add_parser(
        "deploy", help="deploy the marketplace contracts and print their addresses"
    )
    deploy.add_argument(
        "--chain",
        default="embedded",
        help="'embedded' (in-process EVM, default) or a JSON-RPC URL (http://, ws://)",
    )
    deploy.add_argument(
        "--key-env", metavar="VAR", help="environment variable holding the deployer's private key"
    )
    deploy.add_argument(
        "--keystore", metavar="FILE", type=Path, help="encrypted keystore file of the deployer"
    )
    deploy.add_argument(
        "--password-env",
        metavar="VAR",
        default="BLENDSM_KEYSTORE_PASSWORD",
        help="environment variable holding the keystore password (default: %(default)s)",
    )
    deploy.add_argument(
        "--challenge-period",
        type=int,
        default=24 * 3600,
        metavar="SECONDS",
        help="seconds a payee has to claim after a close request (default: %(default)s)",
    )
    deploy.add_argument("--out", type=Path, metavar="FILE", help="write the deployment file here")
    deploy.add_argument(
        "--upgrade",
        type=Path,
        metavar="FILE",
        help="deploy only the contracts this older deployment file lacks (Brokers) and write it"
        " back (or to --out)",
    )
    deploy.add_argument("--json", action="store_true", help="print one JSON object")
    deploy.set_defaults(func=_cmd_deploy)


def _cmd_deploy(args: argparse.Namespace) -> int:
    from blendsm.contracts import (
        EMBEDDED,
        Deployment,
        connect,
        deploy_later_contracts,
        deploy_suite,
        new_embedded_chain,
        test_account,
    )

    account = signing_account(args, required=False)
    if args.chain == EMBEDDED:
        if account is None:
            account = test_account("deployer")  # TEST ONLY: the embedded chain holds no value
        w3 = connect(EMBEDDED, ethereum_tester=new_embedded_chain(fund=[account.address]))
    else:
        w3 = connect(args.chain)
        if account is None:
            raise ConfigError("deploying to a JSON-RPC endpoint needs --key-env or --keystore")
    if args.upgrade is not None:
        if args.chain == EMBEDDED:
            raise ConfigError("--upgrade needs --chain URL: the embedded chain starts empty")
        old = Deployment.load(args.upgrade)
        deployment = asyncio.run(_closing(w3, deploy_later_contracts(w3, account, old)))
        args.out = args.out or args.upgrade
        added = sorted(set(deployment.addresses) - set(old.addresses))
        if not args.json:
            print(f"Added {', '.join(added)}" if added else "Nothing to add: the suite is complete")
    else:
        deployment = asyncio.run(
            _closing(w3, deploy_suite(w3, account, challenge_period=args.challenge_period))
        )
    if args.out:
        deployment.save(args.out)
    if args.json:
        print(json.dumps(dataclasses.asdict(deployment), sort_keys=True))
    else:
        where = (
            "the embedded chain (in-process, gone when this command exits)"
            if args.chain == EMBEDDED
            else args.chain
        )
        verb = (
            "Completed the BlendSM suite on"
            if args.upgrade is not None
            else "Deployed the BlendSM suite to"
        )
        print(f"{verb} {where}")
        print(
            f"  chain id  {deployment.chain_id}   block {deployment.block}   oracle {deployment.deployer}"
        )
        for name, address in deployment.addresses.items():
            print(f"  {name:<16}{address}")
        if args.out:
            print(f"Deployment written to {args.out}")
    return 0


async def _closing(w3: Any, work: Awaitable[_T]) -> _T:
    """``work``, then ``w3``'s connection closed on the same loop (web3 caches its session:
    left open, the node's socket stayed until the process ended)."""
    from blendsm.contracts import disconnect

    try:
        return await work
    finally:
        await disconnect(w3)
