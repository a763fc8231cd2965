"""Plumbing shared by the chain commands of ``blendsm`` (registry, market, channel, anchors,
rate): where the chain and deployment are, whose key signs, how values are parsed, how
results are printed, and how a command is declared (:func:`add_chain_command`) and run
(:func:`run_chain_command`).

Every command takes ``--chain URL`` and ``--deployment FILE`` (defaults from
``$BLENDSM_CHAIN`` / ``$BLENDSM_DEPLOYMENT``, else ``http://127.0.0.1:8545`` and
``./deployment.json``, which is what ``blendsm node`` serves and writes), and ``--json`` for one
JSON object on stdout. Commands that send transactions sign with the key in ``$BLENDSM_KEY``
(or ``--key-env VAR``) or in ``--keystore FILE``; keys never come from arguments. Bad input
raises :class:`~blendsm.errors.ConfigError`, which ``main`` turns into one line and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from blendsm.errors import ConfigError

if TYPE_CHECKING:  # importing web3 at CLI start would slow every command down
    from blendsm.contracts import ChainEvent, Deployment, Marketplace, TxResult

__all__ = [
    "CHAIN_ENV",
    "DEFAULT_CHAIN",
    "DEFAULT_DEPLOYMENT",
    "DEFAULT_KEY_ENV",
    "DEPLOYMENT_ENV",
    "Arg",
    "Output",
    "add_chain_arguments",
    "add_chain_command",
    "add_command_group",
    "address_topic",
    "arg",
    "chain_now",
    "emit",
    "fetch_events",
    "format_duration",
    "format_time",
    "format_wei",
    "open_marketplace",
    "parse_address",
    "parse_bytes32",
    "parse_topic",
    "parse_wei",
    "run_async",
    "run_chain_command",
    "signing_account",
    "tx_json",
    "tx_line",
    "tx_output",
]

DEFAULT_CHAIN = "http://127.0.0.1:8545"
DEFAULT_DEPLOYMENT = "deployment.json"
DEFAULT_KEY_ENV = "BLENDSM_KEY"
CHAIN_ENV = "BLENDSM_CHAIN"
DEPLOYMENT_ENV = "BLENDSM_DEPLOYMENT"

_UNITS = {"wei": 0, "kwei": 3, "mwei": 6, "gwei": 9, "szabo": 12, "finney": 15, "ether": 18}
_UNITS["eth"] = 18
#: Blocks per eth_getLogs call: public nodes refuse wide ranges, and 10k stays well inside.
_LOG_SPAN = 10_000

T = TypeVar("T")


def add_chain_arguments(parser: argparse.ArgumentParser, *, signing: bool) -> None:
    """Add ``--chain``, ``--deployment`` and ``--json``; with ``signing``, also the key options
    and ``--confirmations``."""
    parser.add_argument(
        "--chain",
        default=os.environ.get(CHAIN_ENV, DEFAULT_CHAIN),
        metavar="URL",
        help=f"JSON-RPC endpoint, http(s):// or ws(s):// (default: ${CHAIN_ENV} or %(default)s)",
    )
    parser.add_argument(
        "--deployment",
        type=Path,
        default=Path(os.environ.get(DEPLOYMENT_ENV, DEFAULT_DEPLOYMENT)),
        metavar="FILE",
        help=f"deployment file written by `blendsm deploy` or `blendsm node`"
        f" (default: ${DEPLOYMENT_ENV} or %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    if not signing:
        return
    parser.add_argument(
        "--key-env",
        metavar="VAR",
        default=DEFAULT_KEY_ENV,
        help="environment variable holding the signer's private key (default: %(default)s)",
    )
    parser.add_argument(
        "--keystore",
        type=Path,
        metavar="FILE",
        help="encrypted keystore of the signer (overrides --key-env)",
    )
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        default="BLENDSM_KEYSTORE_PASSWORD",
        help="environment variable holding the keystore password (default: %(default)s)",
    )
    parser.add_argument(
        "--confirmations",
        type=int,
        default=0,
        metavar="N",
        help="blocks to wait on top of each transaction's block (default: %(default)s)",
    )


def signing_account(args: argparse.Namespace, *, required: bool = True) -> Any:
    """The LocalAccount that signs: ``--keystore`` if given, else the key in ``--key-env``
    (``$BLENDSM_KEY`` when the command gives the option no value). Not ``required``: None
    when neither option names a key (``deploy``, whose embedded chain has a TEST deployer)."""
    from blendsm.device_sdk import account_from_env, account_from_keystore

    keystore = getattr(args, "keystore", None)
    if keystore is not None:
        return account_from_keystore(keystore, args.password_env)
    key_env = getattr(args, "key_env", None)
    if not key_env and not required:
        return None
    return account_from_env(key_env or DEFAULT_KEY_ENV)


@asynccontextmanager
async def open_marketplace(
    args: argparse.Namespace, *, signing: bool
) -> AsyncIterator[Marketplace]:
    """A :class:`~blendsm.contracts.Marketplace` on the deployment, checked against the
    endpoint (chain id, contract code), signing as :func:`signing_account` when ``signing``."""
    from blendsm.contracts import EMBEDDED, Marketplace, connect, disconnect

    if args.chain == EMBEDDED:
        raise ConfigError(
            "--chain embedded lives inside one process and is gone when it exits; start"
            " `blendsm node` (the embedded chain over JSON-RPC) and use its URL"
        )
    account = signing_account(args) if signing else None
    deployment = _load_deployment(Path(args.deployment))
    w3 = connect(args.chain)
    try:
        market = Marketplace(
            w3, deployment, account, confirmations=getattr(args, "confirmations", 0)
        )
        await market.check()
        yield market
    finally:
        await disconnect(w3)


def _load_deployment(path: Path) -> Deployment:
    from blendsm.contracts import Deployment

    if not path.is_file():
        raise ConfigError(
            f"deployment file {path} does not exist (give --deployment FILE, or"
            f" ${DEPLOYMENT_ENV}; `blendsm node` and `blendsm deploy --out` write one)"
        )
    return Deployment.load(path)


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one command's coroutine to completion on a fresh event loop."""
    return asyncio.run(factory())


# --- parsing -------------------------------------------------------------------------------


def parse_wei(text: str, what: str = "amount") -> int:
    """``"1000"`` (wei), ``"1.5ether"``, ``"2 gwei"``, ``"10wei"`` -> wei; never negative,
    never a fraction of a wei."""
    raw = text.strip().lower().replace("_", "")
    number, unit = raw, "wei"
    for name in sorted(_UNITS, key=len, reverse=True):
        if raw.endswith(name):
            number, unit = raw[: -len(name)].strip(), name
            break
    try:
        value = Decimal(number) * (Decimal(10) ** _UNITS[unit])
    except InvalidOperation:
        raise ConfigError(
            f"{what}: {text!r} is not an amount (use wei, or a unit: 1.5ether, 2gwei)"
        ) from None
    if value != value.to_integral_value():
        raise ConfigError(f"{what}: {text!r} is not a whole number of wei")
    if value < 0:
        raise ConfigError(f"{what}: must not be negative, got {text!r}")
    return int(value)


def format_wei(value: int) -> str:
    """``10**16`` -> ``"0.01 ETH (10000000000000000 wei)"``; small amounts stay in wei."""
    if abs(value) < 10**12:
        return f"{value} wei"
    ether = (Decimal(value) / Decimal(10**18)).normalize()
    return f"{ether:f} ETH ({value} wei)"


def parse_address(text: str, what: str = "address") -> str:
    """A 0x-prefixed 20-byte hex address -> its checksummed form."""
    from blendsm.device_sdk import checksum_address

    try:
        raw = bytes.fromhex(text.removeprefix("0x").removeprefix("0X"))
    except ValueError:
        raw = b""
    if len(raw) != 20:
        raise ConfigError(f"{what}: not an address: {text!r}")
    return checksum_address(raw)


def parse_bytes32(text: str, what: str) -> bytes:
    """A 0x-prefixed 32-byte hex value (channel ids, topic ids, roots)."""
    try:
        raw = bytes.fromhex(text.removeprefix("0x").removeprefix("0X"))
    except ValueError:
        raw = b""
    if len(raw) != 32 or not text.lower().startswith("0x"):
        raise ConfigError(f"{what}: expected 0x and 64 hex digits, got {text!r}")
    return raw


def parse_topic(text: str) -> bytes:
    """A topic id: 0x + 64 hex digits as is, anything else is a topic name (its keccak256)."""
    from blendsm.device_sdk import keccak256

    if text.lower().startswith("0x") and len(text) == 66:
        return parse_bytes32(text, "topic")
    if not text:
        raise ConfigError("topic: empty name")
    return keccak256(text.encode())


# --- output --------------------------------------------------------------------------------


def tx_json(result: TxResult) -> dict[str, Any]:
    """The common fields of a mined transaction, for ``--json`` output."""
    return {
        "tx": "0x" + result.tx_hash.hex(),
        "block": result.block_number,
        "gas_used": result.gas_used,
    }


def emit(args: argparse.Namespace, data: dict[str, Any], human: str | Iterable[str]) -> None:
    """Print ``data`` as one JSON line with ``--json``, else the human lines."""
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True, default=_json_default), flush=True)
        return
    lines = [human] if isinstance(human, str) else list(human)
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tx_line(result: TxResult) -> str:
    """The human line of a mined transaction: hash, block, gas."""
    return f"  tx 0x{result.tx_hash.hex()}  block {result.block_number}  gas {result.gas_used}"


def format_time(timestamp: int) -> str:
    """Unix seconds -> ``2026-11-24 21:15:17 UTC``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(seconds: int) -> str:
    """``3725`` -> ``1h 2m 5s``; ``0`` -> ``0s``."""
    seconds = max(0, seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


# --- chain reads ---------------------------------------------------------------------------


async def chain_now(mp: Marketplace) -> int:
    """The timestamp the next block will at least carry: the latest block's, or the wall
    clock when a node mining on demand has not made a block for a while."""
    from blendsm.contracts import chain_errors

    with chain_errors("latest block"):
        block = await mp.w3.eth.get_block("latest")
    return max(int(block["timestamp"]), int(time.time()))


def address_topic(address: str) -> str:
    """An address as an indexed-argument topic (a 32-byte word)."""
    return "0x" + "00" * 12 + address[2:].lower()


async def fetch_events(
    mp: Marketplace, select: Iterable[str], topics: Iterable[str | None] = ()
) -> list[ChainEvent]:
    """Decoded ``Contract.Event`` logs of ``select`` from the deployment block to the head, in
    chain order, fetched in bounded block ranges; ``topics`` filters the indexed arguments
    (0x-hex word or None for any). The contracts cannot enumerate applicants, devices or
    channels, so these commands replay events and confirm each candidate against state."""
    from blendsm.contracts import EventDecoder, chain_errors

    decoder = EventDecoder(mp.deployment, list(select))
    wanted = list(topics)
    with chain_errors("read events: block number"):
        head = int(await mp.w3.eth.block_number)
    found: list[ChainEvent] = []
    for start in range(mp.deployment.block, head + 1, _LOG_SPAN):
        params = decoder.filter(start, min(head, start + _LOG_SPAN - 1))
        params["topics"] = [*params["topics"], *wanted]
        with chain_errors("read events: get logs"):
            logs = await mp.w3.eth.get_logs(params)
        for log in logs:
            decoded = decoder.decode(log)
            if decoded is not None and not log.get("removed"):
                found.append(decoded)
    found.sort(key=lambda e: e.position)
    return found


# --- command plumbing ----------------------------------------------------------------------

#: One argument of a command: the names/flags and the keywords of ``add_argument``.
Arg = tuple[tuple[str, ...], dict[str, Any]]
#: What a command prints: the ``--json`` object and the human lines (see :func:`emit`).
Output = tuple[dict[str, Any], str | Iterable[str]]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument for :func:`add_chain_command`, written as to ``add_argument``."""
    return flags, options


def add_command_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, **parser_options: Any
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add the command group ``name`` (``parser_options``: help, description, ...) and return
    its required ``ACTION`` subparsers, whose choice lands in ``args.<name>_command``."""
    group = sub.add_parser(name, **parser_options)
    return group.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


def add_chain_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    signing: bool,
    arguments: Iterable[Arg] = (),
    one_of: Iterable[Arg] = (),
    one_of_required: bool = False,
    defaults: dict[str, Any] | None = None,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` (``parser_options``: help, description, ...) running
    ``func``: its ``arguments``, then the mutually exclusive ``one_of`` (if any), then
    :func:`add_chain_arguments`; ``defaults`` are further ``set_defaults`` values."""
    parser = sub.add_parser(name, **parser_options)
    for flags, options in arguments:
        parser.add_argument(*flags, **options)
    exclusive = list(one_of)
    if exclusive:
        group = parser.add_mutually_exclusive_group(required=one_of_required)
        for flags, options in exclusive:
            group.add_argument(*flags, **options)
    add_chain_arguments(parser, signing=signing)
    parser.set_defaults(func=func, **(defaults or {}))
    return parser


def run_chain_command(
    args: argparse.Namespace,
    body: Callable[[Marketplace], Awaitable[Output]],
    *,
    signing: bool,
) -> int:
    """Run one command: ``body`` on the marketplace of ``args`` (:func:`open_marketplace`),
    then, the connection closed, :func:`emit` the ``(data, human)`` it returned; exit 0.
    Errors propagate, so nothing is printed when ``body`` fails."""

    async def run() -> int:
        async with open_marketplace(args, signing=signing) as mp:
            data, human = await body(mp)
        emit(args, data, human)
        return 0

    return run_async(run)


def tx_output(result: TxResult, data: dict[str, Any], *lines: str) -> Output:
    """The output of a command that sent ``result``: ``data`` with the :func:`tx_json` fields,
    and the human ``lines`` followed by the :func:`tx_line`."""
    return {**data, **tx_json(result)}, [*lines, tx_line(result)]
