"""The Subscriber's payment side: the books, vouchers out, notices in.

Apart from :mod:`._subscriber` (connection, subscriptions, receiving) so each stays readable.
Every method here runs under, or takes, the Subscriber's one lock (see its module docstring).

Receipts after a reconnect: a Receipt is a QoS 0 notice, batched by the broker, so the receipt
for the last vouchers before a connection dropped (or the broker died) may never arrive, and
a stored voucher would stay invisible to the buyer. So after every (re)connect the Subscriber
re-sends the latest voucher of each channel the broker has not confirmed up to it
(:meth:`SubscriberPayments._reconfirm`). The broker answers a voucher equal to the one it holds
with a Receipt, and takes a higher one (lost in flight) as new: either way ``confirmed``
catches up, with no new message type (docs/protocol.md, "Receipts after a reconnect").

Re-sends on a request: a PaymentRequest whose ``paid`` is below the latest voucher means the
broker lacks it, either lost (with a connection, or dropped over the broker's intake bound) or
still on the wire: the broker stops asking once a voucher reaches its intake, so a request
sent just before crossed it. Answering every such request at once sent a second copy of
about one voucher in two in a burst at the credit edge (1,880 sent for 984 accepted), each
costing the broker an ECDSA recovery and a Receipt. So within :data:`RESEND_AFTER` of sending
a voucher the Subscriber waits instead: a timer re-sends it then, once, unless a Receipt
confirmed it meanwhile or a newer voucher replaced it. A lost voucher is re-sent at most
``RESEND_AFTER`` late; one crossing a request is not re-sent at all.

Lanes (issue 14): a channel is paid per broker key (its lane); the books are kept per
(channel, lane), the lane named by the broker's quotes, payment requests and receipts (a
broker from before lanes names none: its lane is the operator's, ``broker``). Lanes share
the deposit, so when the deposit is known (:meth:`SubscriberPayments.set_deposit`) no voucher
is signed that would take the lanes together over it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as mqtt

from blendsm.errors import BlendsmError, ConfigError, WireError

from ._control import (
    PaymentRequest,
    Proof,
    Quote,
    Receipt,
    Refusal,
    decode_any_notice,
    encode_voucher,
)
from ._integrity import MessageVerifier
from ._payment_book import Book, check_amount, request_target
from ._subscriber_events import PaymentEvent, PaymentEventKind
from ._voucher import Voucher, VoucherSigner

if TYPE_CHECKING:
    from ._verification import VerificationWorker

__all__ = ["RESEND_AFTER", "SubscriberPayments"]

_log = logging.getLogger("blendsm.device_sdk")

RESEND_AFTER: Final = 0.5
"""Seconds after a voucher was sent in which a payment request that does not know it yet
defers its re-send (see the module docstring): long past a voucher's way to the broker's
intake on a live connection, short next to a stream held for credit."""


class SubscriberPayments:
    """Mixin of :class:`~blendsm.device_sdk.Subscriber`: books, vouchers and payment notices
    (it sets every attribute declared here)."""

    client_id: str
    budget: int | None
    max_write_off: int | None
    voucher_topic: str
    verifier: MessageVerifier | None
    _signer: VoucherSigner
    _verification: VerificationWorker
    _mqtt: mqtt.Client
    _lock: threading.Condition
    _quotes: dict[str, Quote]
    _books: dict[tuple[bytes, str], Book]
    _deposits: dict[bytes, int]
    broker: str
    _epoch: int
    _spent: int
    _exhausted: bool
    _vouchers_sent: int
    _receipts: int
    _refusals: int
    _payment_requests: int
    _bad_notices: int

    if TYPE_CHECKING:  # provided by the Subscriber and its MQTT client

        def _report(self, events: list[PaymentEvent]) -> None: ...

        def _report_error(self, error: BlendsmError) -> None: ...

        def _guard(self, callback: Any, *args: Any) -> None: ...

    def _lane(self, lane: str | None) -> str:
        """The lane a notice concerns: named, or the operator's (a broker before lanes)."""
        return self.broker if lane is None else lane

    def _book(self, channel_id: bytes, lane: str | None) -> Book:
        """The (channel, lane) book, opened on this connection if new. Caller holds the lock."""
        key = (channel_id, self._lane(lane))
        if (book := self._books.get(key)) is None:
            book = self._books[key] = Book(epoch=self._epoch)
        return book

    def _lanes_of(self, channel_id: bytes) -> list[Book]:
        """Every book of the channel, one per lane. Caller holds the lock."""
        return [b for (cid, _lane), b in self._books.items() if cid == channel_id]

    def set_deposit(self, channel_id: bytes, deposit: int) -> None:
        """The channel's deposit (after opening or a top-up): vouchers over all its lanes
        together never exceed it (an honest payer never overcommits the shared deposit)."""
        check_amount("deposit", deposit, 0, optional=False)
        with self._lock:
            self._deposits[channel_id] = deposit

    def pay_outstanding(self, channel_id: bytes | None = None) -> int:
        """Voucher everything received but not yet paid (on one channel, or all): the last
        messages of a stream stay below the schedule's threshold otherwise (``pay_within`` calls
        this on a timer). Within the budget; returns
        the number of vouchers sent."""
        events: list[PaymentEvent] = []
        with self._lock:
            for (cid, lane), book in list(self._books.items()):
                if (channel_id is None or cid == channel_id) and book.received > book.vouchered:
                    self._pay(cid, lane, book, book.received, events)
        self._report(events)
        return sum(1 for e in events if e.kind is PaymentEventKind.VOUCHER_SENT)

    def resume_channel(self, channel_id: bytes, paid: int, lane: str | None = None) -> None:
        """Continue a channel this account already paid ``paid`` on (cumulative) on ``lane``
        (None: the operator's own), e.g. after a restart: later vouchers build on it. Call
        before messages arrive on that channel; ``paid`` does not count against ``budget``."""
        if not isinstance(channel_id, bytes) or len(channel_id) != 32:
            raise ConfigError("channel_id: must be 32 bytes")
        check_amount("paid", paid, 0, optional=False)
        with self._lock:
            book = self._book(channel_id, lane)
            if book.vouchered > book.baseline or book.received > book.baseline:
                raise ConfigError("resume_channel: the channel is already in use here")
            book.received = book.vouchered = book.baseline = paid
            book.epoch = -1  # in use before: in-flight messages may have been lost

    def _on_notice(self, payload: bytes) -> None:
        try:
            notice = decode_any_notice(payload)
        except WireError as exc:
            with self._lock:
                self._bad_notices += 1
            self._report_error(exc)
            return
        if isinstance(notice, Proof):
            if self.verifier is not None:
                self._verification.proof_answered(notice.request_id, notice)
            return
        if (
            isinstance(notice, Refusal)
            and notice.request_id is not None
            and self.verifier is not None
        ):
            self._verification.proof_answered(notice.request_id, notice)
            return
        events: list[PaymentEvent] = []
        with self._lock:
            if isinstance(notice, Quote):
                # No resend on a quote even if its ``paid`` lags: a voucher may be in flight,
                # and the broker asks with a PaymentRequest when it really lacks one.
                self._quotes[notice.topic] = notice
                self._book(notice.channel_id, notice.lane)
            elif isinstance(notice, PaymentRequest):
                self._payment_requests += 1
                lane = self._lane(notice.lane)
                book = self._book(notice.channel_id, lane)
                before, written_off = book.vouchered, book.written_off
                target = request_target(book, notice, self._epoch, self.max_write_off)
                if target > book.vouchered:
                    self._pay(notice.channel_id, lane, book, target, events)
                else:
                    self._resend_if_behind(book, notice.paid)
                paid = book.vouchered if book.vouchered > before else None
                events.append(
                    PaymentEvent(
                        PaymentEventKind.PAYMENT_REQUEST,
                        notice.channel_id,
                        paid,
                        notice,
                        f"charged {notice.charged}, received {book.received} (in-flight loss"
                        f" written off {book.written_off - written_off})",
                    )
                )
            elif isinstance(notice, Receipt):
                self._receipts += 1
                book = self._book(notice.channel_id, notice.lane)
                book.confirmed = max(book.confirmed, notice.amount)
                self._lock.notify_all()
                events.append(
                    PaymentEvent(PaymentEventKind.RECEIPT, notice.channel_id, notice.amount, notice)
                )
            else:
                self._refusals += 1
                events.append(
                    PaymentEvent(
                        PaymentEventKind.REFUSAL,
                        notice.channel_id,
                        notice.amount,
                        notice,
                        f"{notice.code}: {notice.detail}",
                    )
                )
        self._report(events)

    def _pay(
        self, channel_id: bytes, lane: str, book: Book, target: int, events: list[PaymentEvent]
    ) -> None:
        """Sign and publish a voucher for ``target`` (cumulative) on ``lane`` if the budget
        and the deposit allow. Caller holds the lock; ``target`` never exceeds the received
        value."""
        if target <= book.vouchered or self._exhausted:
            return
        increase = target - book.vouchered
        deposit = self._deposits.get(channel_id)
        if deposit is not None:
            others = sum(b.vouchered for b in self._lanes_of(channel_id) if b is not book)
            if others + target > deposit:
                events.append(
                    PaymentEvent(
                        PaymentEventKind.DEPOSIT_EXHAUSTED,
                        channel_id,
                        target,
                        detail=f"lane {lane}: {target} + {others} on other lanes would exceed"
                        f" the deposit {deposit}; not signed (top up the channel)",
                    )
                )
                return
        if self.budget is not None and self._spent + increase > self.budget:
            self._exhausted = True
            events.append(
                PaymentEvent(
                    PaymentEventKind.BUDGET_EXHAUSTED,
                    channel_id,
                    target,
                    detail=f"spent {self._spent} of budget {self.budget}; {increase} more refused",
                )
            )
            return
        voucher = self._signer.sign(channel_id, lane, target)
        book.vouchered = target
        book.last = voucher
        self._spent += increase
        self._send(voucher, book)
        events.append(PaymentEvent(PaymentEventKind.VOUCHER_SENT, channel_id, target))

    def _resend_if_behind(self, book: Book, broker_paid: int) -> None:
        """The broker asks while knowing less than we signed: send the latest again, at once
        if it went out :data:`RESEND_AFTER` ago or more, else once that much after it went
        out (it may be crossing the request). It costs nothing new, so no budget check.
        Caller holds the lock."""
        if book.last is None or broker_paid >= book.vouchered:
            return
        waited = time.monotonic() - book.sent_at
        if waited >= RESEND_AFTER:
            self._send(book.last, book)
        elif not book.resend_armed:
            book.resend_armed = True
            timer = threading.Timer(RESEND_AFTER - waited, self._resend_due, (book, book.last))
            timer.daemon = True
            timer.name = f"blendsm-resend-{self.client_id}"
            timer.start()

    def _resend_due(self, book: Book, voucher: Voucher) -> None:
        """A deferred re-send: still the latest voucher and not confirmed, so send it."""
        with self._lock:
            book.resend_armed = False
            if book.last is voucher and book.confirmed < book.vouchered:
                self._send(voucher, book)

    def _send(self, voucher: Voucher, book: Book) -> None:
        info = self._mqtt.publish(self.voucher_topic, encode_voucher(voucher), qos=0)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._vouchers_sent += 1
            book.sent_at = time.monotonic()
        else:  # lost with the connection; the broker's PaymentRequest will get it resent
            _log.info("%s: voucher not sent (%s)", self.client_id, mqtt.error_string(info.rc))

    def unconfirmed(self) -> dict[tuple[bytes, str], int]:
        """Per (channel, lane), the latest amount vouchered that the broker has not confirmed
        with a Receipt yet (a broker that died before storing it never will, until it is back
        and the voucher is sent again: :meth:`FailoverSubscriber.settle_up`)."""
        with self._lock:
            return {
                key: book.vouchered
                for key, book in self._books.items()
                if book.last is not None and book.confirmed < book.vouchered
            }

    def _reconfirm(self) -> int:
        """After a (re)connect: re-send the latest voucher of every channel not confirmed up
        to it, so the broker answers with a Receipt (see the module docstring). Costs nothing
        new, so no budget check. The number re-sent."""
        sent = 0
        with self._lock:
            for book in self._books.values():
                if book.last is not None and book.confirmed < book.vouchered:
                    self._send(book.last, book)
                    sent += 1
        return sent
