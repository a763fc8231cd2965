"""The ``blendsm`` command line: the parser and :func:`main`.

Subcommands grow with the product; each prints human output by default and one JSON
object with ``--json`` (``verify``: one per message). Errors from our tree become one clear
line on stderr and exit 2; ``verify`` and ``anchors verify`` exit 1 when a check fails.
Each command lives in a module of its own whose ``register(subparsers)`` adds it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from blendsm import __version__
from blendsm.errors import BlendsmError

__all__ = ["build_parser", "main"]

#: The command modules, in the order ``blendsm --help`` lists their commands.
_COMMAND_MODULES: tuple[str, ...] = (
    "_deploy",
    "_broker",
    "_demo",
    "_verify",
    "_contracts",
    "_node",
    "_registry",
    "_operator",
    "_market",
    "_channel",
    "_rate",
    "_anchors",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``blendsm`` parser with every command; a command's ``func`` runs it."""
    parser = argparse.ArgumentParser(
        prog="blendsm",
        description="BlendSM: a decentralized IoT data marketplace on MQTT with on-chain payments.",
    )
    parser.add_argument("--version", action="version", version=f"blendsm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        importlib.import_module(f"blendsm.cli.{module}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blendsm`` with ``argv`` (default: the process's arguments); the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BlendsmError as exc:
        print(f"blendsm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
