"""``blendsm operator broker ...``: an operator's broker processes on chain (add, update,
retire, list), through the ``Brokers`` contract.

Why a command of its own: an operator that runs several brokers (one per core or machine)
registers each one's signing key and endpoints so that clients can find them and fail over,
and retires a broker on chain rather than just stopping it, so that clients see it go. The
broker key is given as an address: its private key stays with the broker process and never
passes through this command.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from blendsm.cli._support import (
    DEFAULT_KEY_ENV,
    Output,
    add_chain_command,
    add_command_group,
    arg,
    format_time,
    parse_address,
    run_chain_command,
    signing_account,
    tx_output,
)
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import BrokerInfo, Marketplace

__all__ = ["register"]

_BROKER_ARG = arg("broker", metavar="BROKER", help="the broker's key address")
_ENDPOINT_ARG = arg(
    "--endpoint",
    dest="endpoints",
    action="append",
    required=True,
    metavar="URL",
    help="where clients connect: mqtt://host:1883, mqtts://host:8883, ws://..., wss://host/mqtt"
    " (repeat for each, at most 8)",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``operator`` and its ``broker`` actions to the ``blendsm`` parser."""
    groups = add_command_group(sub, "operator", help="a broker operator's brokers on chain")
    actions = add_command_group(
        groups, "broker", help="register, update, retire and list the operator's brokers"
    )
    add_chain_command(
        actions,
        "add",
        _cmd_add,
        signing=True,
        help="register a broker of the signing operator",
        arguments=[_BROKER_ARG, _ENDPOINT_ARG],
    )
    add_chain_command(
        actions,
        "update",
        _cmd_update,
        signing=True,
        help="replace the endpoints of one of the signing operator's brokers",
        arguments=[_BROKER_ARG, _ENDPOINT_ARG],
    )
    add_chain_command(
        actions,
        "retire",
        _cmd_retire,
        signing=True,
        help="retire one of the signing operator's brokers for good (clients move)",
        arguments=[_BROKER_ARG],
    )
    add_chain_command(
        actions,
        "list",
        _cmd_list,
        signing=True,
        help="an operator's brokers (default: the signer's), or every broker with --all",
        arguments=[
            arg("operator", nargs="?", metavar="OPERATOR", help="the operator (default: signer)"),
            arg("--all", action="store_true", help="every registered broker, of any operator"),
        ],
    )


def _broker_lines(info: BrokerInfo) -> list[str]:
    state = info.status.name.lower()
    if info.status.name == "ACTIVE" and not info.active:
        state += " (operator not active: clients must not use it)"
    return [
        f"{info.broker_key}  {state}",
        f"  operator    {info.operator}",
        f"  registered  {format_time(info.registered_at)}",
        *(f"  endpoint    {e}" for e in info.endpoints),
    ]


def _endpoints(args: argparse.Namespace) -> str:
    """The ``--endpoint`` values as the contract's one space-separated string. A value with
    whitespace inside would become two URLs: refused here, naming it."""
    for url in args.endpoints:
        if not url or any(ch.isspace() for ch in url):
            raise ConfigError(f"--endpoint: {url!r} is empty or contains whitespace")
    return " ".join(args.endpoints)


async def _record(mp: Marketplace, broker: str) -> BrokerInfo:
    info = await mp.brokers.broker(broker)
    if info is None:  # just written: the node answered before it saw its own block?
        raise ConfigError(f"broker {broker} is not registered")
    return info


def _cmd_add(args: argparse.Namespace) -> int:
    broker = parse_address(args.broker, "BROKER")
    endpoints = _endpoints(args)

    async def body(mp: Marketplace) -> Output:
        result = await mp.brokers.register_broker(broker, endpoints)
        info = await _record(mp, broker)
        return tx_output(
            result,
            {"action": "add", **info.as_json()},
            f"broker {broker} registered to {info.operator}: {' '.join(info.endpoints)}",
        )

    return run_chain_command(args, body, signing=True)


def _cmd_update(args: argparse.Namespace) -> int:
    broker = parse_address(args.broker, "BROKER")
    endpoints = _endpoints(args)

    async def body(mp: Marketplace) -> Output:
        result = await mp.brokers.update_endpoints(broker, endpoints)
        info = await _record(mp, broker)
        return tx_output(
            result,
            {"action": "update", **info.as_json()},
            f"broker {broker} now at {' '.join(info.endpoints)}",
        )

    return run_chain_command(args, body, signing=True)


def _cmd_retire(args: argparse.Namespace) -> int:
    broker = parse_address(args.broker, "BROKER")

    async def body(mp: Marketplace) -> Output:
        result = await mp.brokers.retire_broker(broker)
        info = await _record(mp, broker)
        return tx_output(
            result,
            {"action": "retire", **info.as_json()},
            f"broker {broker} retired for good (clients see it on chain and move)",
        )

    return run_chain_command(args, body, signing=True)


def _operator_of(args: argparse.Namespace) -> str | None:
    """None for ``--all``; else OPERATOR checked, or the signer's address."""
    if args.all:
        if args.operator is not None:
            raise ConfigError("give OPERATOR or --all, not both")
        return None
    if args.operator is not None:
        return parse_address(args.operator, "OPERATOR")
    try:
        return str(signing_account(args).address)
    except ConfigError as exc:
        key_env = getattr(args, "key_env", None) or DEFAULT_KEY_ENV
        raise ConfigError(
            f"give OPERATOR or --all, or a key (${key_env} or --keystore) to list the"
            f" signer's brokers ({exc})"
        ) from None


def _cmd_list(args: argparse.Namespace) -> int:
    operator = _operator_of(args)

    async def body(mp: Marketplace) -> Output:
        found = await mp.brokers.brokers(operator)
        whose = "every operator" if operator is None else operator
        active = sum(1 for b in found if b.active)
        lines = [f"{len(found)} broker{'' if len(found) == 1 else 's'} of {whose}, {active} active"]
        for info in found:
            lines += _broker_lines(info)
        return {"operator": operator, "brokers": [b.as_json() for b in found]}, lines

    return run_chain_command(args, body, signing=False)
