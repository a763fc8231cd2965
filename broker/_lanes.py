"""The broker's lane (issue 14): checked once at start, so vouchers are never counted on a
lane the contract would refuse to pay.

A broker meters, stores and claims one lane of each channel, its own broker key
(``broker_key``; by default the operator key, whose address is always a lane). PaymentChannels
pays a lane only if it is the channel operator's address or a broker that operator
registered in Brokers. A broker whose key is neither would accept vouchers nobody can claim,
so it refuses to start, saying why (fail closed). Rows of another lane in its voucher store
(the broker key changed) are kept, reported here, and not claimed by this broker.
"""

from __future__ import annotations

import logging
from typing import Protocol

from eth_account.signers.local import LocalAccount

from blendsm.broker._store import AsyncVoucherStore
from blendsm.contracts import Marketplace
from blendsm.errors import ChainError, ConfigError

__all__ = ["check_lane"]

_log = logging.getLogger("blendsm.broker.lanes")


class LaneHost(Protocol):
    """What the check needs of the marketplace service."""

    lane: str
    operator: LocalAccount
    store: AsyncVoucherStore | None
    marketplace: Marketplace
    log: logging.Logger


async def check_lane(service: LaneHost) -> None:
    """Raise ConfigError if the broker's lane is not one of its operator's; log what the
    store holds on other lanes. A chain that cannot be read yet is logged, not fatal: the
    chain view then answers no to every market decision anyway."""
    log = service.log or _log
    lane, operator = service.lane, service.operator.address
    if service.store is not None:
        for channel_id, other, unclaimed in await service.store.other_lanes():
            log.warning(
                "voucher store: channel %s has %d vouchered and unclaimed on lane %s, not this"
                " broker's lane %s (the broker key changed?); kept, not claimed here",
                channel_id.hex(),
                unclaimed,
                other,
                lane,
            )
    if lane == operator:
        return
    try:
        info = await service.marketplace.brokers.broker(lane)
    except ChainError as exc:
        log.warning("cannot check that lane %s is a broker of %s yet: %s", lane, operator, exc)
        return
    if info is None or info.operator != operator:
        owner = "nobody" if info is None else info.operator
        log.error("broker_key %s is registered to %s, not to operator %s", lane, owner, operator)
        raise ConfigError(
            f"broker_key {lane} is not a broker of operator {operator} in Brokers (registered"
            f" to {owner}): vouchers on its lane could never be claimed; register it first"
        )
    log.info("lane %s: broker of operator %s", lane, operator)
