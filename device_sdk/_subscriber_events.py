"""What the Subscriber reports: received messages, payment events, counters, and the
signatures of its callbacks.

Why a module of its own: these are the declarations an application codes against (and the
verification worker builds :class:`ReceivedMessage` too); keeping them apart from the
Subscriber's machinery lets both halves import them without importing each other.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blendsm.errors import BlendsmError

from ._control import Notice
from ._integrity import IntegrityEvent
from ._mqtt import Disconnection

if TYPE_CHECKING:
    from ._subscriber import Subscriber

__all__ = [
    "Decryptor",
    "DisconnectCallback",
    "ErrorCallback",
    "IntegrityCallback",
    "MessageCallback",
    "PaymentCallback",
    "PaymentEvent",
    "PaymentEventKind",
    "ReceivedMessage",
    "SubscriberCallbackAPI",
    "SubscriberStats",
]


class SubscriberCallbackAPI(enum.IntEnum):
    """Signatures of the Subscriber's callbacks, versioned like paho's CallbackAPIVersion
    so they can change later without breaking existing code.

    VERSION1::

        on_message(subscriber, message: ReceivedMessage)
        on_payment(subscriber, event: PaymentEvent)
        on_disconnect(subscriber, disconnection: Disconnection)
        on_error(subscriber, error: BlendsmError)
        on_integrity(subscriber, event: IntegrityEvent)
    """

    VERSION1 = 1


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A market message as delivered; ``paid`` with the quoted ``price`` and ``channel_id``
    when the topic was quoted, else free (price 0, no channel).

    With verification on, ``payload`` is the envelope's payload (the data without the
    signed header) and ``device``, ``sequence``, ``timestamp_ms`` come from the envelope;
    ``verified`` is True when the device signed it and is an active device of the topic's
    seller on chain, False when a check failed (see ``on_integrity``), None when not checked
    (no verification, not a market topic, or the chain could not be read). Without
    verification, ``payload`` is the data as received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    paid: bool
    price: int
    channel_id: bytes | None
    device: str | None = None
    sequence: int | None = None
    timestamp_ms: int | None = None
    verified: bool | None = None
    encrypted: bool = False
    """The device encrypted the payload with the topic key (envelope flag)."""
    decrypted: bool | None = None
    """With a ``keyring``: True if ``payload`` is the plaintext, False if it could not be
    decrypted (``payload`` stays the ciphertext; the reason goes to ``on_error``)."""


class Decryptor(Protocol):
    """Turns an encrypted envelope payload of a topic into plaintext (``TopicKeyring``)."""

    def decrypt(self, topic: str, payload: bytes) -> bytes: ...


class PaymentEventKind(enum.StrEnum):
    """What an :class:`PaymentEvent` reports."""

    VOUCHER_SENT = "voucher_sent"
    """A voucher for ``amount`` (cumulative) on ``channel_id`` was published."""
    RECEIPT = "receipt"
    """The broker stored a voucher: ``amount`` is paid on ``channel_id``."""
    REFUSAL = "refusal"
    """The broker refused a voucher; ``notice`` is the :class:`Refusal`, ``detail`` why."""
    PAYMENT_REQUEST = "payment_request"
    """Delivery paused for lack of credit; ``amount`` is what the subscriber paid in answer
    (cumulative), None if it paid nothing more."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """Paying ``amount`` (cumulative) on ``channel_id`` would exceed the budget: payment stopped."""
    DEPOSIT_EXHAUSTED = "deposit_exhausted"
    """Paying ``amount`` (cumulative) on one lane would take the channel's lanes together over
    its deposit (:meth:`Subscriber.set_deposit`): that voucher is not signed (top up)."""


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """A payment happening reported to ``on_payment``."""

    kind: PaymentEventKind
    channel_id: bytes | None
    amount: int | None
    notice: Notice | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SubscriberStats:
    """Counters since the Subscriber was made."""

    messages: int
    paid_messages: int
    vouchers_sent: int
    receipts: int
    refusals: int
    payment_requests: int
    bad_notices: int
    verified_messages: int = 0
    """Messages whose signature and device checked out (verification on)."""
    integrity_events: int = 0
    """Integrity findings reported (proof verdicts included)."""
    unpaid_invalid: int = 0
    """Quoted paid messages not paid for because their envelope was not validly signed."""


MessageCallback = Callable[["Subscriber", ReceivedMessage], None]
PaymentCallback = Callable[["Subscriber", PaymentEvent], None]
DisconnectCallback = Callable[["Subscriber", Disconnection], None]
ErrorCallback = Callable[["Subscriber", BlendsmError], None]
IntegrityCallback = Callable[["Subscriber", IntegrityEvent], None]
