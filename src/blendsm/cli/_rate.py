"""``blendsm rate``: either party of a channel that did business rates the other.

The Ratings contract takes one score per party and channel, once the channel paid a claim
or was settled; the command checks those conditions first (who the signer is on the channel,
whether it paid, whether the signer already rated), so a refused rating costs no transaction
and says why.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from blendsm.cli._channel import CHANNEL_ARG, parse_channel_id, run_on_channel
from blendsm.cli._support import Output, add_chain_command, arg, tx_output
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import ChannelInfo, Marketplace

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm rate``."""
    add_chain_command(
        sub,
        "rate",
        _cmd_rate,
        signing=True,
        help="rate the other party of a channel that did business (1 to 5, once per channel)",
        description="Rate the other party of CHANNEL: its payer rates the payee and its payee"
        " rates the payer, once each per channel, after the channel paid a claim or was"
        " settled, while the signer is an active participant of the Registry.",
        arguments=[CHANNEL_ARG, arg("score", metavar="SCORE", help="1 (worst) to 5 (best)")],
    )


def _cmd_rate(args: argparse.Namespace) -> int:
    channel_id = parse_channel_id(args.channel)
    try:
        score = int(args.score)
    except ValueError:
        score = 0
    if not 1 <= score <= 5:
        raise ConfigError(f"score: must be a whole number from 1 to 5, got {args.score!r}")

    async def body(mp: Marketplace, info: ChannelInfo) -> Output:
        cid = f"0x{channel_id.hex()}"
        rater = mp.address
        if rater == info.payer:
            ratee, as_ = info.payee, "payer"
        elif rater == info.payee:
            ratee, as_ = info.payer, "payee"
        else:
            raise ConfigError(
                f"{rater} is neither the payer ({info.payer}) nor the payee ({info.payee})"
                f" of channel {cid}; only they may rate each other"
            )
        if info.claimed == 0 and not info.settled:
            raise ConfigError(
                f"channel {cid} has paid no claim and is not settled: nothing to rate yet"
            )
        if await mp.ratings.has_rated(channel_id, rater):
            raise ConfigError(f"{rater} already rated for channel {cid} (once per channel)")
        result = await mp.ratings.rate(channel_id, score)
        rating = await mp.ratings.rating_of(ratee)
        data = {
            "channel": channel_id,
            "rater": rater,
            "ratee": ratee,
            "score": score,
            "ratee_count": rating.count,
            "ratee_average_x100": rating.average_x100,
        }
        return tx_output(
            result,
            data,
            f"Rated {ratee} {score}/5 for channel {cid} (as its {as_})",
            f"  their average is now {rating.average_x100 / 100:.2f} from"
            f" {rating.count} rating{'s' if rating.count != 1 else ''}",
        )

    return run_on_channel(args, channel_id, body)
