"""``blendsm verify``: check a Subscriber's record file against the chain.

Every message line is re-checked from its envelope (signature, the device belongs to the
topic's seller, sequence order) and every proof against the root that the named broker
operator anchored, so a buyer can audit what it received without trusting the broker.
Prints one line (``--json``: one object) per message; exits 1 when a message fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from blendsm.cli._support import parse_address
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.device_sdk import RecordVerdict

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm verify``."""
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


def _human(v: RecordVerdict) -> str:
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


def _cmd_verify(args: argparse.Namespace) -> int:
    from blendsm.device_sdk import (
        MessageDomain,
        MessageVerifier,
        Web3ChainReader,
        read_record,
        verify_record,
    )

    broker = parse_address(args.broker, "--broker")
    if not args.file.is_file():
        raise ConfigError(f"record file {args.file} does not exist")
    reader = Web3ChainReader(args.chain, args.deployment)
    verifier = MessageVerifier(MessageDomain(reader.chain_id, reader.registry), reader)
    verdicts = verify_record(read_record(args.file), verifier, broker)

    for verdict in verdicts:
        if args.json:
            print(json.dumps(verdict.to_json(), sort_keys=True))
        else:
            print(_human(verdict))
    failed = sum(1 for v in verdicts if not v.ok)
    proven = sum(1 for v in verdicts if v.proof is not None and v.proof.ok)
    if not args.json:
        print(
            f"{len(verdicts)} messages: {len(verdicts) - failed} ok, {failed} failed;"
            f" {proven} proven against the on-chain root of broker {broker}"
        )
    return 1 if failed else 0
