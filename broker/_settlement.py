"""Claiming accepted vouchers on chain for the broker operator.

Why a separate loop: a voucher is worth nothing until claimed, but one claim per voucher
would burn more gas than most messages earn. :class:`Settler` claims a channel when what a
claim would add reaches ``threshold`` (prompted by :meth:`Settler.notify_voucher`, so the
store is not polled), every ``interval_seconds`` for every channel with anything
unclaimed, and before a closing channel's challenge period ends (after that the payer
withdraws what was not claimed, so this rule is what keeps the operator from losing money).

Which voucher: the HIGHEST accepted one whose amount is within the channel's delivered
value (the store keeps the vouchers above the claim; :meth:`VoucherStore.begin_claim`),
never one above it (the contract pays the full signed amount, and a voucher above delivered
value is credit). Waiting for the latest instead would stall for as long as a buyer's
vouchers run ahead of the broker's count, e.g. after a kill lost the last deliveries' count.

Exactly once: every claim follows the store's write-ahead protocol
(:mod:`blendsm.broker._store`): ``begin_claim`` commits an intent, the signed
transaction's hash is committed with ``claim_sent`` *before* the transaction is broadcast,
and only then is it sent; the receipt moves the intent to confirmed or failed. After a
crash :meth:`Settler.reconcile` resolves each open intent from its receipt (by hash) or by
comparing the channel's on-chain ``claimed`` with the intent
(:mod:`~blendsm.broker._claim_outcome`), and a channel gets no new
claim while one is open. Even a duplicate could not pay twice (the contract pays only the
delta over ``claimed``), but it would burn gas and double count.

Lanes (issue 14): claims name this broker's lane (its key); covered means the lane's on-chain
``laneClaimed``. Lanes share the deposit: a claim paid short (an overcommitting payer) is
logged and counted (``claims_cut_short``); the stored vouchers are the payer's evidence.

Failures never end the loop: a revert or an unreachable node is logged, the intent is
failed with an exponential ``retry_at`` (or left open when the transaction may be out),
and the claim is retried once the node answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable

from blendsm import backoff_delay
from blendsm.broker._chain_view import ChainView
from blendsm.broker._claim_outcome import ClaimOutcomes
from blendsm.broker._claim_rule import (
    FINAL_REVERTS,
    ClaimResult,
    describe,
)
from blendsm.broker._config import SettlementConfig
from blendsm.broker._store import AsyncVoucherStore, ChannelBalance, ClaimIntent
from blendsm.contracts import ChannelInfo, Marketplace, Transactor, chain_errors
from blendsm.errors import ChainError, ConfigError, ContractRevertError

__all__ = ["ClaimResult", "Settler"]

_log = logging.getLogger("blendsm.broker.settlement")


class Settler(ClaimOutcomes):
    """Claims the operator's accepted vouchers by threshold, interval and close deadline.

    ``marketplace`` signs as the operator (anyone may submit a claim; the contract pays the
    payee and the operator's fee). ``view`` supplies close deadlines without chain reads;
    when it is None or unhealthy the channel is read from the chain, at most every
    ``close_poll_seconds`` per channel. ``confirmations`` is how deep a claim's block must be
    before it counts as confirmed. ``clock`` is unix time, comparable with block timestamps.
    """

    def __init__(
        self,
        store: AsyncVoucherStore,
        marketplace: Marketplace,
        view: ChainView | None,
        config: SettlementConfig,
        *,
        tick: float = 1.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
        confirmations: int = 0,
        backoff_base: float = 5.0,
        backoff_max: float = 300.0,
        close_poll_seconds: float = 30.0,
        gas_check_seconds: float = 60.0,
        max_parallel: int = 16,
        delivered: Callable[[bytes], int] | None = None,
    ) -> None:
        if marketplace.transactor is None:
            raise ConfigError("settlement: the marketplace must sign as the broker operator")
        if tick <= 0 or backoff_base <= 0 or backoff_max < backoff_base or max_parallel < 1:
            raise ConfigError(
                "settlement: tick and backoff_base must be > 0, backoff_max >= backoff_base"
            )
        if confirmations < 0:
            raise ConfigError("settlement: confirmations must be >= 0")
        self.store = store
        self.marketplace = marketplace
        self.transactor: Transactor = marketplace.transactor
        self.view = view
        self.config = config
        self.tick = tick
        self.log = logger or _log
        self.clock = clock
        self.confirmations = confirmations
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.close_poll_seconds = close_poll_seconds
        self.gas_check_seconds = gas_check_seconds
        self.delivered = delivered  # channel -> delivered value: no claim above it
        # counters
        self.claims_confirmed = 0
        """Claims mined (and deep enough) by this settler, reconciled ones included."""
        self.gas_used = 0
        """Gas of this settler's confirmed claims."""
        self.amount_claimed = 0
        """Payouts (fee included) of this settler's confirmed claims, in token base units."""
        self.failures = 0
        """Claim attempts that failed (reverted, refused, node unreachable)."""
        self.claims_cut_short = 0
        """Confirmed claims the shared deposit paid short (other lanes took the rest)."""
        self.amount_cut_short = 0  # what those vouchers asked for and the deposit did not pay
        self.low_gas = False
        """True while the operator's native balance is below ``min_gas_balance_wei``."""
        self.low_gas_warnings = 0
        self.operator_balance: int | None = None
        # state
        self._latest: dict[bytes, int] = {}  # channel -> latest accepted amount (hints + store)
        self._claimed: dict[bytes, int] = {}  # channel -> covered (on-chain claimed, or more)
        self._due: set[bytes] = set()  # over the threshold, per notify_voucher
        self._fail_count: dict[bytes, int] = {}
        self._retry_at: dict[bytes, float] = {}  # failed claims: channel -> when to retry
        self._final: set[bytes] = set()  # settled, past the deadline, unknown: never again
        self._closes: dict[bytes, tuple[ChannelInfo | None, float]] = {}  # chain reads, when
        self._loaded = False
        self._needs_reconcile = True
        self._next_round = math.inf
        self._next_gas_check = -math.inf
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # one round (or settle_now) at a time
        self._parallel = asyncio.Semaphore(max_parallel)

    # --- public API ----------------------------------------------------------------------

    def notify_voucher(self, channel_id: bytes, amount: int) -> None:
        """A voucher for ``amount`` on ``channel_id`` was just accepted (durably).

        Synchronous and cheap, for the delivery path: the loop wakes up to claim the
        channel once its unclaimed amount reaches the threshold.
        """
        if amount <= self._latest.get(channel_id, 0):
            return
        self._latest[channel_id] = amount
        threshold = self.config.threshold
        if threshold > 0 and amount - self._claimed.get(channel_id, 0) >= threshold:
            self._due.add(channel_id)
            self._wake.set()

    async def run(self) -> None:
        """Reconcile open claims, then settle by threshold, interval and deadline until
        :meth:`stop`. Never raises for chain or store trouble: it logs and retries."""
        self._stopping.clear()
        self._next_round = self.clock() + self.config.interval_seconds
        errors = 0
        while not self._stopping.is_set():
            try:
                await self._round()
            except Exception as exc:
                errors += 1
                # tick * 2**errors, capped: the first retry already waits twice the tick.
                delay = backoff_delay(errors + 1, base=self.tick, cap=self.backoff_max)
                self.log.warning(
                    "settlement: round failed (%d in a row), retrying in %.1fs: %s",
                    errors,
                    delay,
                    exc,
                )
                await self._sleep(delay)
                continue
            errors = 0
            await self._sleep(self.tick)

    def stop(self) -> None:
        """End :meth:`run` after the current round (claims in flight finish first)."""
        self._stopping.set()
        self._wake.set()

    async def settle_now(self, channel_ids: Iterable[bytes] | None = None) -> list[ClaimResult]:
        """Claim everything unclaimed now (all channels, or ``channel_ids``), whatever the
        threshold; for shutdown, tests and demos. Channels in backoff or with a claim in
        flight are left out. Chain errors end up in the results, never raised."""
        async with self._lock:
            await self._prepare()
            ids = None if channel_ids is None else list(channel_ids)
            balances = await self.store.balances(ids, unclaimed_only=True)
            results = await self._claim_all(
                [b.channel_id for b in balances if b.channel_id not in self._final]
            )
            await self._check_gas(force=True)
            return results

    async def reconcile(self) -> list[ClaimResult]:
        """Resolve every open claim intent in the store (after a restart, or after the node
        went away mid-claim): confirmed if the chain covers it, failed if it cannot have
        gone through; left open while its transaction is still known to the node. Raises
        ChainError if the node cannot be reached (nothing is decided then)."""
        results: list[ClaimResult] = []
        unresolved = 0
        for intent in await self.store.pending_claims():
            result = await self._resolve(intent)
            results.append(result)
            unresolved += result.status == "pending"
        self._needs_reconcile = unresolved > 0
        if results:
            self.log.info(
                "settlement: reconciled %d open claim(s): %d confirmed, %d failed, %d pending",
                len(results),
                sum(r.status == "confirmed" for r in results),
                sum(r.status == "failed" for r in results),
                unresolved,
            )
        return results

    # --- the loop ------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Load the store's balances once, and reconcile while anything is unresolved."""
        if not self._loaded:
            for b in await self.store.balances():
                self._remember(b)
            self._loaded = True
        if self._needs_reconcile:
            try:
                await self.reconcile()
            except ChainError as exc:  # those channels wait; the others may still be claimed
                self.log.warning("settlement: cannot reconcile open claims yet: %s", exc)

    def _remember(self, b: ChannelBalance) -> None:
        self._latest[b.channel_id] = max(self._latest.get(b.channel_id, 0), b.amount)
        self._claimed[b.channel_id] = max(self._claimed.get(b.channel_id, 0), b.claimed_onchain)
        threshold = self.config.threshold
        if threshold > 0 and self._latest[b.channel_id] - self._claimed[b.channel_id] >= threshold:
            self._due.add(b.channel_id)

    async def _round(self) -> None:
        async with self._lock:
            await self._prepare()
            now = self.clock()
            await self._check_gas(now=now)
            due: set[bytes] = set()
            threshold = max(1, self.config.threshold)
            if self._due:
                candidates, self._due = self._due, set()
                for b in await self.store.balances(candidates):
                    self._remember(b)
                    if b.unclaimed >= threshold:
                        due.add(b.channel_id)
                self._due -= due  # _remember re-added them; they are being claimed now
            by_threshold = set(due)  # claimed only if what is claimable reaches it
            if now >= self._next_round:
                self._next_round = now + self.config.interval_seconds
                for b in await self.store.balances(unclaimed_only=True):
                    self._remember(b)
                    due.add(b.channel_id)
                    by_threshold.discard(b.channel_id)
                self._due -= due
            for channel_id, at in list(self._retry_at.items()):
                if at <= now:
                    del self._retry_at[channel_id]
                    due.add(channel_id)
                    by_threshold.discard(channel_id)
            closing = await self._closing(now)
            due |= closing
            by_threshold -= closing
            due -= self._final
            if due:
                await self._claim_all(sorted(due), by_threshold, threshold)
                await self._check_gas(force=True)

    async def _closing(self, now: float) -> set[bytes]:
        """Channels with anything unclaimed whose challenge period ends within the margin."""
        due: set[bytes] = set()
        margin = self.config.before_close_margin_seconds
        for channel_id, latest in list(self._latest.items()):
            if latest <= self._claimed.get(channel_id, 0) or channel_id in self._final:
                continue
            info = await self._channel_info(channel_id, now)
            if info is None or info.settled or info.closes_at is None:
                continue
            if info.closes_at - now <= margin:
                due.add(channel_id)
        return due

    async def _channel_info(self, channel_id: bytes, now: float) -> ChannelInfo | None:
        """From the view when it is healthy and knows the channel, else from the chain
        (cached; a close deadline never changes once set)."""
        if self.view is not None:
            info = self.view.channel(channel_id)
            if info is not None:
                return info
        cached = self._closes.get(channel_id)
        if cached is not None:
            info, read_at = cached
            if (info is not None and (info.closes_at is not None or info.settled)) or (
                now - read_at < self.close_poll_seconds
            ):
                return info
        try:
            info = await self.marketplace.channels.channel(channel_id)
        except ChainError as exc:
            self.log.debug("settlement: cannot read channel %s: %s", channel_id.hex(), exc)
            return None if cached is None else cached[0]
        self._closes[channel_id] = (info, now)
        return info

    async def _check_gas(self, *, now: float | None = None, force: bool = False) -> None:
        at = self.clock() if now is None else now
        if not force and at < self._next_gas_check:
            return
        self._next_gas_check = at + self.gas_check_seconds
        try:
            with chain_errors("settlement: operator balance"):
                balance = int(await self.marketplace.w3.eth.get_balance(self.transactor.address))
        except ChainError as exc:
            self.log.debug("settlement: cannot read the operator's balance: %s", exc)
            return
        self.operator_balance = balance
        low = balance < self.config.min_gas_balance_wei
        if low and not self.low_gas:
            self.low_gas_warnings += 1
            self.log.warning(
                "settlement: operator %s has %d wei, below min_gas_balance_wei %d;"
                " top it up or claims will fail",
                self.transactor.address,
                balance,
                self.config.min_gas_balance_wei,
            )
        elif not low and self.low_gas:
            self.log.info("settlement: operator balance %d wei is enough again", balance)
        self.low_gas = low

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a voucher over the threshold or stop() wakes us early."""
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    # --- claiming ------------------------------------------------------------------------

    async def _claim_all(
        self, channel_ids: list[bytes], by_threshold: set[bytes] | None = None, threshold: int = 0
    ) -> list[ClaimResult]:
        """Claim each channel; those in ``by_threshold`` only if the claim adds at least
        ``threshold`` (the latest voucher may be far above what is claimable)."""
        gated = by_threshold or set()

        async def one(channel_id: bytes) -> ClaimResult | None:
            async with self._parallel:
                try:
                    return await self._claim(channel_id, threshold if channel_id in gated else 0)
                except Exception:  # e.g. the store: log it, keep claiming the others
                    self.failures += 1
                    self._needs_reconcile = True
                    self.log.exception("settlement: claim of %s broke", channel_id.hex())
                    return None

        done = await asyncio.gather(*(one(c) for c in channel_ids))
        return [r for r in done if r is not None]

    def _backoff(self, channel_id: bytes) -> float:
        count = self._fail_count.get(channel_id, 0) + 1
        self._fail_count[channel_id] = count
        return backoff_delay(count, base=self.backoff_base, cap=self.backoff_max)

    async def _claim(self, channel_id: bytes, min_gain: int = 0) -> ClaimResult | None:
        """One write-ahead claim of the channel's highest voucher within delivered value
        (adding at least ``min_gain``); None if nothing to do."""
        limit = None if self.delivered is None else self.delivered(channel_id)
        intent = await self.store.begin_claim(
            channel_id, self.clock(), limit=limit, min_gain=min_gain
        )
        if intent is None:
            return None
        call = self.marketplace.channels.contract.functions.claim(
            intent.channel_id, intent.lane, intent.amount, intent.signature
        )
        sent: list[bytes] = []
        intent_id = intent.intent_id

        async def record(tx_hash: bytes) -> None:
            await self.store.claim_sent(intent_id, tx_hash)
            sent.append(tx_hash)

        try:
            tx_hash = await self.transactor.submit(call, before_send=record)
        except Exception as exc:
            if sent:  # may have gone out: only the chain can tell, later
                self._needs_reconcile = True
                self.failures += 1
                self.log.warning(
                    "settlement: claim of %s sent as %s, fate unknown (reconciling later): %s",
                    channel_id.hex(),
                    sent[0].hex(),
                    exc,
                )
                return ClaimResult(channel_id, intent.amount, "pending", sent[0], error=str(exc))
            if isinstance(exc, ContractRevertError):
                if exc.error_name == "PaymentChannelsNothingToClaim":
                    return await self._resolve(intent)  # covered, e.g. the payee claimed it
                if exc.error_name in FINAL_REVERTS:
                    self._final.add(channel_id)
            if intent.channel_id in self._final:
                self.log.warning(
                    "settlement: channel %s can no longer be claimed (%s); %d left unclaimed",
                    channel_id.hex(),
                    describe(exc),
                    intent.amount - self._claimed.get(channel_id, 0),
                )
            return await self._failed(intent, exc)
        try:
            receipt = await self.transactor.wait(tx_hash)
        except Exception as exc:
            # Reverted, timed out or node gone: the chain decides (claimed may cover it anyway).
            self.log.warning(
                "settlement: claim of %s (tx %s) did not confirm: %s",
                channel_id.hex(),
                bytes(tx_hash).hex(),
                exc,
            )
            intent = ClaimIntent(
                intent.intent_id,
                intent.channel_id,
                intent.amount,
                intent.signature,
                "sent",
                bytes(tx_hash),
                intent.created_at,
                intent.lane,
            )
            try:
                result = await self._resolve(intent)
            except Exception as again:
                self._needs_reconcile = True
                self.failures += 1
                return ClaimResult(
                    channel_id, intent.amount, "pending", bytes(tx_hash), error=str(again)
                )
            if result.status == "pending":
                self._needs_reconcile = True
            if result.status == "failed":
                return dataclasses.replace(result, error=describe(exc))
            return result
        try:
            return await self._confirm(intent, receipt)
        except Exception as exc:  # not deep enough yet, or the node went away: later
            self._needs_reconcile = True
            return ClaimResult(channel_id, intent.amount, "pending", bytes(tx_hash), error=str(exc))

    async def _failed(
        self, intent: ClaimIntent, exc: BaseException | str, *, backoff: bool = True
    ) -> ClaimResult:
        """The claim did not and will not go through: fail the intent, retry after a backoff
        (at once when the chain never saw it, e.g. a crash before the broadcast)."""
        delay = self._backoff(intent.channel_id) if backoff else 0.0
        reason = describe(exc)
        retry_at = self.clock() + delay
        await self.store.claim_failed(intent.intent_id, reason, retry_at)
        self._retry_at[intent.channel_id] = retry_at
        self.failures += backoff
        self.log.warning(
            "settlement: claim of %s for %d failed, retrying in %.1fs: %s",
            intent.channel_id.hex(),
            intent.amount,
            delay,
            reason,
        )
        return ClaimResult(intent.channel_id, intent.amount, "failed", intent.tx_hash, error=reason)
