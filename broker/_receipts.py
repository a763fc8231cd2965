"""Receipts owed for accepted vouchers, batched per (session, channel).

Why batched: a Receipt is cumulative, so one confirms every voucher before it, and a
paying subscriber sends a voucher every few messages. Answering each with its own notice
cost the broker a write per voucher and the subscriber a decode per voucher, for nothing
the next receipt would not say. So (``payments.intake``) a receipt goes out after
``receipt_every`` accepted vouchers of a channel on a session, or ``receipt_delay_seconds``
after the previous one, whichever comes first; the first one after a quiet spell goes out at
once. The voucher intake (:mod:`blendsm.broker._voucher_intake`) owes them after each
commit and flushes what is due; a timer sends the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blendsm.broker._intake_config import IntakeConfig
from blendsm.device_sdk import AnyNotice, Receipt

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    from blendsm.broker._access import Identity
    from blendsm.broker._stats import ServiceStats

__all__ = ["ReceiptBatcher"]


@dataclass(slots=True, eq=False)
class _PendingReceipt:
    """A receipt owed to one session for one channel, not sent yet (batched)."""

    handler: BrokerProtocolHandler
    ident: Identity
    channel_id: bytes
    amount: int
    count: int = 0
    due: float = 0.0


class ReceiptBatcher:
    """The receipts owed and not sent yet, and the timer that sends the next one due."""

    def __init__(
        self,
        config: IntakeConfig,
        lane: str,
        stats: ServiceStats,
        send: Callable[[BrokerProtocolHandler, Identity, list[AnyNotice]], None],
    ) -> None:
        self._config = config
        self._lane = lane
        self._stats = stats
        self._send = send
        """Writes notices to a session within its bounds (the intake's ``_send``)."""
        self._owed: dict[tuple[int, bytes], _PendingReceipt] = {}
        self._timer: asyncio.TimerHandle | None = None

    def owe(
        self,
        handler: BrokerProtocolHandler,
        ident: Identity,
        channel_id: bytes,
        amount: int,
        count: int,
    ) -> None:
        """``count`` more vouchers of ``channel_id`` up to ``amount`` are durable for
        ``ident``: a receipt is owed, due now or at the session's next receipt time."""
        key = (id(ident), channel_id)
        pending = self._owed.get(key)
        if pending is None:
            pending = self._owed[key] = _PendingReceipt(handler, ident, channel_id, amount)
        pending.handler = handler
        pending.amount = max(pending.amount, amount)
        pending.count += count
        last = ident.receipted.get(channel_id)
        if pending.count >= self._config.receipt_every or last is None:
            pending.due = 0.0  # now
        else:
            pending.due = last + self._config.receipt_delay_seconds

    def flush(self, *, everything: bool = False) -> None:
        """Send the receipts that are due (all of them with ``everything``, at a stop), one
        write per session; arm the timer for the next one."""
        if self._timer is not None:
            self._timer.cancel()  # a no-op when it is this call
            self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due: dict[int, list[_PendingReceipt]] = {}
        later = None
        for key, pending in list(self._owed.items()):
            if everything or pending.due <= now:
                del self._owed[key]
                due.setdefault(id(pending.ident), []).append(pending)
            elif later is None or pending.due < later:
                later = pending.due
        for receipts in due.values():
            first = receipts[0]
            for pending in receipts:
                first.ident.receipted[pending.channel_id] = now
            self._stats.receipts_sent += len(receipts)
            self._send(
                first.handler,
                first.ident,
                [Receipt(p.channel_id, p.amount, self._lane) for p in receipts],
            )
        if later is not None:
            self._timer = loop.call_at(later, self.flush)
