"""``blendsm contracts compile|check``: development tools for the Solidity sources.

``compile`` rebuilds the committed artifacts with the pinned solc-js (needs ``npm ci``);
``check`` fails when the artifacts no longer match their sources or compiler settings, so
CI catches a contract edited without its artifacts.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm contracts`` and its two actions."""
    contracts = sub.add_parser("contracts", help="development tools for the Solidity sources")
    csub = contracts.add_subparsers(dest="contracts_command", metavar="ACTION", required=True)
    compile_ = csub.add_parser(
        "compile", help="recompile contracts/src into the committed artifacts (needs `npm ci`)"
    )
    compile_.set_defaults(func=_cmd_compile)
    check = csub.add_parser(
        "check", help="fail if the artifacts are stale against sources or settings"
    )
    check.set_defaults(func=_cmd_check)


def _cmd_compile(args: argparse.Namespace) -> int:
    from blendsm.contracts import compile_contracts

    manifest = compile_contracts()
    print(
        f"compiled with solc {manifest['compilerVersion']} ({len(manifest['artifacts'])} artifacts)"
    )
    for warning in manifest["warnings"]:
        print(warning, file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from blendsm.contracts import repository_root, verify_manifest

    node_modules = repository_root() / "node_modules"
    problems = verify_manifest(node_modules if node_modules.is_dir() else None)
    for problem in problems:
        print(f"stale: {problem}", file=sys.stderr)
    if problems:
        print("run `blendsm contracts compile` and commit the artifacts", file=sys.stderr)
        return 1
    print("artifacts match their sources and compiler settings")
    return 0
