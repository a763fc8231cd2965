"""The subscriber's per-(channel, lane) payment book and the rule it answers payment requests by.

Why a rule for requests at all: the subscriber pays for what it received, the broker
charges what it wrote to the connection. The two differ only by messages that were in flight
when a connection died (the process was killed, the network cut): the broker charged them,
the subscriber never read them. Left alone, that gap never closes: the broker's unpaid
amount sits at its credit and it delivers nothing more. The rule below closes it, with a
bound on what the buyer can lose.

Convergence rule (documented in docs/protocol.md): a :class:`PaymentRequest` is answered
with ``min(charged, received)``; except that the *first* request for a channel on each
connection, for a channel already in use before that connection (an earlier connection of
this Subscriber, or :meth:`Subscriber.resume_channel`), may also pay the messages lost in
flight: ``min(charged, received + allowance)`` with ``allowance = min(request.credit,
max_write_off)``. The written-off value counts as received, so later vouchers continue from
it. Bound: per channel and per connection the buyer pays at most ``allowance`` for messages
it did not read, and within one connection never more than it received (a broker reads the
connection's own messages before any request that follows them).
"""

from __future__ import annotations

from dataclasses import dataclass

from blendsm.errors import ConfigError

from ._control import PaymentRequest
from ._voucher import Voucher

__all__ = ["Book", "check_amount", "request_target"]


@dataclass(slots=True)
class Book:
    """Per (channel, lane) amounts, all cumulative in base units: one counter per broker key
    the channel was paid through (lanes, issue 14)."""

    received: int = 0
    """Value received, plus what :func:`request_target` wrote off."""
    vouchered: int = 0
    confirmed: int = 0
    baseline: int = 0  # paid before this Subscriber (resume_channel); not counted in budget
    last: Voucher | None = None
    epoch: int = 0
    """The connection the book was opened on (-1: resumed, in use before this Subscriber)."""
    written_off_on: int = -1
    """The last connection whose first request could write off in-flight messages."""
    written_off: int = 0
    """Total value paid for messages charged on a dead connection and never received."""
    sent_at: float = 0.0
    """``time.monotonic()`` when ``last`` was last sent (a request younger than
    :data:`~blendsm.device_sdk._subscriber_payments.RESEND_AFTER` may have crossed it)."""
    resend_armed: bool = False
    """A deferred re-send of ``last`` is waiting (at most one per book)."""


def request_target(
    book: Book, request: PaymentRequest, epoch: int, max_write_off: int | None
) -> int:
    """The cumulative amount to voucher for ``request`` on connection ``epoch`` (see the
    module docstring); records a write-off in ``book``. Never above ``request.charged``."""
    target = min(request.charged, book.received)
    if book.epoch >= epoch or book.written_off_on >= epoch:
        return target
    book.written_off_on = epoch
    allowance = max(request.credit, 0)
    if max_write_off is not None:
        allowance = min(allowance, max_write_off)
    target = min(request.charged, book.received + allowance)
    if target > book.received:
        book.written_off += target - book.received
        book.received = target
    return target


def check_amount(name: str, value: object, least: int, *, optional: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= ``least`` (or None if
    ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        what = f"an int >= {least}" if least else "a non-negative int"
        raise ConfigError(f"{name}: must be {'None or ' if optional else ''}{what}, got {value!r}")
