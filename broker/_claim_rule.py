"""What a claim attempt comes to, and how its failures are read (the settler's vocabulary).

Split out of :mod:`blendsm.broker._settlement` so the loop stays readable: the result type,
the reverts after which a channel can never be claimed again, and the "fate unknown yet"
signal. Which voucher a claim uses is the store's rule (:meth:`VoucherStore.begin_claim`:
the highest accepted voucher within delivered value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blendsm.errors import ContractRevertError

__all__ = ["FINAL_REVERTS", "ClaimResult", "ClaimStatus", "PendingClaimError", "describe"]

#: Reverts after which no voucher of the channel can ever be claimed.
FINAL_REVERTS = frozenset(
    {
        "PaymentChannelsChallengePeriodOver",
        "PaymentChannelsChannelSettled",
        "PaymentChannelsUnknownChannel",
    }
)

ClaimStatus = Literal["confirmed", "failed", "pending"]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim attempt came to.

    ``confirmed``: mined, ``claimed`` is the channel's on-chain claimed amount after it.
    ``failed``: reverted or never broadcast; retried after the backoff. ``pending``: may be
    out but its fate is unknown yet (node gone, not deep enough); reconciled later.
    """

    channel_id: bytes
    amount: int
    status: ClaimStatus
    tx_hash: bytes | None = None
    claimed: int = 0
    payout: int = 0
    fee: int = 0
    gas_used: int = 0
    error: str | None = None


class PendingClaimError(Exception):
    """The claim's fate is not known yet; leave its intent open."""


def describe(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc
    if isinstance(exc, ContractRevertError):
        return f"reverted: {exc}"
    return f"{type(exc).__name__}: {exc}"
