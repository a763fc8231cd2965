"""What a claim's receipt, or the chain after a restart, makes of its write-ahead intent.

A base of :class:`~blendsm.broker._settlement.Settler` (which sends the claims): apart so the
exactly-once rule's last step reads in one place. A successful receipt confirms the intent once
its block is deep enough (:meth:`ClaimOutcomes._confirm`), reading what the lane was paid from
the contract's ``ChannelClaimed`` event (less than the voucher: the shared deposit paid it short,
logged and counted). An intent whose receipt is missing is decided from the chain
(:meth:`ClaimOutcomes._resolve`): still in the mempool, pending; covered by the lane's
``laneClaimed`` or a spent deposit, confirmed; else failed (the settler retries it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from web3.logs import DISCARD
from web3.types import TxReceipt

from blendsm.broker._claim_rule import ClaimResult, PendingClaimError
from blendsm.broker._store import AsyncVoucherStore, ClaimIntent
from blendsm.broker._tx_watch import confirmations_missing, find_transaction
from blendsm.contracts import Marketplace

__all__ = ["ClaimOutcomes"]


class ClaimOutcomes:
    """Confirming and resolving claim intents (the settler's state, set by its ``__init__``)."""

    store: AsyncVoucherStore
    marketplace: Marketplace
    confirmations: int
    log: logging.Logger
    claims_confirmed: int
    gas_used: int
    amount_claimed: int
    claims_cut_short: int
    amount_cut_short: int
    _claimed: dict[bytes, int]
    _fail_count: dict[bytes, int]
    _retry_at: dict[bytes, float]

    if TYPE_CHECKING:

        async def _failed(
            self, intent: ClaimIntent, exc: BaseException | str, *, backoff: bool = True
        ) -> ClaimResult: ...

    async def _confirm(self, intent: ClaimIntent, receipt: TxReceipt) -> ClaimResult:
        """A successful receipt: record the claim once its block is deep enough."""
        shallow = await confirmations_missing(
            self.marketplace.w3,
            int(receipt["blockNumber"]),
            self.confirmations,
            "settlement: block number",
        )
        if shallow is not None:
            raise PendingClaimError(shallow)
        events = self.marketplace.channels.contract.events.ChannelClaimed().process_receipt(
            receipt, errors=DISCARD
        )
        ours = [
            e
            for e in events
            if e["address"] == self.marketplace.channels.address
            and bytes(e["args"]["channelId"]) == intent.channel_id
            and str(e["args"]["lane"]).lower() == intent.lane.lower()
        ]
        if ours:
            args = ours[0]["args"]
            claimed, payout, fee = int(args["laneClaimed"]), int(args["payout"]), int(args["fee"])
            if claimed < int(args["cumulativeAmount"]):
                self._cut_short(intent, claimed, int(args["totalClaimed"]))
        else:  # not our claim's receipt shape; trust the lane's state
            claimed, payout, fee = await self._lane_claimed(intent), 0, 0
        return await self._confirmed(
            intent, claimed, bytes(receipt["transactionHash"]), payout, fee, int(receipt["gasUsed"])
        )

    async def _confirmed(
        self,
        intent: ClaimIntent,
        claimed: int,
        tx_hash: bytes | None,
        payout: int = 0,
        fee: int = 0,
        gas_used: int = 0,
    ) -> ClaimResult:
        await self.store.claim_confirmed(intent.intent_id, claimed)
        channel_id = intent.channel_id
        # A deposit-capped voucher cannot pay more: schedule from its amount, not the claim.
        self._claimed[channel_id] = max(self._claimed.get(channel_id, 0), claimed, intent.amount)
        self._fail_count.pop(channel_id, None)
        self._retry_at.pop(channel_id, None)
        self.claims_confirmed += 1
        self.gas_used += gas_used
        self.amount_claimed += payout
        self.log.info(
            "settlement: claimed %s up to %d (payout %d, fee %d, gas %d)",
            channel_id.hex(),
            claimed,
            payout,
            fee,
            gas_used,
        )
        return ClaimResult(
            channel_id, intent.amount, "confirmed", tx_hash, claimed, payout, fee, gas_used
        )

    async def _lane_claimed(self, intent: ClaimIntent) -> int:
        return await self.marketplace.channels.lane_claimed(intent.channel_id, intent.lane)

    def _cut_short(self, intent: ClaimIntent, lane_claimed: int, total: int) -> None:
        """The shared deposit paid this lane less than its voucher (payer overcommitted)."""
        self.claims_cut_short += 1
        self.amount_cut_short += intent.amount - lane_claimed
        args = (intent.channel_id.hex(), intent.lane, intent.amount, lane_claimed, total)
        self.log.warning(
            "settlement: claim of %s on lane %s cut short by the deposit: voucher %d, lane paid"
            " %d (all lanes %d): the payer overcommitted; its voucher is the evidence",
            *args,
        )

    async def _resolve(self, intent: ClaimIntent) -> ClaimResult:
        """Decide an open intent from the chain (the reconciliation rule of the store).

        A successful receipt confirms it. Otherwise, if the node still knows the
        transaction it stays pending; if the lane's on-chain ``laneClaimed`` covers the
        intent, or the deposit is all claimed, it is confirmed; else it failed.
        """
        reverted = False
        if intent.tx_hash is not None:
            receipt, pending = await find_transaction(
                self.marketplace.w3, intent.tx_hash, "settlement: claim receipt"
            )
            if pending:  # in the mempool: wait for it rather than double submit
                return ClaimResult(intent.channel_id, intent.amount, "pending", intent.tx_hash)
            if receipt is not None and receipt["status"] == 1:
                try:
                    return await self._confirm(intent, receipt)
                except PendingClaimError as exc:
                    return ClaimResult(
                        intent.channel_id, intent.amount, "pending", intent.tx_hash, error=str(exc)
                    )
            reverted = receipt is not None
        info = await self.marketplace.channels.channel(intent.channel_id)
        lane_claimed = 0 if info is None else await self._lane_claimed(intent)
        if info is not None and (lane_claimed >= intent.amount or info.claimed >= info.deposit):
            # Covered on chain (by this claim, an earlier one, or the payee's own), or the
            # deposit is gone (other lanes took it): nothing more can be paid on this lane.
            return await self._confirmed(intent, lane_claimed, intent.tx_hash)
        if info is None:
            why = "channel unknown on chain"
        elif info.settled:
            why = "channel settled"
        else:
            why = "reverted" if reverted else "never mined"
        return await self._failed(
            intent,
            f"claim {why} (on-chain lane claimed {lane_claimed})",
            backoff=reverted or info is None or info.settled,
        )
