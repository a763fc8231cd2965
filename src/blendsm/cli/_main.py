"""The ``blendsm`` command line.

Subcommands grow with the product; each prints human output by default and one JSON
object with ``--json`` (``verify``: one per message). Errors from our tree become one clear
line on stderr and exit 2; ``verify`` exits 1 when a message fails its checks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blendsm import __version__
from blendsm.errors import BlendsmError, ConfigError

__all__ = ["main"]

#: Modules whose ``register(subparsers)`` adds a command group.
_COMMAND_GROUPS: tuple[str, ...] = (
    "blendsm.contracts._devnode",
    "blendsm.cli._registry",
    "blendsm.cli._market",
    "blendsm.cli._channel",
    "blendsm.cli._anchors",
)


def _load_account(args: argparse.Namespace) -> Any:
    from blendsm.device_sdk import account_from_env, account_from_keystore

    if args.keystore:
        return account_from_keystore(args.keystore, args.password_env)
    if args.key_env:
        return account_from_env(args.key_env)
    return None


def _cmd_deploy(args: argparse.Namespace) -> int:
    from blendsm.contracts._connect import EMBEDDED, connect
    from blendsm.contracts._deploy import deploy_suite
    from blendsm.contracts._devchain import new_embedded_chain, test_account

    account = _load_account(args)
    if args.chain == EMBEDDED:
        if account is None:
            account = test_account("deployer")  # TEST ONLY: the embedded chain holds no value
        w3 = connect(EMBEDDED, ethereum_tester=new_embedded_chain(fund=[account.address]))
    else:
        w3 = connect(args.chain)
        if account is None:
            raise ConfigError("deploying to a JSON-RPC endpoint needs --key-env or --keystore")
    deployment = asyncio.run(deploy_suite(w3, account, challenge_period=args.challenge_period))
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
        print(f"Deployed the BlendSM suite to {where}")
        print(
            f"  chain id  {deployment.chain_id}   block {deployment.block}   oracle {deployment.deployer}"
        )
        for name, address in deployment.addresses.items():
            print(f"  {name:<16}{address}")
        if args.out:
            print(f"Deployment written to {args.out}")
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    import logging
    import signal

    from blendsm.broker._config import load_config
    from blendsm.broker._runner import start_broker

    config = load_config(args.config)
    if args.port is not None:
        config = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, port=args.port)
        )
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("amqtt").setLevel(
        max(logging.WARNING, logging.getLevelName(config.log_level))
    )

    async def serve() -> None:
        running = await start_broker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"blendsm broker listening on {running.host}:{running.port}"
            f" (operator {running.chain.operator.address}, chain id"
            f" {running.chain.deployment.chain_id})",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            print("blendsm broker stopping", flush=True)
            await running.stop()

    asyncio.run(serve())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from blendsm.cli._demo import format_summary, run_demo

    if not args.duration > 0:
        raise ConfigError(f"--duration: must be > 0 seconds, got {args.duration:g}")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run_demo(args.duration, quiet=False))
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True), flush=True)
    else:
        print(format_summary(report), flush=True)
    if not report.ok:
        print("blendsm demo: invariants broken: " + "; ".join(report.problems), file=sys.stderr)
        return 1
    return 0


def _cmd_contracts_compile(args: argparse.Namespace) -> int:
    from blendsm.contracts._compile import compile_contracts

    manifest = compile_contracts()
    print(
        f"compiled with solc {manifest['compilerVersion']} ({len(manifest['artifacts'])} artifacts)"
    )
    for warning in manifest["warnings"]:
        print(warning, file=sys.stderr)
    return 0


def _cmd_contracts_check(args: argparse.Namespace) -> int:
    from blendsm.contracts._artifacts import verify_manifest
    from blendsm.contracts._compile import repository_root

    node_modules = repository_root() / "node_modules"
    problems = verify_manifest(node_modules if node_modules.is_dir() else None)
    for problem in problems:
        print(f"stale: {problem}", file=sys.stderr)
    if problems:
        print("run `blendsm contracts compile` and commit the artifacts", file=sys.stderr)
        return 1
    print("artifacts match their sources and compiler settings")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from blendsm.device_sdk import (
        MessageDomain,
        MessageVerifier,
        RecordVerdict,
        Web3ChainReader,
        read_record,
        verify_record,
    )
    from blendsm.device_sdk._keccak import checksum_address

    try:
        raw = bytes.fromhex(args.broker.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 20:
        raise ConfigError(f"--broker: not an address: {args.broker!r}")
    broker = checksum_address(raw)
    if not args.file.is_file():
        raise ConfigError(f"record file {args.file} does not exist")
    reader = Web3ChainReader(args.chain, args.deployment)
    verifier = MessageVerifier(MessageDomain(reader.chain_id, reader.registry), reader)
    verdicts = verify_record(read_record(args.file), verifier, broker)

    def human(v: RecordVerdict) -> str:
        who = f"{v.topic} seq {v.sequence} from {v.device}" if v.device else f"{v.topic}"
        checks = []
        if v.verified is True:
            checks.append("signature ok, device of the topic's seller")
        elif v.verified is None:
            checks.append(f"unchecked ({v.unchecked or 'chain unavailable'})")
        if v.proof is not None:
            checks.append(f"{v.proof.kind}: {v.proof.detail}")
        else:
            checks.append("no proof recorded")
        checks.extend(f"{e.kind}: {e.detail}" for e in v.events)
        return f"{'OK  ' if v.ok else 'FAIL'} line {v.line}: {who}: " + "; ".join(checks)

    for verdict in verdicts:
        if args.json:
            print(json.dumps(verdict.to_json(), sort_keys=True))
        else:
            print(human(verdict))
    failed = sum(1 for v in verdicts if not v.ok)
    proven = sum(1 for v in verdicts if v.proof is not None and v.proof.ok)
    if not args.json:
        print(
            f"{len(verdicts)} messages: {len(verdicts) - failed} ok, {failed} failed;"
            f" {proven} proven against the on-chain root of broker {broker}"
        )
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blendsm",
        description="BlendSM: a decentralized IoT data marketplace on MQTT with on-chain payments.",
    )
    parser.add_argument("--version", action="version", version=f"blendsm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    deploy.add_argument("--json", action="store_true", help="print one JSON object")
    deploy.set_defaults(func=_cmd_deploy)

    broker = sub.add_parser(
        "broker", help="run the MQTT broker with the marketplace plugins (until SIGINT/SIGTERM)"
    )
    broker.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="broker YAML (see docs)"
    )
    broker.add_argument("--port", type=int, metavar="N", help="override listen.port")
    broker.set_defaults(func=_cmd_broker)

    demo = sub.add_parser(
        "demo",
        help="run the whole marketplace embedded (chain, broker, devices, buyers) and check"
        " that every wei and every message is accounted for",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds the devices stream readings (default: %(default)s)",
    )
    demo.add_argument(
        "--json", action="store_true", help="print one JSON object with the figures (wei)"
    )
    demo.set_defaults(func=_cmd_demo)

    verify = sub.add_parser(
        "verify",
        help="check a subscriber's record file against the chain: signatures, devices,"
        " sequences and inclusion proofs",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the Subscriber's record_path")
    verify.add_argument("--chain", required=True, metavar="URL", help="JSON-RPC URL (http://)")
    verify.add_argument(
        "--deployment", required=True, type=Path, metavar="FILE", help="the deployment file"
    )
    verify.add_argument(
        "--broker",
        required=True,
        metavar="OPERATOR",
        help="address of the broker operator whose anchors the proofs are checked against",
    )
    verify.add_argument("--json", action="store_true", help="one JSON object per message")
    verify.set_defaults(func=_cmd_verify)

    contracts = sub.add_parser("contracts", help="development tools for the Solidity sources")
    csub = contracts.add_subparsers(dest="contracts_command", metavar="ACTION", required=True)
    compile_ = csub.add_parser(
        "compile", help="recompile contracts/src into the committed artifacts (needs `npm ci`)"
    )
    compile_.set_defaults(func=_cmd_contracts_compile)
    check = csub.add_parser(
        "check", help="fail if the artifacts are stale against sources or settings"
    )
    check.set_defaults(func=_cmd_contracts_check)

    # Chain command groups: each module's register(sub) adds its subcommands.
    for module in _COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BlendsmError as exc:
        print(f"blendsm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
