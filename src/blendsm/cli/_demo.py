"""``blendsm demo``: run the whole marketplace embedded (chain, broker, devices, buyers) and
check that every wei and every message is accounted for.

The command only parses and prints; the run itself is :func:`~blendsm.cli._demo_run.run_demo`,
imported when the command runs, so other commands never load the broker and the chain.
Exit 0 when every invariant holds, 1 when one is broken (listed on stderr), 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from blendsm.errors import ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm demo``."""
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
    demo.add_argument(
        "--brokers",
        type=int,
        default=1,
        metavar="N",
        help="serve the market with N broker processes of two operators (2-4) on a chain"
        " the demo serves itself; one is killed mid-stream and the buyers move"
        " (default: %(default)s, the embedded single-broker demo)",
    )
    demo.add_argument(
        "--chain",
        metavar="URL",
        help="with --brokers: a development node to run on (anvil: it must answer"
        " anvil_setBalance, evm_increaseTime, evm_mine) instead of the demo's own",
    )
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from blendsm.cli._demo_report import format_summary
    from blendsm.cli._demo_run import run_demo

    if not args.duration > 0:
        raise ConfigError(f"--duration: must be > 0 seconds, got {args.duration:g}")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.chain is not None and args.brokers == 1:
        raise ConfigError("--chain: only with --brokers (the single-broker demo is embedded)")
    if args.brokers != 1:
        from blendsm.cli._demo_many import run_many_brokers_demo
        from blendsm.cli._demo_many_parts import MAX_BROKERS
        from blendsm.cli._demo_many_report import format_many_summary

        if not 2 <= args.brokers <= MAX_BROKERS:
            raise ConfigError(f"--brokers: must be 1 to {MAX_BROKERS}, got {args.brokers}")
        if not args.duration >= 5:
            raise ConfigError(f"--duration: must be >= 5 s with --brokers, got {args.duration:g}")
        report = asyncio.run(
            run_many_brokers_demo(args.brokers, args.duration, chain_url=args.chain)
        )
        summary = format_many_summary(report)
    else:
        report = asyncio.run(run_demo(args.duration, quiet=False))
        summary = format_summary(report)
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True), flush=True)
    else:
        print(summary, flush=True)
    if not report.ok:
        print("blendsm demo: invariants broken: " + "; ".join(report.problems), file=sys.stderr)
        return 1
    return 0
