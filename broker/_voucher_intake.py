"""Voucher intake: vouchers in, verified once per channel, committed together, receipts batched.

Why a pipeline and not a task per voucher: a paying subscriber sends a voucher every few
messages, so at full rate the broker takes in about as many vouchers as it delivers paid
messages. One task, one ECDSA recovery, one SQLite transaction (one fsync) and one Receipt per
voucher cost ~600 us of broker CPU each, which made the paid path slower than the deliveries it
pays for; and vouchers of one channel processed concurrently raced each other and the credit.

How it runs: :meth:`VoucherIntake.submit` (on the client's read loop) decodes the payload and
queues it, bounded per session; one runner task (started by the first voucher after a quiet
spell, which lingers ``linger_seconds`` so the rest of a burst joins it) takes everything queued
at once as a *batch*, once its first voucher is due (vouchers that no delivery waits on may wait
a little to share a commit: :mod:`~blendsm.broker._commit_linger`):

1. cheap checks per voucher (channel known, metered here, paid by this session's participant,
   not closing or settled, above what is already durable), in the contract's spirit: a voucher
   the contract would refuse is never accepted;
2. per channel only the highest voucher is verified (one ECDSA recovery): it covers every lower
   one of the batch (vouchers are cumulative). If it fails, the next one down is tried, so a bad
   voucher never hides a good one. One recovery per loop turn, so deliveries are not held up
   behind a whole batch's;
3. the chosen vouchers of every channel are stored in ONE transaction
   (:meth:`~blendsm.broker._store.AsyncVoucherStore.accept_many`, ``synchronous=FULL``): group
   commit across everything that arrived together, with the delivered value of every channel
   charged since the last write (so a restart never takes a prepayment for delivered value).
   While it is in flight the next batch queues;
4. only after the commit: ``paid`` rises in the meter, the settler and paused offline replays
   are told, deliveries held for credit (:mod:`~blendsm.broker._credit_hold`) are sent, and
   receipts are scheduled. Deliveries that begin to wait on a voucher already here make its
   commit stop yielding to the loop (:meth:`VoucherIntake.expedite`). Vouchers are processed
   batch after batch, in arrival order: the meter is never behind a voucher being checked
   and no two of one channel race.

Receipts are batched per channel and session (:mod:`blendsm.broker._receipts`, the
``payments.intake`` knobs); refusals go out at once. While a voucher of a channel is queued or
being committed, a delivery refused for that channel's credit asks for no payment
(:meth:`VoucherIntake.withhold_request`): the payer is paying, and a request then only made it
sign a second voucher. Notices to a session at
its ``MAX_CONTROL_TASKS`` bound (a client that does not read them) are dropped and counted
(``notices_dropped``): the voucher itself is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from blendsm.broker._commit_linger import CommitLinger
from blendsm.broker._credit_hold import CreditHold
from blendsm.broker._intake_config import IntakeConfig
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._receipts import ReceiptBatcher
from blendsm.device_sdk import (
    AnyNotice,
    ChannelState,
    Receipt,
    Refusal,
    RefusalCode,
    Voucher,
    decode_voucher,
)
from blendsm.errors import (
    VoucherChannelError,
    VoucherLaneError,
    VoucherNotNewerError,
    VoucherSignatureError,
    WireError,
)

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    from blendsm.broker._access import Identity
    from blendsm.broker._chain_view import ChainView
    from blendsm.broker._meter import Account, Meter
    from blendsm.broker._settlement import Settler
    from blendsm.broker._stats import ServiceStats
    from blendsm.broker._store import AsyncVoucherStore
    from blendsm.contracts import ChannelInfo
    from blendsm.device_sdk import VoucherVerifier

__all__ = ["MAX_CONTROL_TASKS", "IntakeHost", "VoucherIntake"]

MAX_CONTROL_TASKS: Final = 16
"""Control tasks (proof requests, notice sends) one session may have in process; past it its
control publishes other than vouchers are dropped and its notices skipped, counted, and logged
at most once a minute. A client that floods the control tree, or stops reading its notices,
can then hold at most this many tasks."""


class IntakeHost(Protocol):
    """What the intake needs of the marketplace service (which is the only host)."""

    log: logging.Logger
    stats: ServiceStats
    view: ChainView
    meter: Meter
    vouchers: VoucherVerifier
    store: AsyncVoucherStore | None
    settler: Settler | None
    broker: Any
    lane: str

    def _spawn(self, coro: Any, name: str, ident: Identity | None = None) -> None: ...

    async def send_notice(
        self, handler: BrokerProtocolHandler, ident: Identity, notice: AnyNotice
    ) -> None: ...

    def write_notices(
        self, handler: BrokerProtocolHandler, ident: Identity, notices: list[AnyNotice]
    ) -> bool: ...


_MAX_CACHED_STATES: Final = 100_000
"""Channel states kept for verification; past it the cache starts over (a bound, not a policy)."""

_BUSY_TURN: Final = 0.001
"""A yield that took this long (seconds) means the loop's turns are long (a burst): yielding
after every signature recovery then delays the vouchers by a whole turn each."""

_UNYIELDED: Final = 0.002
"""At most this long (seconds) of verification without a yield, even when turns are long."""

_REPEAT: Final = Refusal("not_newer", "the latest accepted voucher, again")
"""Marks a voucher equal to the durable amount: answered with a Receipt, never sent."""


@dataclass(slots=True, eq=False)
class _Entry:
    """One queued voucher and the session it came from."""

    handler: BrokerProtocolHandler
    ident: Identity
    voucher: Voucher


class VoucherIntake:
    """The broker's voucher pipeline (see the module docstring); one per service."""

    def __init__(self, service: IntakeHost, config: IntakeConfig) -> None:
        self._service = service
        self.config = config
        self._queue: list[_Entry] = []
        self._paying: dict[bytes, int] = {}
        """Channel id -> its vouchers queued or in the batch being processed."""
        self._unsettled: list[_Entry] = []
        """The batch being processed, until :meth:`_settle`."""
        self._withheld: set[bytes] = set()
        """Channels whose payment request waited for a voucher on its way."""
        self._by_session: dict[int, list[_Entry]] = {}  # id(ident) -> its queued entries
        self._runner: asyncio.Task[None] | None = None
        self._linger = CommitLinger(lambda: self.config.unawaited_linger_seconds)
        """When the next batch is taken: vouchers nobody waits on may share a commit."""
        self._receipts = ReceiptBatcher(config, service.lane, service.stats, self._send)
        self._states: dict[bytes, tuple[ChannelInfo, ChannelState]] = {}
        """channel id -> (the view's record, its ChannelState): building one checks the payer's
        EIP-55 checksum (two keccaks), as costly as half a signature recovery."""
        self._log = LogLimiter(service.log, logging.INFO)
        self._drop_log = LogLimiter(service.log, logging.WARNING)

    # --- in: on the client's read loop -------------------------------------------------

    def submit(self, handler: BrokerProtocolHandler, ident: Identity, payload: bytes) -> None:
        """Queue a voucher published on ``ident``'s own voucher topic (never blocks)."""
        stats = self._service.stats
        try:
            voucher = decode_voucher(payload)
        except WireError as exc:
            self._refused(handler, ident, Refusal("malformed", str(exc)[:300]))
            return
        key = id(ident)
        mine = self._by_session.get(key)
        if mine is not None and len(mine) >= self.config.max_pending_per_session:
            # At the bound: a newer voucher takes the place of its channel's latest queued one
            # (it covers it; the queue stays in arrival order for that channel).
            last = next(
                (e for e in reversed(mine) if e.voucher.channel_id == voucher.channel_id), None
            )
            if last is not None and last.voucher.cumulative_amount < voucher.cumulative_amount:
                last.voucher = voucher
                stats.vouchers_superseded += 1
                return
            stats.control_dropped += 1
            self._drop_log.note(
                "voucher from %s dropped: %d already queued (flood)", ident.address, len(mine)
            )
            return
        loop = asyncio.get_running_loop()
        entry = _Entry(handler, ident, voucher)
        self._queue.append(entry)
        channel = voucher.channel_id
        self._paying[channel] = self._paying.get(channel, 0) + 1
        if mine is None:
            self._by_session[key] = [entry]
        else:
            mine.append(entry)
        self._linger.arrived(channel, loop.time(), self._service.meter.awaited((channel,)))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="blendsm-voucher-intake")

    @property
    def queued(self) -> int:
        """Vouchers waiting for the next batch."""
        return len(self._queue)

    def withhold_request(self, channel_id: bytes) -> bool:
        """Whether a payment request for ``channel_id`` waits: True while a voucher of it is
        queued or in the batch being processed (up to its commit: the deliveries it frees
        are gated after it). Should that voucher not raise ``paid`` (refused, a repeat),
        the deliveries waiting on the channel are gated again, so the request goes out."""
        if channel_id not in self._paying:
            return False
        self._withheld.add(channel_id)
        return True

    def expedite(self, channel_id: bytes) -> None:
        """A delivery was refused for credit on ``channel_id`` (the gate calls this): a voucher
        of it already here is taken without the unawaited linger (if it is being committed,
        the next batch is), and its commit stops yielding to the loop."""
        if channel_id not in self._paying:
            return
        self._linger.end()
        if self._service.store is not None:
            self._service.store.urgent(True)

    def _wake(self, account: Account) -> None:
        """Gate the deliveries waiting on ``account`` again, in order (held live ones are
        sent what fits now; paused offline replays go on)."""
        service = self._service
        waiters, account.waiters = account.waiters, []
        for waiter in waiters:
            if isinstance(waiter, CreditHold):
                try:  # live deliveries held for credit: sent now, in order
                    waiter.resume()
                except Exception:  # never let one session's hold stop the batch
                    service.log.exception("deliveries held for credit: resume failed")
            elif service.broker is not None:
                service.broker.resume_offline_replay(waiter)

    def _ask_again(self) -> None:
        """Requests withheld for vouchers that were decided without raising ``paid``: the
        deliveries waiting on those channels are gated again (their refusal asks)."""
        accounts = self._service.meter.accounts
        for channel in [c for c in self._withheld if c not in self._paying]:
            self._withheld.discard(channel)
            account = accounts.get(channel)
            if account is not None and account.waiters:
                self._wake(account)

    def _settle(self) -> None:
        """The batch in hand is decided (committed, refused or failed): its channels are not
        paying through it any more. Once per batch: after its commit, or when it ends."""
        batch, self._unsettled = self._unsettled, []
        paying = self._paying
        for entry in batch:
            channel = entry.voucher.channel_id
            left = paying.get(channel, 0) - 1
            if left > 0:
                paying[channel] = left
            else:
                paying.pop(channel, None)

    async def close(self) -> None:
        """Finish every queued voucher (the store must still be open) and send the receipts
        still owed; called when the broker stops."""
        self._linger.closing = True
        while self._runner is not None and not self._runner.done():
            self._linger.end()
            await asyncio.gather(self._runner, return_exceptions=True)
        self._receipts.flush(everything=True)

    # --- batches -----------------------------------------------------------------------

    async def _run(self) -> None:
        linger = self.config.linger_seconds
        if linger > 0:  # the intake was idle: let the rest of a burst arrive
            await asyncio.sleep(linger)
        while self._queue:
            await self._linger.wait()
            batch, self._queue = self._queue, []
            self._linger.taken()
            self._by_session = {}
            self._service.stats.voucher_batches += 1
            self._unsettled = batch
            try:
                await self._process(batch)
            except Exception:  # never let a voucher crash the broker
                self._service.log.exception("voucher batch of %d: internal error", len(batch))
            finally:
                self._settle()  # if _process returned before its commit, or raised
            if self._withheld:
                self._ask_again()

    async def _process(self, batch: list[_Entry]) -> None:
        service = self._service
        groups: dict[bytes, list[_Entry]] = {}
        for entry in batch:
            refusal = self._check(entry)
            if refusal is None:
                groups.setdefault(entry.voucher.channel_id, []).append(entry)
            elif refusal is _REPEAT:
                # The latest accepted voucher again (the payer re-sent it, unsure it arrived):
                # it adds nothing and is not refused; a Receipt at once says it is held.
                self._repeated([entry], entry.voucher)
            else:
                self._refused(entry.handler, entry.ident, refusal)
        # Per channel the highest valid voucher; the others get what taking the batch one by one,
        # in arrival order, would give them: arrived before it, covered (accepted, then
        # superseded: no notice of their own); after it, the same amount is a repeat (a Receipt
        # once durable) and a lower one is refused not_newer.
        order = {id(entry): index for index, entry in enumerate(batch)}
        chosen: list[tuple[_Entry, list[_Entry], list[_Entry]]] = []
        verified = 0
        clock = time.perf_counter
        run_until = 0.0  # verify without yielding until then (the loop's turns are long)
        for entries in groups.values():
            entries.sort(key=lambda e: e.voucher.cumulative_amount, reverse=True)
            for index, entry in enumerate(entries):
                if verified and clock() >= run_until:
                    # One signature recovery (~60 us) per loop turn: the deliveries that
                    # arrived meanwhile go out between two, instead of waiting behind all
                    # of a batch's (ten members paying on the same message cost ~1 ms).
                    # But when a turn is long anyway (a publisher's burst is read in 10 ms
                    # slices), a yield per voucher held ten members' credit for ten turns
                    # (200 ms between commits, measured) while every delivery to them
                    # waited: then the next ``_UNYIELDED`` of recoveries run in one go.
                    yielded = clock()
                    await asyncio.sleep(0)
                    now = clock()
                    if now - yielded >= _BUSY_TURN:
                        run_until = now + _UNYIELDED
                verified += 1
                refusal = self._verify(entry)
                if refusal is None:
                    at, amount = order[id(entry)], entry.voucher.cumulative_amount
                    covered, repeats = [], []
                    for other in entries[index + 1 :]:
                        if order[id(other)] < at:
                            covered.append(other)
                        elif other.voucher.cumulative_amount == amount:
                            repeats.append(other)
                        else:
                            self._refused(
                                other.handler,
                                other.ident,
                                _refusal(
                                    other.voucher,
                                    "not_newer",
                                    f"amount {other.voucher.cumulative_amount} is not above"
                                    f" {amount}, which arrived before it",
                                ),
                            )
                    chosen.append((entry, covered, repeats))
                    break
                self._refused(entry.handler, entry.ident, refusal)
        if not chosen:
            return
        results = await self._commit([entry for entry, _, _ in chosen])
        # Before the held deliveries are gated again below: one still refused for credit asks
        # for payment unless a later voucher of its channel is already on its way.
        self._settle()
        meter, stats, owe = service.meter, service.stats, self._receipts.owe
        for (entry, covered, repeats), stored in zip(chosen, results, strict=True):
            voucher = entry.voucher
            amount = voucher.cumulative_amount
            if stored is not True:
                code, detail = stored or ("not_newer", "a voucher at least as high is stored")
                for refused in (entry, *covered, *repeats):
                    self._refused(refused.handler, refused.ident, _refusal(voucher, code, detail))
                continue
            # Durable: now it counts.
            account = meter.paid_up_to(voucher.channel_id, amount)
            stats.vouchers_accepted += 1
            stats.vouchers_superseded += len(covered)
            if service.settler is not None:
                service.settler.notify_voucher(voucher.channel_id, amount)
            self._withheld.discard(voucher.channel_id)  # its refusals below ask again
            if account is not None and account.waiters:
                self._wake(account)
            self._repeated(repeats, voucher)
            seen = {id(entry.ident)}
            owe(entry.handler, entry.ident, voucher.channel_id, amount, 1 + len(covered))
            for other in covered:  # another session of the same payer: it is told too
                if id(other.ident) not in seen:
                    seen.add(id(other.ident))
                    owe(other.handler, other.ident, voucher.channel_id, amount, 1)
        self._receipts.flush()

    async def _commit(self, entries: list[_Entry]) -> list[bool | tuple[RefusalCode, str]]:
        """Store the chosen vouchers in one transaction: True (durable), False (a voucher at
        least as high was already stored), or why none of them counts."""
        store = self._service.store
        if store is None:
            return [("store_unavailable", "broker is shutting down")] * len(entries)
        # The channels' delivered value rides along: same transaction, no fsync of its own.
        meter = self._service.meter
        delivered = meter.unsaved_delivered()
        store.urgent(meter.awaited(e.voucher.channel_id for e in entries))  # deliveries held
        try:
            stored = await store.accept_many([(e.voucher, None) for e in entries], delivered)
        except Exception as exc:
            self._service.meter.delivered_not_saved(delivered)
            self._service.log.error("voucher store failed, %d not counted: %s", len(entries), exc)
            return [("store_unavailable", "voucher store unavailable, try again")] * len(entries)
        return list(stored)

    def _check(self, entry: _Entry) -> Refusal | None:
        """The checks that need no signature recovery (dict reads); ``_REPEAT`` for the amount
        already durable (no signature check either: it can add nothing)."""
        service, voucher, ident = self._service, entry.voucher, entry.ident
        view = service.view
        info = view.channel(voucher.channel_id)
        if info is None:
            reason = view.unhealthy_reason
            return _refusal(
                voucher,
                "unknown_channel",
                "channel unknown to this broker"
                + ("" if reason is None else f" (chain view: {reason})"),
            )
        if info.operator is None or info.operator.lower() != service.meter.operator:
            return _refusal(
                voucher,
                "not_metered_here",
                f"channel names operator {info.operator}, not this broker",
            )
        if voucher.lane != service.lane:
            return _refusal(
                voucher,
                "wrong_lane",
                f"voucher is for lane {voucher.lane}, this broker meters lane {service.lane}",
            )
        if info.payer.lower() != ident.key:
            return _refusal(
                voucher, "not_payer", f"channel is paid by {info.payer}, not {ident.address}"
            )
        if info.settled or info.closes_at is not None:
            # The claim could not be relied on: it must land before ``closesAt`` on chain
            # (the node's clock, not ours), and the payer may withdraw right after.
            state = "settled" if info.settled else f"closing (challenge ends {info.closes_at})"
            return _refusal(
                voucher, "channel_closing", f"channel is {state}: vouchers are not accepted"
            )
        # Lanes share the deposit: this lane can reach what it claimed plus what is left.
        cap = info.deposit - info.claimed + view.lane_claimed(voucher.channel_id, service.lane)
        if voucher.cumulative_amount > cap:
            return _refusal(
                voucher,
                "over_deposit",
                f"amount {voucher.cumulative_amount} exceeds what this lane can be paid, {cap}"
                f" (deposit {info.deposit}, claimed by other lanes {info.deposit - cap})",
            )
        paid = service.meter.paid_of(voucher.channel_id)
        if voucher.cumulative_amount == paid and paid:
            return _REPEAT
        if voucher.cumulative_amount <= paid:
            return _refusal(
                voucher,
                "not_newer",
                f"amount {voucher.cumulative_amount} is not above the accepted {paid}",
            )
        return None

    def _verify(self, entry: _Entry) -> Refusal | None:
        """The contract's ``claim`` rules, signature included (one ECDSA recovery)."""
        service, voucher = self._service, entry.voucher
        info = service.view.channel(voucher.channel_id)
        if info is None:  # the view turned unhealthy within this batch
            return _refusal(voucher, "unknown_channel", "channel unknown to this broker")
        cached = self._states.get(voucher.channel_id)
        if cached is not None and cached[0] is info:
            state = cached[1]
        else:  # the view replaces a channel's record on every change: rebuild on a new one
            state = ChannelState(
                info.payer,
                info.deposit,
                info.claimed,
                info.closes_at,
                info.settled,
                lane=service.lane,
                lane_claimed=service.view.lane_claimed(voucher.channel_id, service.lane),
            )
            if len(self._states) >= _MAX_CACHED_STATES:
                self._states.clear()
            self._states[voucher.channel_id] = (info, state)
        try:
            service.vouchers.verify(voucher, state, int(time.time()))
        except VoucherSignatureError as exc:
            return _refusal(voucher, "bad_signature", str(exc))
        except VoucherNotNewerError as exc:
            return _refusal(voucher, "not_newer", str(exc))
        except VoucherChannelError as exc:
            return _refusal(voucher, "channel_closing", str(exc))
        except VoucherLaneError as exc:
            return _refusal(voucher, "wrong_lane", str(exc))
        return None

    # --- out: receipts and refusals -----------------------------------------------------

    def _refused(self, handler: BrokerProtocolHandler, ident: Identity, refusal: Refusal) -> None:
        self._service.stats.vouchers_refused += 1
        self._log.note(
            "voucher from %s refused: %s: %s", ident.address, refusal.code, refusal.detail
        )
        self._send(handler, ident, [refusal])

    def _repeated(self, entries: list[_Entry], voucher: Voucher) -> None:
        """Answer re-sent copies of the durable ``voucher`` with a Receipt each, at once."""
        stats = self._service.stats
        for entry in entries:
            stats.vouchers_repeated += 1
            stats.receipts_sent += 1
            self._send(
                entry.handler,
                entry.ident,
                [Receipt(voucher.channel_id, voucher.cumulative_amount, self._service.lane)],
            )

    def _send(
        self, handler: BrokerProtocolHandler, ident: Identity, notices: list[AnyNotice]
    ) -> None:
        """Send ``notices`` to the session now (a TCP or TLS session: written in this call,
        within its outgoing bound), or in one task (WebSocket), within its control-task bound."""
        service = self._service
        if ident.control_tasks >= MAX_CONTROL_TASKS:
            service.stats.notices_dropped += len(notices)
            self._drop_log.note(
                "notices to %s dropped: %d control tasks still in process (not reading?)",
                ident.address,
                ident.control_tasks,
            )
            return
        if service.write_notices(handler, ident, notices):
            return
        service._spawn(_send_all(service, handler, ident, notices), "blendsm-notice", ident)


async def _send_all(
    service: IntakeHost,
    handler: BrokerProtocolHandler,
    ident: Identity,
    notices: list[AnyNotice],
) -> None:
    for notice in notices:
        with contextlib.suppress(Exception):
            await service.send_notice(handler, ident, notice)


def _refusal(voucher: Voucher, code: RefusalCode, detail: str) -> Refusal:
    return Refusal(code, detail, voucher.channel_id, voucher.cumulative_amount)
