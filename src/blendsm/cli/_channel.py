"""``blendsm channel ...``: a buyer's payment channels.

A buyer opens a channel to a seller naming the broker operator that meters it; the broker
claims the buyer's vouchers, so the buyer only ever opens, tops up, watches and leaves
(request a close, then withdraw the rest once the challenge period is over). Times are
shown against the chain's clock (the latest block, or the wall clock when that is later, as
the next block's timestamp will be), because that is the clock the contract checks.
``CHANNEL_ARG``, :func:`parse_channel_id` and :func:`run_on_channel` serve ``blendsm rate``
too.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from blendsm.cli._support import (
    Output,
    add_chain_command,
    add_command_group,
    address_topic,
    arg,
    chain_now,
    fetch_events,
    format_duration,
    format_time,
    format_wei,
    parse_address,
    parse_bytes32,
    parse_wei,
    run_chain_command,
    signing_account,
    tx_json,
    tx_line,
    tx_output,
)
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import ChannelInfo, Marketplace

__all__ = ["CHANNEL_ARG", "parse_channel_id", "register", "run_on_channel"]


CHANNEL_ARG = arg("channel", metavar="CHANNEL", help="channel id (0x + 64 hex digits)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``channel`` (open, top-up, status, list, request-close, withdraw)."""
    csub = add_command_group(
        sub,
        "channel",
        help="payment channels: open, top up, status, list, request close, withdraw",
        description="A buyer's payment channels to sellers. The broker operator named at"
        " opening claims the buyer's vouchers; the buyer leaves with `request-close` and,"
        " after the challenge period, `withdraw`.",
    )

    add_chain_command(
        csub,
        "open",
        _cmd_open,
        signing=True,
        help="open a channel to a seller with a deposit (prints the channel id)",
        description="Open a channel from the signer to --payee, metered by the broker"
        " --operator. For an ERC-20 --token the contract is approved for the deposit first"
        " (unless the allowance already covers it).",
        arguments=[
            arg("--payee", required=True, metavar="SELLER", help="the seller's address"),
            arg(
                "--operator",
                required=True,
                metavar="BROKER_OPERATOR",
                help="address of the broker operator that meters the channel and earns the fee",
            ),
            arg(
                "--deposit",
                required=True,
                metavar="AMOUNT",
                help="deposit: wei, or 1.5ether, 2gwei",
            ),
            arg(
                "--fee-bps",
                type=int,
                default=0,
                metavar="N",
                help="the operator's share of each payout in basis points, at most the"
                " contract's MAX_FEE_BPS (1000 = 10 %%; default: %(default)s)",
            ),
            arg(
                "--token",
                metavar="ADDRESS",
                help="ERC-20 token of the deposit (default: native coin)",
            ),
        ],
    )
    add_chain_command(
        csub,
        "top-up",
        _cmd_top_up,
        signing=True,
        help="add to a channel's deposit (payer only, not closing)",
        arguments=[
            CHANNEL_ARG,
            arg("amount", metavar="AMOUNT", help="amount to add: wei, or 1.5ether, 2gwei"),
        ],
    )
    add_chain_command(
        csub,
        "status",
        _cmd_status,
        signing=False,
        help="a channel's parties, funds and closing state",
        arguments=[CHANNEL_ARG],
    )
    add_chain_command(
        csub,
        "list",
        _cmd_list,
        signing=True,
        help="channels from the ChannelOpened events, each with its current status",
        description="Channels opened since the deployment block, each with its current"
        " status. Without a filter: the channels where --address, or else the signer"
        " (--key-env / --keystore; nothing is signed), is payer, payee or operator.",
        one_of=[
            arg("--payer", metavar="ADDR", help="channels this address pays from"),
            arg("--payee", metavar="ADDR", help="channels paying this address"),
            arg("--operator", metavar="ADDR", help="channels this broker operator meters"),
            arg("--address", metavar="ADDR", help="channels where this address is a party"),
        ],
    )
    add_chain_command(
        csub,
        "request-close",
        _cmd_request_close,
        signing=True,
        help="start leaving a channel (payer only); withdraw after the challenge period",
        arguments=[CHANNEL_ARG],
    )
    add_chain_command(
        csub,
        "withdraw",
        _cmd_withdraw,
        signing=True,
        help="after the challenge period, settle and refund what was not claimed (payer only)",
        description="Settle a closing channel and refund the unclaimed deposit to the payer."
        " Refused before any transaction is sent while the challenge period runs.",
        arguments=[CHANNEL_ARG],
    )


# --- formatting ----------------------------------------------------------------------------


def _amount(value: int, token: str | None) -> str:
    return format_wei(value) if token is None else f"{value} (token units)"


def parse_channel_id(text: str) -> bytes:
    """CHANNEL: a channel id, 0x and 64 hex digits."""
    return parse_bytes32(text, "channel")


def _state(info: ChannelInfo, now: int) -> str:
    if info.settled:
        return "settled"
    if info.closes_at is None:
        return "open"
    return "closing" if now < info.closes_at else "withdrawable"


def _channel_json(info: ChannelInfo, now: int) -> dict[str, Any]:
    state = _state(info, now)
    return {
        "channel": info.channel_id,
        "payer": info.payer,
        "payee": info.payee,
        "operator": info.operator,
        "token": info.token,
        "deposit": info.deposit,
        "claimed": info.claimed,
        "remaining": info.remaining,
        "fee_bps": info.fee_bps,
        "closes_at": info.closes_at,
        "seconds_left": (
            max(0, info.closes_at - now)
            if info.closes_at is not None and not info.settled
            else None
        ),
        "closing": info.closing,
        "withdrawable": state == "withdrawable",
        "settled": info.settled,
        "state": state,
    }


def _state_line(info: ChannelInfo, now: int) -> str:
    state = _state(info, now)
    if state == "settled":
        return "settled (funds paid out; the channel is over)"
    if state == "open" or info.closes_at is None:
        return "open"
    when = format_time(info.closes_at)
    if state == "closing":
        return (
            f"closing: the payee may claim until {when} ({format_duration(info.closes_at - now)}"
            " left), then the payer can withdraw"
        )
    return f"closed at {when}: the payer can withdraw the remaining deposit now"


def _status_lines(info: ChannelInfo, now: int) -> list[str]:
    fee = f" (fee {info.fee_bps} bps = {info.fee_bps / 100:g} %)" if info.operator else ""
    return [
        f"channel    0x{info.channel_id.hex()}",
        f"state      {_state_line(info, now)}",
        f"payer      {info.payer}",
        f"payee      {info.payee}",
        f"operator   {info.operator or 'none'}{fee}",
        f"token      {info.token or 'native coin'}",
        f"deposit    {_amount(info.deposit, info.token)}",
        f"claimed    {_amount(info.claimed, info.token)}",
        f"remaining  {_amount(info.remaining, info.token)}",
    ]


async def _existing(mp: Marketplace, channel_id: bytes) -> ChannelInfo:
    info = await mp.channels.channel(channel_id)
    if info is None:
        raise ConfigError(
            f"no channel 0x{channel_id.hex()} on PaymentChannels {mp.channels.address}"
        )
    return info


def run_on_channel(
    args: argparse.Namespace,
    channel_id: bytes,
    body: Callable[[Marketplace, ChannelInfo], Awaitable[Output]],
    *,
    signing: bool = True,
) -> int:
    """:func:`run_chain_command` with ``body`` given the channel as it is before it runs
    (a clear error when there is no channel ``channel_id``)."""

    async def run(mp: Marketplace) -> Output:
        return await body(mp, await _existing(mp, channel_id))

    return run_chain_command(args, run, signing=signing)


# --- commands ------------------------------------------------------------------------------


def _cmd_open(args: argparse.Namespace) -> int:
    payee = parse_address(args.payee, "--payee")
    operator = parse_address(args.operator, "--operator")
    token = None if args.token is None else parse_address(args.token, "--token")
    deposit = parse_wei(args.deposit, "--deposit")
    if deposit == 0:
        raise ConfigError("--deposit: must be positive")
    if not 0 <= args.fee_bps <= 0xFFFF:
        raise ConfigError(f"--fee-bps: must be 0 to the contract's maximum, got {args.fee_bps}")

    async def body(mp: Marketplace) -> Output:
        maximum = await mp.channels.max_fee_bps()
        if args.fee_bps > maximum:
            raise ConfigError(
                f"--fee-bps: at most {maximum} ({maximum / 100:g} %), got {args.fee_bps}"
            )
        opened = await mp.channels.open(
            payee, operator, token, deposit, args.fee_bps, approve=token is not None
        )
        data = {
            "channel": opened.channel_id,
            "payer": mp.address,
            "payee": payee,
            "operator": operator,
            "token": token,
            "deposit": deposit,
            "fee_bps": args.fee_bps,
            "approval": None if opened.approval is None else tx_json(opened.approval),
        }
        lines = [
            f"Opened channel 0x{opened.channel_id.hex()}",
            f"  payer     {mp.address}",
            f"  payee     {payee}",
            f"  operator  {operator} (fee {args.fee_bps} bps)",
            f"  token     {token or 'native coin'}",
            f"  deposit   {_amount(deposit, token)}",
        ]
        if opened.approval is not None:
            lines.append(f"  approved the token first: {tx_line(opened.approval)[2:]}")
        return tx_output(opened, data, *lines)

    return run_chain_command(args, body, signing=True)


def _cmd_top_up(args: argparse.Namespace) -> int:
    channel_id = parse_channel_id(args.channel)
    amount = parse_wei(args.amount, "amount")
    if amount == 0:
        raise ConfigError("amount: must be positive")

    async def body(mp: Marketplace, before: ChannelInfo) -> Output:
        result = await mp.channels.top_up(channel_id, amount, approve=before.token is not None)
        after = await _existing(mp, channel_id)
        data = {
            "channel": channel_id,
            "amount": amount,
            "deposit": after.deposit,
            "remaining": after.remaining,
        }
        return tx_output(
            result,
            data,
            f"Topped up channel 0x{channel_id.hex()} by {_amount(amount, after.token)}",
            f"  deposit now {_amount(after.deposit, after.token)},"
            f" remaining {_amount(after.remaining, after.token)}",
        )

    return run_on_channel(args, channel_id, body)


def _cmd_status(args: argparse.Namespace) -> int:
    async def body(mp: Marketplace, info: ChannelInfo) -> Output:
        now = await chain_now(mp)
        return {**_channel_json(info, now), "now": now}, _status_lines(info, now)

    return run_on_channel(args, parse_channel_id(args.channel), body, signing=False)


def _cmd_list(args: argparse.Namespace) -> int:
    role, who = "party", None
    for name in ("payer", "payee", "operator", "address"):
        value = getattr(args, name)
        if value is not None:
            role, who = ("party" if name == "address" else name), parse_address(value, f"--{name}")
    if who is None:
        try:
            who = str(signing_account(args).address)
        except ConfigError as exc:
            raise ConfigError(
                f"channel list: give --payer, --payee, --operator or --address, or a key"
                f" to list the signer's channels ({exc})"
            ) from None

    async def body(mp: Marketplace) -> Output:
        assert who is not None
        topics: list[str | None] = []
        if role == "payer":
            topics = [None, address_topic(who)]
        elif role == "payee":
            topics = [None, None, address_topic(who)]
        events = await fetch_events(mp, ["PaymentChannels.ChannelOpened"], topics)
        now = await chain_now(mp)
        rows: list[dict[str, Any]] = []
        lines: list[str] = []
        for event in events:
            a = event.args
            parties = {a["payer"], a["payee"], a["operator"]}
            if role == "operator" and a["operator"] != who:
                continue
            if role == "party" and who not in parties:
                continue
            info = await _existing(mp, bytes(a["channelId"]))
            row = {
                **_channel_json(info, now),
                "opened_block": event.block_number,
                "opened_tx": event.tx_hash,
            }
            rows.append(row)
            lines += [
                f"0x{info.channel_id.hex()}  {row['state']}"
                + (
                    f" ({format_duration(row['seconds_left'])} left)"
                    if row["state"] == "closing"
                    else ""
                ),
                f"  payer {info.payer} -> payee {info.payee}",
                f"  deposit {_amount(info.deposit, info.token)}, claimed"
                f" {_amount(info.claimed, info.token)}; opened in block {event.block_number}",
            ]
        where = {
            "party": "is payer, payee or operator",
            "payer": "pays",
            "payee": "is paid",
            "operator": "meters",
        }[role]
        head = f"{len(rows)} channel{'s' if len(rows) != 1 else ''} {who} {where}" + (
            ":" if rows else ""
        )
        data = {"address": who, "role": role, "count": len(rows), "channels": rows, "now": now}
        return data, [head, *lines]

    return run_chain_command(args, body, signing=False)


def _cmd_request_close(args: argparse.Namespace) -> int:
    channel_id = parse_channel_id(args.channel)

    async def body(mp: Marketplace, info: ChannelInfo) -> Output:
        if info.settled:
            raise ConfigError(f"channel 0x{channel_id.hex()} is settled already")
        if info.closes_at is not None:
            raise ConfigError(
                f"channel 0x{channel_id.hex()} is closing already; withdraw after"
                f" {format_time(info.closes_at)}"
            )
        result = await mp.channels.request_close(channel_id)
        return tx_output(
            result,
            {"channel": channel_id, "closes_at": result.closes_at},
            f"Requested the close of channel 0x{channel_id.hex()}",
            f"  the payee may claim until {format_time(result.closes_at)};"
            f" withdraw after that (`blendsm channel withdraw 0x{channel_id.hex()}`)",
        )

    return run_on_channel(args, channel_id, body)


def _cmd_withdraw(args: argparse.Namespace) -> int:
    channel_id = parse_channel_id(args.channel)

    async def body(mp: Marketplace, info: ChannelInfo) -> Output:
        cid = f"0x{channel_id.hex()}"
        if info.settled:
            raise ConfigError(f"channel {cid} is settled already; nothing to withdraw")
        if info.closes_at is None:
            raise ConfigError(
                f"channel {cid} is not closing: run `blendsm channel request-close {cid}`"
                " first, then withdraw after the challenge period"
            )
        now = await chain_now(mp)
        if now < info.closes_at:
            raise ConfigError(
                f"channel {cid}: the challenge period runs until {format_time(info.closes_at)};"
                f" withdraw in {format_duration(info.closes_at - now)} (no transaction sent)"
            )
        result = await mp.channels.withdraw(channel_id)
        return tx_output(
            result,
            {"channel": channel_id, "refund": result.refund},
            f"Withdrew from channel {cid}: refunded {_amount(result.refund, info.token)}"
            f" to {info.payer} (claimed {_amount(info.claimed, info.token)})",
        )

    return run_on_channel(args, channel_id, body)
