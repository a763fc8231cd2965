"""``blendsm market ...``: the topics on sale (list, show) and a seller's own topics (create,
update, pause, resume, access lists).

Ratings are kept times 100 on chain (``minRatingX100``, ``averageX100``); the CLI takes and
prints them as people write them (``4.5``), so nobody has to know the contract's scale.
Multi-step commands (``create --encrypted``, ``update``) check every argument before they
send the first transaction, so bad input never leaves a topic half changed.
"""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from blendsm.cli._serve import register_serve
from blendsm.cli._support import (
    Output,
    add_chain_command,
    add_command_group,
    arg,
    fetch_events,
    format_wei,
    parse_address,
    parse_topic,
    parse_wei,
    run_chain_command,
    tx_json,
    tx_line,
    tx_output,
)
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace, Policy, RatingInfo, TopicInfo, TxResult

__all__ = ["format_rating", "parse_rating", "register"]

_POLICIES = ("open", "allowlist", "denylist", "min-rating")
_TOPIC_ARG = arg("topic", metavar="TOPIC", help="topic name, or its 0x id")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``market`` and its actions to the ``blendsm`` parser."""
    actions = add_command_group(
        sub, "market", help="topics: list, show, create, update, pause, access, serve"
    )

    add_chain_command(
        actions,
        "list",
        _cmd_list,
        signing=False,
        help="every topic with price, policy, state and the seller's rating",
    )
    add_chain_command(
        actions,
        "show",
        _cmd_show,
        signing=False,
        help="one topic, with its allow/deny list",
        arguments=[_TOPIC_ARG],
    )
    add_chain_command(
        actions,
        "create",
        _cmd_create,
        signing=True,
        help="offer a new topic as the signing seller",
        arguments=[
            arg("name", metavar="NAME", help="the exact MQTT topic name"),
            arg(
                "--price",
                required=True,
                metavar="AMOUNT",
                help="price per delivered message: wei (1000), or 1.5gwei, 0.001ether;"
                " for a token, in its smallest unit",
            ),
            arg(
                "--token",
                metavar="ADDRESS",
                help="ERC-20 the topic is priced in (default: native coin)",
            ),
            arg(
                "--policy",
                choices=_POLICIES,
                help="who may subscribe (default: open, or min-rating with --min-rating)",
            ),
            arg(
                "--min-rating",
                metavar="RATING",
                help="lowest average buyer rating admitted, 1..5 (e.g. 4.5); implies --policy"
                " min-rating",
            ),
            arg(
                "--encrypted",
                action="store_true",
                help="mark the topic end-to-end encrypted (a second transaction)",
            ),
        ],
    )
    add_chain_command(
        actions,
        "update",
        _cmd_update,
        signing=True,
        help="change a topic's price, policy or encryption (only what is given)",
        arguments=[
            _TOPIC_ARG,
            arg("--price", metavar="AMOUNT", help="new price per message"),
            arg("--policy", choices=_POLICIES, help="new access policy"),
            arg(
                "--min-rating",
                metavar="RATING",
                help="new lowest average rating, 1..5; implies --policy min-rating",
            ),
            arg(
                "--encrypted",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="mark the topic encrypted (--encrypted) or in clear (--no-encrypted)",
            ),
        ],
    )
    for name, what in (("pause", "stop subscriptions and publishing"), ("resume", "undo pause")):
        add_chain_command(
            actions,
            name,
            _cmd_pause,
            signing=True,
            help=f"{what} (the topic's seller)",
            arguments=[_TOPIC_ARG],
            defaults={"pausing": name == "pause"},
        )
    add_chain_command(
        actions,
        "access",
        _cmd_access,
        signing=True,
        help="put accounts on or off the topic's allow/deny list (the topic's seller)",
        arguments=[_TOPIC_ARG],
        one_of=[
            arg("--add", nargs="+", metavar="ADDR", help="accounts to put on the list"),
            arg("--remove", nargs="+", metavar="ADDR", help="accounts to take off the list"),
        ],
        one_of_required=True,
    )
    register_serve(actions)


# --- values ------------------------------------------------------------------------------


def parse_rating(text: str, what: str = "--min-rating") -> int:
    """``"4.5"`` -> 450: a rating between 1 and 5 with at most two decimals, times 100."""
    try:
        value = Decimal(text.strip()) * 100
    except InvalidOperation:
        raise ConfigError(f"{what}: {text!r} is not a number (a rating 1..5, e.g. 4.5)") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise ConfigError(f"{what}: {text!r} has more than two decimals")
    if not 100 <= value <= 500:
        raise ConfigError(f"{what}: must be between 1 and 5, got {text!r}")
    return int(value)


def format_rating(x100: int) -> str:
    """450 -> ``"4.50"``."""
    return f"{x100 // 100}.{x100 % 100:02d}"


def _policy_name(policy: Policy) -> str:
    return policy.name.lower().replace("_", "-")


def _policy_of(name: str) -> Policy:
    from blendsm.contracts import Policy

    return Policy[name.upper().replace("-", "_")]


def _price_text(topic: TopicInfo) -> str:
    if topic.token is None:
        return f"{format_wei(topic.price)}, native coin"
    return f"{topic.price} units of token {topic.token}"


def _rating_text(rating: RatingInfo) -> str:
    if not rating.count:
        return "unrated"
    plural = "" if rating.count == 1 else "s"
    return f"{format_rating(rating.average_x100)} from {rating.count} rating{plural}"


def _topic_json(topic: TopicInfo, rating: RatingInfo) -> dict[str, Any]:
    from blendsm.contracts import Policy

    min_rating = topic.min_rating_x100 if topic.policy is Policy.MIN_RATING else None
    return {
        "topic_id": topic.topic_id,
        "name": topic.name,
        "seller": topic.seller,
        "price": topic.price,
        "token": topic.token,
        "native": topic.token is None,
        "policy": _policy_name(topic.policy),
        "min_rating": None if min_rating is None else min_rating / 100,
        "min_rating_x100": topic.min_rating_x100,
        "paused": topic.paused,
        "encrypted": topic.encrypted,
        "seller_rating": {
            "count": rating.count,
            "total": rating.total,
            "average_x100": rating.average_x100,
            "average": rating.average_x100 / 100 if rating.count else None,
        },
    }


def _topic_lines(topic: TopicInfo, rating: RatingInfo) -> list[str]:
    from blendsm.contracts import Policy

    policy = _policy_name(topic.policy)
    if topic.policy is Policy.MIN_RATING:
        policy += f" (buyers rated {format_rating(topic.min_rating_x100)} or better)"
    state = ["paused" if topic.paused else "running"]
    state.append("encrypted" if topic.encrypted else "in clear")
    return [
        topic.name,
        f"  id        0x{topic.topic_id.hex()}",
        f"  seller    {topic.seller}  (rating {_rating_text(rating)})",
        f"  price     {_price_text(topic)}",
        f"  policy    {policy}",
        f"  state     {', '.join(state)}",
    ]


async def _topic(mp: Marketplace, text: str) -> TopicInfo:
    """The topic named by ``text`` (name or 0x id), or a clear error if there is none."""
    topic_id = parse_topic(text)
    topic = await mp.market.topic(topic_id)
    if topic is None:
        raise ConfigError(f"unknown topic {text!r} (id 0x{topic_id.hex()})")
    return topic


def _min_rating_for(args: argparse.Namespace, current: TopicInfo | None) -> tuple[Policy, int]:
    """The (policy, minRatingX100) that ``--policy``/``--min-rating`` ask for; for an update,
    ``current`` supplies the threshold when only ``--policy min-rating`` is given."""
    from blendsm.contracts import Policy

    rating = None if args.min_rating is None else parse_rating(args.min_rating)
    policy = _policy_of(args.policy) if args.policy else None
    if policy is None:
        policy = Policy.MIN_RATING if rating is not None else Policy.OPEN
    if policy is Policy.MIN_RATING:
        if rating is None:
            if current is not None and current.policy is Policy.MIN_RATING:
                return policy, current.min_rating_x100
            raise ConfigError("--policy min-rating needs --min-rating RATING (1..5, e.g. 4.5)")
        return policy, rating
    if rating is not None:
        raise ConfigError(
            f"--min-rating only goes with --policy min-rating, not {_policy_name(policy)}"
        )
    return policy, 0


def _step_json(change: str, result: TxResult) -> dict[str, Any]:
    return {"change": change, **tx_json(result)}


# --- commands ----------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    async def body(mp: Marketplace) -> Output:
        shown: list[tuple[TopicInfo, RatingInfo]] = []
        ratings: dict[str, RatingInfo] = {}
        for topic_id in await mp.market.topic_ids():
            topic = await mp.market.topic(topic_id)
            if topic is None:  # pragma: no cover - listed ids always exist
                continue
            if topic.seller not in ratings:
                ratings[topic.seller] = await mp.ratings.rating_of(topic.seller)
            shown.append((topic, ratings[topic.seller]))
        lines = [f"{len(shown)} topic{'' if len(shown) == 1 else 's'}"]
        for topic, rating in shown:
            lines.extend(_topic_lines(topic, rating))
        return {"topics": [_topic_json(t, r) for t, r in shown]}, lines

    return run_chain_command(args, body, signing=False)


def _cmd_show(args: argparse.Namespace) -> int:
    async def body(mp: Marketplace) -> Output:
        topic = await _topic(mp, args.topic)
        rating = await mp.ratings.rating_of(topic.seller)
        seller = await mp.registry.participant(topic.seller)
        events = await fetch_events(mp, ["Market.AccessListUpdated"], ["0x" + topic.topic_id.hex()])
        candidates = list(dict.fromkeys(e.args["account"] for e in events))
        listed = [a for a in candidates if await mp.market.is_listed(topic.topic_id, a)]
        data = _topic_json(topic, rating)
        data["seller_status"] = seller.status.name.lower()
        data["listed"] = listed
        lines = _topic_lines(topic, rating)
        lines.append(f"  seller is {seller.status.name.lower()} ({seller.role.name.lower()})")
        kind = {"allowlist": "allowlist", "denylist": "denylist"}.get(data["policy"], "list")
        lines.append(f"  {kind:<9} " + (", ".join(listed) if listed else "(empty)"))
        return data, lines

    return run_chain_command(args, body, signing=False)


def _cmd_create(args: argparse.Namespace) -> int:
    price = parse_wei(args.price, "--price")
    token = None if args.token is None else parse_address(args.token, "--token")
    policy, min_rating = _min_rating_for(args, None)
    if not args.name:
        raise ConfigError("NAME: a topic needs a name")

    async def body(mp: Marketplace) -> Output:
        created = await mp.market.create_topic(
            args.name, price, token=token, policy=policy, min_rating_x100=min_rating
        )
        encrypted = (
            await mp.market.set_encrypted(created.topic_id, True) if args.encrypted else None
        )
        topic = await _topic(mp, "0x" + created.topic_id.hex())
        rating = await mp.ratings.rating_of(topic.seller)
        data = {
            "action": "create",
            **tx_json(created),
            "encryption_tx": None if encrypted is None else tx_json(encrypted),
            "topic": _topic_json(topic, rating),
        }
        lines = [f"created topic {topic.name} (0x{topic.topic_id.hex()})", tx_line(created)]
        if encrypted is not None:
            lines += ["marked it encrypted", tx_line(encrypted)]
        lines += _topic_lines(topic, rating)[1:]
        return data, lines

    return run_chain_command(args, body, signing=True)


def _cmd_update(args: argparse.Namespace) -> int:
    given = (args.price, args.policy, args.min_rating, args.encrypted)
    if all(value is None for value in given):
        raise ConfigError(
            "market update: nothing to update; give --price, --policy, --min-rating,"
            " --encrypted or --no-encrypted"
        )
    price = None if args.price is None else parse_wei(args.price, "--price")
    if args.min_rating is not None:
        parse_rating(args.min_rating)  # bad input fails before the chain is even asked

    async def body(mp: Marketplace) -> Output:
        topic = await _topic(mp, args.topic)
        policy = None
        if args.policy is not None or args.min_rating is not None:
            policy = _min_rating_for(args, topic)
        if args.encrypted is not None and args.encrypted == topic.encrypted:
            state = "encrypted" if topic.encrypted else "in clear"
            raise ConfigError(f"topic {topic.name} is already {state}; nothing sent")
        steps: list[tuple[str, TxResult]] = []
        if price is not None:
            steps.append(("price", await mp.market.set_price(topic.topic_id, price)))
        if policy is not None:
            result = await mp.market.set_policy(topic.topic_id, *policy)
            steps.append(("policy", result))
        if args.encrypted is not None:
            result = await mp.market.set_encrypted(topic.topic_id, args.encrypted)
            steps.append(("encryption", result))
        after = await _topic(mp, "0x" + topic.topic_id.hex())
        rating = await mp.ratings.rating_of(after.seller)
        lines = [f"updated topic {after.name}: {', '.join(change for change, _ in steps)}"]
        for change, result in steps:
            lines.append(f"{change}:{tx_line(result)[1:]}")
        lines += _topic_lines(after, rating)[1:]
        data = {
            "action": "update",
            "transactions": [_step_json(change, result) for change, result in steps],
            "topic": _topic_json(after, rating),
        }
        return data, lines

    return run_chain_command(args, body, signing=True)


def _cmd_pause(args: argparse.Namespace) -> int:
    pausing: bool = args.pausing

    async def body(mp: Marketplace) -> Output:
        topic = await _topic(mp, args.topic)
        if pausing:
            result = await mp.market.pause(topic.topic_id)
        else:
            result = await mp.market.resume(topic.topic_id)
        after = await _topic(mp, "0x" + topic.topic_id.hex())
        data = {
            "action": "pause" if pausing else "resume",
            "topic_id": topic.topic_id,
            "name": topic.name,
            "paused": after.paused,
        }
        return tx_output(
            result,
            data,
            f"topic {topic.name} {'paused' if pausing else 'resumed'}"
            f" ({'nobody may subscribe or publish' if after.paused else 'running'})",
        )

    return run_chain_command(args, body, signing=True)


def _cmd_access(args: argparse.Namespace) -> int:
    listed = args.add is not None
    raw: list[str] = args.add if listed else args.remove
    accounts = list(dict.fromkeys(parse_address(a, "ADDR") for a in raw))

    async def body(mp: Marketplace) -> Output:
        topic = await _topic(mp, args.topic)
        result = await mp.market.set_access(topic.topic_id, accounts, listed)
        policy = _policy_name(topic.policy)
        kind = policy if policy in ("allowlist", "denylist") else None
        lines = [
            f"{'put' if listed else 'took'} {len(accounts)} account"
            f"{'' if len(accounts) == 1 else 's'} {'on' if listed else 'off'} the"
            f" {kind or 'list'} of {topic.name}"
        ]
        lines += [f"  {a}" for a in accounts]
        if kind is None:
            lines.append(f"  (the list has no effect while the policy is {policy})")
        data = {
            "action": "access",
            "topic_id": topic.topic_id,
            "name": topic.name,
            "accounts": accounts,
            "listed": listed,
            "policy": policy,
        }
        return tx_output(result, data, *lines)

    return run_chain_command(args, body, signing=True)
