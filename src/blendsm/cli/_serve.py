"""``blendsm market serve`` and ``blendsm market serving``: which operators serve a seller's
topics (the ``Brokers`` contract), and where a client finds their brokers.

``serve TOPIC --operators A B`` sets one topic's list, ``serve --all-topics --operators A B``
the seller's default for every topic without a list of its own; ``--any`` clears the list
(the topic falls back to the default, the default to "any active operator"). ``serving TOPIC``
resolves the list as clients do and names the active brokers of each serving operator.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from blendsm.cli._support import (
    Output,
    add_chain_command,
    arg,
    parse_address,
    parse_topic,
    run_chain_command,
    tx_output,
)
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import BrokerInfo, Marketplace

__all__ = ["register_serve"]

#: Brokers read for ``serving`` when any operator may serve (each is a contract call or two).
_SERVING_BROKERS_MAX = 200


def register_serve(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``serving`` to the ``market`` command group."""
    add_chain_command(
        actions,
        "serve",
        _cmd_serve,
        signing=True,
        help="choose the operators that serve a topic, or all the signing seller's topics",
        arguments=[arg("topic", nargs="?", metavar="TOPIC", help="topic name, or its 0x id")],
        one_of=[
            arg("--operators", nargs="+", metavar="ADDR", help="the operators (at most 16)"),
            arg("--any", action="store_true", help="clear the list (see the command's help)"),
        ],
        one_of_required=True,
    ).add_argument(
        "--all-topics",
        action="store_true",
        help="set the seller's default for every topic without a list of its own",
    )
    add_chain_command(
        actions,
        "serving",
        _cmd_serving,
        signing=False,
        help="who serves a topic now, and the endpoints of their active brokers",
        arguments=[arg("topic", metavar="TOPIC", help="topic name, or its 0x id")],
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.all_topics == (args.topic is not None):
        raise ConfigError("give TOPIC or --all-topics (exactly one)")
    topic_id = None if args.all_topics else parse_topic(args.topic)
    operators = [] if args.any else [parse_address(o, "--operators") for o in args.operators]

    async def body(mp: Marketplace) -> Output:
        chosen = ", ".join(operators) if operators else "nobody in particular"
        if topic_id is None:
            result = await mp.brokers.set_seller_operators(operators)
            data: dict[str, Any] = {"scope": "seller", "seller": mp.address}
            line = f"default operators of {mp.address}: {chosen}"
        else:
            result = await mp.brokers.set_topic_operators(topic_id, operators)
            data = {"scope": "topic", "topic_id": topic_id, "seller": mp.address}
            line = f"operators of topic 0x{topic_id.hex()}: {chosen}"
        if not operators:
            line += (
                " (cleared: the seller's default applies)"
                if topic_id is not None
                else " (cleared: any active operator may serve)"
            )
        return tx_output(result, {**data, "operators": operators}, line)

    return run_chain_command(args, body, signing=True)


def _cmd_serving(args: argparse.Namespace) -> int:
    topic_id = parse_topic(args.topic)

    async def body(mp: Marketplace) -> Output:
        topic = await mp.market.topic(topic_id)
        if topic is None:
            raise ConfigError(f"unknown topic {args.topic!r} (id 0x{topic_id.hex()})")
        serving = await mp.brokers.serving_operators(topic_id)
        brokers: list[BrokerInfo]
        if serving.any_operator:
            every = await mp.brokers.brokers(limit=_SERVING_BROKERS_MAX)
            brokers = [b for b in every if b.active]
        else:
            brokers = []
            for operator in serving.operators:
                brokers += [b for b in await mp.brokers.brokers(operator) if b.active]
        data = {
            "topic": topic.name,
            "topic_id": topic_id,
            "seller": topic.seller,
            "any_operator": serving.any_operator,
            "operators": list(serving.operators),
            "brokers": [b.as_json() for b in brokers],
        }
        if serving.any_operator:
            head = f"{topic.name}: any active operator may serve"
        elif serving.operators:
            head = f"{topic.name}: served by {', '.join(serving.operators)}"
        else:
            head = f"{topic.name}: served by nobody (every chosen operator is gone)"
        lines = [head] + [f"  {b.broker_key}  {' '.join(b.endpoints)}" for b in brokers]
        return data, lines

    return run_chain_command(args, body, signing=False)
