"""The paying subscriber: receives market data and pays for exactly what it received.

Payment follows the control-topic protocol (:mod:`._control`). The broker sends a
:class:`Quote` (price and channel of a market topic) before the first paid message of that
topic to this session, and again when price or channel change. For every message on a quoted
topic the channel's *received value* grows by the price; once ``pay_every`` messages' worth is
unpaid, the subscriber signs a voucher for ``cumulative = received value`` and publishes it on
``blendsm/ctl/<address>/voucher``. So a buyer never signs for more than it received, and never
for more than its ``budget`` in total; past the budget it stops paying (and the broker stops
delivering once its credit runs out). A :class:`PaymentRequest` is answered with
``min(charged, received value)``; :class:`Receipt` notices record what the broker confirmed.

All payment state is guarded by one lock: paho callbacks run on its loop thread, the
introspection methods are called from others. Only the loop thread signs and publishes
vouchers, under that lock, so cumulative amounts leave in increasing order per channel.

Integrity (optional: give ``registry`` and a ``chain_reader``, or a ``verifier``): every
message is checked by a :class:`~blendsm.device_sdk.MessageVerifier` on one worker thread,
in arrival order, so chain reads never stall paho's loop (payment stays on the loop thread:
the broker delivered the message, whatever it holds). ``on_message`` then gets the
envelope's payload with ``device``, ``sequence`` and ``verified``; findings go to
``on_integrity``. With ``proof_sampling`` > 0 the subscriber listens to anchor notices and,
after each, asks the broker for the proofs of a sampled fraction of pending messages, then
checks them against the root read from the chain (:meth:`Subscriber.request_proof` asks for
one on demand). ``record_path`` keeps every market message (and proofs obtained) as JSON
lines, for ``blendsm verify``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import queue
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

import orjson
import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount

from blendsm.errors import (
    BlendsmError,
    ConfigError,
    EnvelopeError,
    SubscriptionRefusedError,
    WireError,
)

from ._chain_reader import ChainReader
from ._control import (
    ANCHORS_TOPIC,
    NOTICE,
    PROOF,
    VOUCHER,
    AnchorNotice,
    Notice,
    PaymentRequest,
    Proof,
    ProofRequest,
    Quote,
    Receipt,
    Refusal,
    control_topic,
    decode_anchor_notice,
    decode_any_notice,
    encode_proof_request,
    encode_voucher,
    is_control_topic,
)
from ._envelope import Envelope, MessageDomain, decode_envelope, verify_envelope
from ._integrity import IntegrityEvent, IntegrityKind, MessageVerifier, Verification
from ._keccak import checksum_address
from ._mqtt import Disconnection, _MqttClient
from ._voucher import Voucher, VoucherDomain, VoucherSigner

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace
    from blendsm.contracts._bindings import CloseRequest, Settlement, TxResult

__all__ = [
    "PaymentEvent",
    "PaymentEventKind",
    "ReceivedMessage",
    "Subscriber",
    "SubscriberCallbackAPI",
    "SubscriberStats",
]

_log = logging.getLogger("blendsm.device_sdk")

_SUBACK_FAILURE: Final = 0x80


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


@dataclass(slots=True)
class _Book:
    """Per-channel amounts, all cumulative in base units."""

    received: int = 0
    vouchered: int = 0
    confirmed: int = 0
    baseline: int = 0  # paid before this Subscriber (resume_channel); not counted in budget
    last: Voucher | None = None


MessageCallback = Callable[["Subscriber", ReceivedMessage], None]
PaymentCallback = Callable[["Subscriber", PaymentEvent], None]
DisconnectCallback = Callable[["Subscriber", Disconnection], None]
ErrorCallback = Callable[["Subscriber", BlendsmError], None]
IntegrityCallback = Callable[["Subscriber", IntegrityEvent], None]

_MAX_PENDING_PROOFS: Final = 10_000
_MAX_KNOWN_MESSAGES: Final = 65_536


@dataclass(slots=True)
class _Pending:
    """A received message whose proof is wanted (sampled, or asked for on demand)."""

    topic: str
    envelope: Envelope
    notices_seen: int = 0
    request_id: str | None = None


@dataclass(slots=True)
class _ProofWait:
    key: tuple[str, str, int]
    topic: str
    envelope: Envelope
    future: concurrent.futures.Future[IntegrityEvent] | None  # None: an automatic sample


class Subscriber(_MqttClient):
    """An MQTT subscriber that pays per delivered message with vouchers.

    ``broker`` is the broker operator's address (CONNECT tokens are bound to it, and channels
    opened here name it as operator); ``chain_id`` and ``channels_contract`` (the PaymentChannels
    address) form the voucher domain. ``budget`` caps the sum of all vouchers this Subscriber
    signs (None: no cap); ``pay_every`` is how many paid messages may stay unpaid before a
    voucher is sent (keep it within the broker's credit, or delivery pauses until paid).

    Integrity checks (see the module docstring) need the deployment's ``registry`` address
    (the message signature domain) and a ``chain_reader`` (e.g. a
    :class:`~blendsm.device_sdk.Web3ChainReader`), or a ready ``verifier``.
    ``proof_sampling`` is the fraction (0.0 to 1.0) of messages whose inclusion proof is
    checked after the next anchor notices; a message still unproven after
    ``proof_attempts`` notices is reported ``PROOF_UNAVAILABLE``. ``record_path`` names a
    JSON-lines file every market message (and proof obtained) is appended to.

    Set the callbacks as attributes (``sub.on_message = fn``); see
    :class:`SubscriberCallbackAPI` for their signatures. They run on paho's network thread,
    or with verification on, on the verification worker (``on_message``, ``on_integrity``):
    keep them short, and do not call ``connect``/``subscribe``/``disconnect`` or
    :meth:`request_proof` from them.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        channels_contract: str | bytes,
        budget: int | None = None,
        pay_every: int = 1,
        callback_api_version: SubscriberCallbackAPI = SubscriberCallbackAPI.VERSION1,
        client_id: str | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        registry: str | bytes | None = None,
        chain_reader: ChainReader | None = None,
        verifier: MessageVerifier | None = None,
        proof_sampling: float = 0.0,
        proof_attempts: int = 5,
        record_path: str | os.PathLike[str] | None = None,
        keyring: Decryptor | None = None,
    ) -> None:
        if callback_api_version is not SubscriberCallbackAPI.VERSION1:
            raise ConfigError(
                f"callback_api_version: unsupported {callback_api_version!r} (VERSION1 only)"
            )
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 0
        ):
            raise ConfigError(f"budget: must be None or a non-negative int, got {budget!r}")
        if not isinstance(pay_every, int) or isinstance(pay_every, bool) or pay_every < 1:
            raise ConfigError(f"pay_every: must be an int >= 1, got {pay_every!r}")
        super().__init__(
            account,
            host=host,
            port=port,
            broker=broker,
            chain_id=chain_id,
            client_id=client_id,
            clean_session=clean_session,
            keepalive=keepalive,
        )
        self.callback_api_version = callback_api_version
        self.domain = VoucherDomain(chain_id, channels_contract)
        self._signer = VoucherSigner(self._key, self.domain)
        self.budget = budget
        self.pay_every = pay_every
        self.notice_topic = control_topic(self.address, NOTICE)
        self.voucher_topic = control_topic(self.address, VOUCHER)

        self.on_message: MessageCallback | None = None
        self.on_payment: PaymentCallback | None = None
        self.on_disconnect: DisconnectCallback | None = None
        self.on_error: ErrorCallback | None = None
        self.on_integrity: IntegrityCallback | None = None

        if verifier is None and (registry is not None or chain_reader is not None):
            if registry is None or chain_reader is None:
                raise ConfigError("verification needs both registry and chain_reader")
            verifier = MessageVerifier(MessageDomain(chain_id, registry), chain_reader)
        if verifier is not None and verifier.domain.chain_id != chain_id:
            raise ConfigError(
                f"verifier: its message domain is for chain id {verifier.domain.chain_id},"
                f" not {chain_id}"
            )
        if (
            isinstance(proof_sampling, bool)
            or not isinstance(proof_sampling, int | float)
            or not 0.0 <= proof_sampling <= 1.0
        ):
            raise ConfigError(f"proof_sampling: must be in [0, 1], got {proof_sampling!r}")
        if (
            not isinstance(proof_attempts, int)
            or isinstance(proof_attempts, bool)
            or proof_attempts < 1
        ):
            raise ConfigError(f"proof_attempts: must be an int >= 1, got {proof_attempts!r}")
        if verifier is None and (
            proof_sampling > 0 or record_path is not None or keyring is not None
        ):
            raise ConfigError(
                "proof_sampling, record_path and keyring need verification"
                " (registry and chain_reader)"
            )
        self.verifier = verifier
        self.keyring = keyring
        self.proof_sampling = float(proof_sampling)
        self.proof_attempts = proof_attempts
        self.record_path = None if record_path is None else os.fspath(record_path)
        self.proof_topic = control_topic(self.address, PROOF)
        self._random = random.Random()
        self._ilock = threading.Lock()  # integrity state below, shared with request_proof
        self._pending: OrderedDict[tuple[str, str, int], _Pending] = OrderedDict()
        self._known: OrderedDict[tuple[str, str, int], tuple[str, Envelope]] = OrderedDict()
        self._requests: dict[str, _ProofWait] = {}
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._record: IO[bytes] | None = None
        self._verified_messages = 0
        self._integrity_events = 0

        self._lock = threading.Condition()
        self._quotes: dict[str, Quote] = {}
        self._books: dict[bytes, _Book] = {}
        self._spent = 0  # sum over channels of (vouchered - baseline): what the budget caps
        self._exhausted = False
        self._filters: dict[str, int] = {}
        self._messages = 0
        self._paid_messages = 0
        self._vouchers_sent = 0
        self._receipts = 0
        self._refusals = 0
        self._payment_requests = 0
        self._bad_notices = 0
        self._unpaid_invalid = 0

    # --- subscriptions -----------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 0, timeout: float = 10.0) -> int:
        """Subscribe and wait for the SUBACK; the granted QoS.

        Raises :class:`SubscriptionRefusedError` on 0x80 (the client stays connected).
        The filter is renewed after a reconnect that lost the session.
        """
        if is_control_topic(topic_filter):
            raise ConfigError(
                f"topic_filter: {topic_filter!r} is in the reserved control tree;"
                " notices are subscribed to automatically"
            )
        granted = self._subscribe(topic_filter, qos, timeout)
        with self._lock:
            self._filters[topic_filter] = qos
        return granted

    def _after_connect(self, timeout: float) -> None:
        self._subscribe(self.notice_topic, 1, timeout)
        if self.proof_sampling > 0:
            self._subscribe(ANCHORS_TOPIC, 1, timeout)

    def _on_reconnected(self, session_present: bool) -> None:
        if session_present:
            return
        with self._lock:
            filters = [(self.notice_topic, 1), *self._filters.items()]
        if self.proof_sampling > 0:
            filters.append((ANCHORS_TOPIC, 1))
        for topic_filter, qos in filters:
            self._subscribe(topic_filter, qos, None)

    def _on_suback_untracked(self, topic_filter: str, codes: list[int]) -> None:
        # A filter renewed after a reconnect was refused (access revoked meanwhile?).
        if not codes or codes[0] >= _SUBACK_FAILURE:
            with self._lock:
                self._filters.pop(topic_filter, None)
            self._report_error(SubscriptionRefusedError(topic_filter))

    def _on_lost(self, disconnection: Disconnection) -> None:
        callback = self.on_disconnect
        if callback is not None:
            callback(self, disconnection)

    # --- introspection -----------------------------------------------------------------

    def received_value(self, channel_id: bytes) -> int:
        """Value received on ``channel_id`` (cumulative, including a resumed baseline)."""
        with self._lock:
            book = self._books.get(channel_id)
            return 0 if book is None else book.received

    def vouchered(self, channel_id: bytes) -> int:
        """Cumulative amount of the latest voucher signed for ``channel_id``."""
        with self._lock:
            book = self._books.get(channel_id)
            return 0 if book is None else book.vouchered

    def confirmed(self, channel_id: bytes) -> int:
        """Largest amount the broker confirmed with a Receipt on ``channel_id``."""
        with self._lock:
            book = self._books.get(channel_id)
            return 0 if book is None else book.confirmed

    def wait_confirmed(self, channel_id: bytes, amount: int, timeout: float) -> bool:
        """Wait until the broker confirmed at least ``amount`` on ``channel_id``."""
        with self._lock:
            return self._lock.wait_for(
                lambda: (b := self._books.get(channel_id)) is not None and b.confirmed >= amount,
                timeout,
            )

    def quote(self, topic: str) -> Quote | None:
        """The latest quote for ``topic`` (a topic name), None if it is free so far."""
        with self._lock:
            return self._quotes.get(topic)

    @property
    def spent(self) -> int:
        """Total newly vouchered across channels (what ``budget`` caps)."""
        with self._lock:
            return self._spent

    @property
    def budget_exhausted(self) -> bool:
        with self._lock:
            return self._exhausted

    @property
    def stats(self) -> SubscriberStats:
        with self._lock:
            return SubscriberStats(
                messages=self._messages,
                paid_messages=self._paid_messages,
                vouchers_sent=self._vouchers_sent,
                receipts=self._receipts,
                refusals=self._refusals,
                payment_requests=self._payment_requests,
                bad_notices=self._bad_notices,
                unpaid_invalid=self._unpaid_invalid,
                verified_messages=self._verified_messages,
                integrity_events=self._integrity_events,
            )

    def pay_outstanding(self, channel_id: bytes | None = None) -> int:
        """Voucher everything received but not yet paid (on one channel, or all): the last
        messages of a stream stay below ``pay_every`` otherwise. Within the budget; returns
        the number of vouchers sent."""
        events: list[PaymentEvent] = []
        with self._lock:
            for cid, book in list(self._books.items()):
                if (channel_id is None or cid == channel_id) and book.received > book.vouchered:
                    self._pay(cid, book, book.received, events)
        self._report(events)
        return sum(1 for e in events if e.kind is PaymentEventKind.VOUCHER_SENT)

    def resume_channel(self, channel_id: bytes, paid: int) -> None:
        """Continue a channel this account already paid ``paid`` on (cumulative), e.g. after a
        restart: later vouchers build on it. Call before messages arrive on that channel;
        ``paid`` does not count against ``budget``."""
        if not isinstance(channel_id, bytes) or len(channel_id) != 32:
            raise ConfigError("channel_id: must be 32 bytes")
        if not isinstance(paid, int) or isinstance(paid, bool) or paid < 0:
            raise ConfigError(f"paid: must be a non-negative int, got {paid!r}")
        with self._lock:
            book = self._books.setdefault(channel_id, _Book())
            if book.vouchered > book.baseline or book.received > book.baseline:
                raise ConfigError("resume_channel: the channel is already in use here")
            book.received = book.vouchered = book.baseline = paid

    # --- messages and notices (paho's thread) ------------------------------------------

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        payload = bytes(message.payload)  # already bytes from the socket: no copy
        if topic == self.notice_topic:
            self._on_notice(payload)
            return
        if topic == ANCHORS_TOPIC and self.verifier is not None:
            self._on_anchor_notice(payload)
            return
        events: list[PaymentEvent] = []
        with self._lock:
            self._messages += 1
            quote = self._quotes.get(topic)
            if quote is None or quote.price == 0:
                received = ReceivedMessage(
                    topic, payload, message.qos, bool(message.retain), False, 0, None
                )
            elif not self._authentic(topic, payload):
                # A paid message whose envelope is not validly signed is never paid for: the
                # broker (which checks every envelope) delivered something it should not have.
                # The worker reports BAD_SIGNATURE; the dispute is capped by the broker's credit.
                self._unpaid_invalid += 1
                received = ReceivedMessage(
                    topic, payload, message.qos, bool(message.retain), False, 0, None
                )
            else:
                self._paid_messages += 1
                book = self._books.setdefault(quote.channel_id, _Book())
                book.received += quote.price
                if book.received - book.vouchered >= self.pay_every * quote.price:
                    self._pay(quote.channel_id, book, book.received, events)
                received = ReceivedMessage(
                    topic,
                    payload,
                    message.qos,
                    bool(message.retain),
                    True,
                    quote.price,
                    quote.channel_id,
                )
        if self.verifier is None:
            self._deliver(received)
            self._report(events)
        else:
            self._report(events)
            received_at = time.time()
            self._submit(lambda: self._verify_message(received, received_at))

    def _authentic(self, topic: str, payload: bytes) -> bool:
        """With verification on: is this a well-formed envelope signed by its device for this
        topic? (~100 us, on paho's thread, before paying; the chain checks follow on the
        worker.) Always True without a verifier."""
        verifier = self.verifier
        if verifier is None:
            return True
        try:
            verify_envelope(verifier.domain, topic, decode_envelope(payload))
        except EnvelopeError:
            return False
        return True

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
                self._submit(lambda: self._on_proof(notice.request_id, notice))
            return
        if (
            isinstance(notice, Refusal)
            and notice.request_id is not None
            and self.verifier is not None
        ):
            request_id = notice.request_id
            self._submit(lambda: self._on_proof(request_id, notice))
            return
        events: list[PaymentEvent] = []
        with self._lock:
            if isinstance(notice, Quote):
                # No resend on a quote even if its ``paid`` lags: a voucher may be in flight,
                # and the broker asks with a PaymentRequest when it really lacks one.
                self._quotes[notice.topic] = notice
                self._books.setdefault(notice.channel_id, _Book())
            elif isinstance(notice, PaymentRequest):
                self._payment_requests += 1
                book = self._books.setdefault(notice.channel_id, _Book())
                before = book.vouchered
                target = min(notice.charged, book.received)
                if target > book.vouchered:
                    self._pay(notice.channel_id, book, target, events)
                else:
                    self._resend_if_behind(book, notice.paid)
                paid = book.vouchered if book.vouchered > before else None
                events.append(
                    PaymentEvent(
                        PaymentEventKind.PAYMENT_REQUEST,
                        notice.channel_id,
                        paid,
                        notice,
                        f"broker charged {notice.charged}, received value {book.received}",
                    )
                )
            elif isinstance(notice, Receipt):
                self._receipts += 1
                book = self._books.setdefault(notice.channel_id, _Book())
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

    def _pay(self, channel_id: bytes, book: _Book, target: int, events: list[PaymentEvent]) -> None:
        """Sign and publish a voucher for ``target`` (cumulative) if the budget allows.
        Caller holds the lock; ``target`` never exceeds the received value."""
        if target <= book.vouchered or self._exhausted:
            return
        increase = target - book.vouchered
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
        voucher = self._signer.sign(channel_id, target)
        book.vouchered = target
        book.last = voucher
        self._spent += increase
        self._send(voucher)
        events.append(PaymentEvent(PaymentEventKind.VOUCHER_SENT, channel_id, target))

    def _resend_if_behind(self, book: _Book, broker_paid: int) -> None:
        """The broker asks while knowing less than we signed (a voucher lost with a
        connection): send the latest again. It costs nothing new, so no budget check. Caller holds the lock."""
        if book.last is not None and broker_paid < book.vouchered:
            self._send(book.last)

    def _send(self, voucher: Voucher) -> None:
        info = self._mqtt.publish(self.voucher_topic, encode_voucher(voucher), qos=0)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._vouchers_sent += 1
        else:  # lost with the connection; the broker's PaymentRequest will get it resent
            _log.info("%s: voucher not sent (%s)", self.client_id, mqtt.error_string(info.rc))

    # --- integrity (the verification worker) -------------------------------------------

    def disconnect(self) -> None:
        """Send DISCONNECT, stop the network thread, then let the verification worker finish
        what was received (idempotent)."""
        super().disconnect()
        self._stop_worker()

    def _submit(self, job: Callable[[], None]) -> None:
        with self._ilock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._work, name=f"blendsm-verify-{self.client_id}", daemon=True
                )
                self._worker.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._guard(job)

    def _stop_worker(self, timeout: float = 30.0) -> None:
        with self._ilock:
            worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            self._jobs.put(None)
            worker.join(timeout)
        with self._ilock:
            record, self._record = self._record, None
        if record is not None:
            record.close()

    def _write_record(self, line: dict[str, Any]) -> None:
        """Append one JSON line to the record file (worker thread)."""
        if self.record_path is None:
            return
        with self._ilock:
            if self._record is None:
                self._record = open(self.record_path, "ab")  # noqa: SIM115 - kept open
            self._record.write(orjson.dumps(line) + b"\n")
            self._record.flush()

    def _verify_message(self, message: ReceivedMessage, received_at: float) -> None:
        assert self.verifier is not None
        checked: Verification = self.verifier.check(message.topic, message.payload)
        if checked.market is not False:
            self._write_record(
                {
                    "type": "message",
                    "topic": message.topic,
                    "envelope": "0x" + message.payload.hex(),
                    "received_at": received_at,
                    "qos": message.qos,
                    "retain": message.retain,
                    "verified": checked.verified,
                }
            )
        envelope = checked.envelope
        if envelope is not None and checked.leaf is not None and checked.device is not None:
            key = (message.topic, checked.device, envelope.sequence)
            with self._ilock:
                self._known[key] = (message.topic, envelope)
                self._known.move_to_end(key)
                while len(self._known) > _MAX_KNOWN_MESSAGES:
                    self._known.popitem(last=False)
                if self.proof_sampling > 0 and self._random.random() < self.proof_sampling:
                    self._pending[key] = _Pending(message.topic, envelope)
                    while len(self._pending) > _MAX_PENDING_PROOFS:
                        self._pending.popitem(last=False)
        with self._lock:
            if checked.verified:
                self._verified_messages += 1
        payload = checked.payload
        decrypted: bool | None = None
        if envelope is not None and envelope.encrypted and self.keyring is not None:
            try:
                payload = self.keyring.decrypt(message.topic, envelope.payload)
                decrypted = True
            except BlendsmError as exc:  # no key for that epoch (right ended), or bad bytes
                decrypted = False
                self._report_error(exc)
        received = ReceivedMessage(
            message.topic,
            payload,
            message.qos,
            message.retain,
            message.paid,
            message.price,
            message.channel_id,
            checked.device,
            checked.sequence,
            None if envelope is None else envelope.timestamp_ms,
            checked.verified,
            envelope is not None and envelope.encrypted,
            decrypted,
        )
        self._deliver(received)
        self._report_integrity(checked.events)
        if checked.error is not None:
            self._report_error(checked.error)

    def _on_anchor_notice(self, payload: bytes) -> None:
        try:
            notice = decode_anchor_notice(payload)
        except WireError as exc:
            with self._lock:
                self._bad_notices += 1
            self._report_error(exc)
            return
        self._submit(lambda: self._request_samples(notice))

    def _request_samples(self, notice: AnchorNotice) -> None:
        """After an anchor notice: ask for the proof of every pending sampled message; the
        ones asked ``proof_attempts`` times in vain are reported unavailable (worker)."""
        expired: list[IntegrityEvent] = []
        requests: list[ProofRequest] = []
        with self._ilock:
            for key, pending in list(self._pending.items()):
                if pending.notices_seen >= self.proof_attempts:
                    del self._pending[key]
                    if pending.request_id is not None:
                        self._requests.pop(pending.request_id, None)
                    expired.append(
                        IntegrityEvent(
                            IntegrityKind.PROOF_UNAVAILABLE,
                            pending.topic,
                            key[1],
                            key[2],
                            f"no proof after {pending.notices_seen} anchor notices"
                            f" (latest batch {notice.batch_id})",
                        )
                    )
                    continue
                pending.notices_seen += 1
                if pending.request_id is not None:
                    self._requests.pop(pending.request_id, None)
                request_id = secrets.token_hex(8)
                pending.request_id = request_id
                self._requests[request_id] = _ProofWait(key, pending.topic, pending.envelope, None)
                requests.append(ProofRequest(request_id, pending.topic, key[2], key[1]))
        for request in requests:
            self._send_proof_request(request)
        self._report_integrity(expired)

    def _send_proof_request(self, request: ProofRequest) -> bool:
        info = self._mqtt.publish(self.proof_topic, encode_proof_request(request), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            _log.info("%s: proof request not sent (%s)", self.client_id, mqtt.error_string(info.rc))
            return False
        return True

    def _on_proof(self, request_id: str, answer: Proof | Refusal) -> None:
        """A proof or a ``proof_unavailable`` refusal arrived (worker)."""
        with self._ilock:
            wait = self._requests.pop(request_id, None)
        if wait is None:  # an answer to an expired or foreign request
            return
        assert self.verifier is not None
        if isinstance(answer, Proof):
            event = self.verifier.check_proof(self.broker, wait.topic, wait.envelope, answer)
            if event.kind is not IntegrityKind.PROOF_UNAVAILABLE:
                self._write_record(
                    {
                        "type": "proof",
                        "topic": wait.topic,
                        "device": wait.key[1],
                        "sequence": wait.key[2],
                        "broker": self.broker,
                        "batch": answer.batch_id,
                        "index": answer.index,
                        "leaf": "0x" + answer.leaf.hex(),
                        "root": "0x" + answer.root.hex(),
                        "proof": ["0x" + p.hex() for p in answer.proof],
                        "tx": None if answer.tx_hash is None else "0x" + answer.tx_hash.hex(),
                        "verdict": str(event.kind),
                    }
                )
        else:
            event = IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE,
                wait.topic,
                wait.key[1],
                wait.key[2],
                f"{answer.code}: {answer.detail}",
            )
        with self._ilock:
            pending = self._pending.get(wait.key)
            if pending is not None and pending.request_id == request_id:
                pending.request_id = None
                if event.kind is not IntegrityKind.PROOF_UNAVAILABLE:
                    del self._pending[wait.key]
            elif event.kind is not IntegrityKind.PROOF_UNAVAILABLE:
                self._pending.pop(wait.key, None)
        if wait.future is not None:
            wait.future.set_result(event)
        elif event.kind is IntegrityKind.PROOF_UNAVAILABLE:
            return  # still pending: asked again after the next anchor notice
        self._report_integrity([event])

    def request_proof(
        self, topic: str, device: str, sequence: int, timeout: float = 10.0
    ) -> IntegrityEvent:
        """Ask the broker for the proof of a message this subscriber received and check it
        against the on-chain root: PROOF_VERIFIED, PROOF_FAILED or PROOF_UNAVAILABLE (not
        anchored yet, not received here, no answer within ``timeout``). Blocks: never call
        it from a callback."""
        if self.verifier is None:
            raise ConfigError("request_proof needs verification (registry and chain_reader)")
        with self._ilock:
            worker = self._worker
        if threading.current_thread() in (worker, getattr(self._mqtt, "_thread", None)):
            raise ConfigError("request_proof blocks: do not call it from a callback")
        try:
            raw = bytes.fromhex(device.removeprefix("0x"))
        except ValueError:
            raw = b""
        if len(raw) != 20:
            raise ConfigError(f"device: not an address: {device!r}")
        with self._ilock:
            known = self._known.get((topic, checksum_address(raw), sequence))
        if known is None:
            return IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE,
                topic,
                device,
                sequence,
                "message not received by this subscriber (or forgotten): no leaf to check",
            )
        envelope = known[1]
        full_key = (topic, envelope.device_address, sequence)
        future: concurrent.futures.Future[IntegrityEvent] = concurrent.futures.Future()
        request_id = secrets.token_hex(8)
        with self._ilock:
            self._requests[request_id] = _ProofWait(full_key, topic, envelope, future)
        request = ProofRequest(request_id, topic, sequence, envelope.device_address)
        if not self._send_proof_request(request):
            with self._ilock:
                self._requests.pop(request_id, None)
            return IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE, topic, device, sequence, "request not sent"
            )
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._ilock:
                self._requests.pop(request_id, None)
            return IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE,
                topic,
                envelope.device_address,
                sequence,
                f"no answer from the broker within {timeout:g} s",
            )

    def pending_proofs(self) -> int:
        """Sampled messages whose proof has not been checked yet."""
        with self._ilock:
            return len(self._pending)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the verification worker has handled everything queued so far."""
        if self.verifier is None:
            return True
        done = threading.Event()
        self._submit(done.set)
        return done.wait(timeout)

    def _report_integrity(self, events: list[IntegrityEvent] | tuple[IntegrityEvent, ...]) -> None:
        if not events:
            return
        with self._lock:
            self._integrity_events += len(events)
        for event in events:
            if not event.ok:
                _log.info("%s: integrity: %s %s", self.client_id, event.kind, event.detail)
        callback = self.on_integrity
        if callback is not None:
            for event in events:
                self._guard(callback, self, event)

    # --- user callbacks ----------------------------------------------------------------

    def _deliver(self, message: ReceivedMessage) -> None:
        callback = self.on_message
        if callback is not None:
            self._guard(callback, self, message)

    def _report(self, events: list[PaymentEvent]) -> None:
        callback = self.on_payment
        if callback is not None:
            for event in events:
                self._guard(callback, self, event)

    def _report_error(self, error: BlendsmError) -> None:
        _log.warning("%s: %s", self.client_id, error)
        callback = self.on_error
        if callback is not None:
            self._guard(callback, self, error)

    # --- chain helpers (need blendsm[broker], i.e. web3) -------------------------------

    def _check_marketplace(self, marketplace: Marketplace) -> None:
        if marketplace.address is None or marketplace.address.lower() != self.address.lower():
            raise ConfigError(
                f"marketplace: signs as {marketplace.address}, not as this subscriber {self.address}"
            )
        if marketplace.channels.address.lower() != self.domain.verifying_contract.lower():
            raise ConfigError(
                f"marketplace: PaymentChannels at {marketplace.channels.address}, but vouchers"
                f" are signed for {self.domain.verifying_contract}"
            )

    async def open_channel(
        self,
        marketplace: Marketplace,
        seller: str,
        deposit: int,
        *,
        token: str | None = None,
        fee_bps: int = 0,
    ) -> bytes:
        """Open a channel to ``seller`` metered by this subscriber's broker operator (the
        broker meters only channels naming it); ``token`` None is the native coin, an ERC-20
        is approved first. ``marketplace`` must sign as this subscriber. The channel id."""
        self._check_marketplace(marketplace)
        opened = await marketplace.channels.open(
            seller, self.broker, token, deposit, fee_bps, approve=token is not None
        )
        return opened.channel_id

    async def top_up(self, marketplace: Marketplace, channel_id: bytes, amount: int) -> TxResult:
        """Add ``amount`` to the channel's deposit (an ERC-20 is approved first)."""
        self._check_marketplace(marketplace)
        return await marketplace.channels.top_up(channel_id, amount, approve=True)

    async def close_channel(
        self, marketplace: Marketplace, channel_id: bytes, *, settle_timeout: float = 5.0
    ) -> CloseRequest:
        """Pay what is outstanding on the channel (waiting up to ``settle_timeout`` for the
        broker's receipt while connected), then request close: the challenge period starts
        (the broker can still claim); then :meth:`withdraw` refunds the rest."""
        self._check_marketplace(marketplace)
        if self.connected and self.pay_outstanding(channel_id):
            target = self.vouchered(channel_id)
            await asyncio.to_thread(self.wait_confirmed, channel_id, target, settle_timeout)
        return await marketplace.channels.request_close(channel_id)

    async def withdraw(self, marketplace: Marketplace, channel_id: bytes) -> Settlement:
        """Take back the unclaimed deposit once the challenge period is over."""
        self._check_marketplace(marketplace)
        return await marketplace.channels.withdraw(channel_id)
