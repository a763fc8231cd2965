"""The paying subscriber: receives market data and pays for exactly what it received.

Payment follows the control-topic protocol (:mod:`._control`). The broker sends a
:class:`Quote` (price and channel of a market topic) before the first paid message of that
topic to this session, and again when price or channel change. For every message on a quoted
topic the channel's *received value* grows by the price; once the payment schedule says so, the
subscriber signs a voucher for ``cumulative = received value`` and publishes it on
``blendsm/ctl/<address>/voucher``. The default schedule follows the broker's credit: a voucher
once half the quoted credit is unpaid (so the next one is on its way long before the broker
pauses: it never needs a voucher per message, and at a steady rate the credit never runs out
while the round trip takes less than half the credit's time), and, with ``pay_within``, at most
that many seconds after an unpaid message arrived (the end of a stream is paid too). An
explicit ``pay_every`` pays every that many messages' worth instead. So a buyer never signs for
more than it received, and never for more than its ``budget`` in total; past the budget it
stops paying (and the broker stops delivering once its credit runs out). A
:class:`PaymentRequest` is answered with
``min(charged, received value)`` (after a reconnect or restart, up to the credit more for
messages lost in flight: :mod:`._payment_book`); :class:`Receipt` notices confirm payments
(cumulative: the broker sends one every few vouchers, so nothing here waits for one).

All payment state is guarded by one lock: paho callbacks run on its loop thread, the
introspection methods are called from others. Vouchers are signed and published only under
that lock (on the loop thread; by :meth:`pay_outstanding` and :meth:`connect` on the caller's),
so cumulative amounts leave in increasing order per channel. After every (re)connect the
latest voucher of each channel not confirmed by a Receipt is sent again
(:mod:`._subscriber_payments`).

Integrity (optional: give ``registry`` and a ``chain_reader``, or a ``verifier``): every
message is checked in arrival order on the worker thread of :mod:`._verification` (chain
reads never stall paho's loop); ``on_message`` then gets the envelope's payload with
``device``, ``sequence`` and ``verified``, findings go to ``on_integrity``, and with
``proof_sampling`` > 0 sampled messages are proven against the anchored roots.
``record_path`` keeps every market message (and proofs obtained) as JSON lines, for
``blendsm verify``.

Layout: this module connects and receives; :mod:`._subscriber_payments` keeps the books and
pays (vouchers out, notices in); :mod:`._subscriber_integrity` connects it to the
verification worker of :mod:`._verification` (anchor notices, proof requests),
:mod:`._record_file` is the record file, :mod:`._channel_helpers` the async on-chain channel
helpers, and :mod:`._subscriber_events` what the callbacks receive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Final, Unpack

import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount

from blendsm.errors import (
    BlendsmError,
    ConfigError,
    EnvelopeError,
    SubscriptionRefusedError,
)

from ._chain_reader import ChainReader
from ._channel_helpers import ChannelHelpers
from ._control import (
    ANCHORS_TOPIC,
    NOTICE,
    PROOF,
    VOUCHER,
    Quote,
    control_topic,
    is_control_topic,
)
from ._endpoint import BrokerEndpoint, EndpointArgs, resolve_endpoint
from ._envelope import Envelope, decode_envelope, verify_envelope
from ._integrity import MessageVerifier
from ._mqtt import Disconnection, ReconnectPolicy, _MqttClient
from ._payment_book import Book, check_amount
from ._record_file import RecordFile
from ._subscriber_events import (
    Decryptor,
    DisconnectCallback,
    ErrorCallback,
    IntegrityCallback,
    MessageCallback,
    PaymentCallback,
    PaymentEvent,
    ReceivedMessage,
    SubscriberCallbackAPI,
    SubscriberStats,
)
from ._subscriber_integrity import SubscriberIntegrity
from ._subscriber_payments import SubscriberPayments
from ._verification import VerificationWorker, message_verifier
from ._voucher import VoucherDomain, VoucherSigner

__all__ = ["Subscriber"]

_log = logging.getLogger("blendsm.device_sdk")

_SUBACK_FAILURE: Final = 0x80
_RECONNECT_BASE_DELAY: Final = 0.5
"""Upper bound of the first automatic retry's wait, doubled per failed attempt up to
``reconnect_max_delay``."""


class Subscriber(_MqttClient, ChannelHelpers, SubscriberIntegrity, SubscriberPayments):
    """An MQTT subscriber that pays per delivered message with vouchers.

    ``endpoint`` (a :class:`BrokerEndpoint`; or, as before it existed, its fields as keyword
    arguments ``host=``, ``port=``, ``broker=``, ``chain_id=``, ``client_id=``,
    ``keepalive=``) says where to connect: ``broker`` is the broker operator's address
    (CONNECT tokens are bound to it, and channels opened here name it as operator);
    ``chain_id`` and ``channels_contract`` (the PaymentChannels address) form the voucher
    domain. ``budget`` caps the sum of all vouchers this Subscriber
    signs (None: no cap); ``pay_every`` is how many paid messages may stay unpaid before a
    voucher is sent (keep it within the broker's credit, or delivery pauses until paid; None,
    the default: half the credit the broker quoted, at least one message); ``pay_within``
    (seconds, None: never) pays whatever is still unpaid that long after it arrived, from a
    timer thread, so a stream that stops below the threshold is paid in full.
    ``max_write_off`` caps what a request may make it pay for messages lost in flight, per
    channel and connection (None: the broker's credit; 0: never, at the risk of a stuck channel).

    Reconnects (automatic after a drop, with a fresh CONNECT token): each retry waits a random
    time in ``[0, min(reconnect_max_delay, 0.5 s * 2**(attempt-1))]`` (full jitter, no fixed
    floor), so a buyer is back within about ``reconnect_max_delay`` of the broker listening
    and a fleet does not retry in lockstep. The default (1 s) favours getting paid data again
    quickly; raise it for very large fleets on one broker. After every (re)connect the latest
    unconfirmed voucher of each channel is sent again to obtain its Receipt.

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
        channels_contract: str | bytes,
        endpoint: BrokerEndpoint | None = None,
        budget: int | None = None,
        pay_every: int | None = None,
        pay_within: float | None = 1.0,
        max_write_off: int | None = None,
        callback_api_version: SubscriberCallbackAPI = SubscriberCallbackAPI.VERSION1,
        clean_session: bool = True,
        registry: str | bytes | None = None,
        chain_reader: ChainReader | None = None,
        verifier: MessageVerifier | None = None,
        proof_sampling: float = 0.0,
        proof_attempts: int = 5,
        record_path: str | os.PathLike[str] | None = None,
        keyring: Decryptor | None = None,
        reconnect_max_delay: float = 1.0,
        **connection: Unpack[EndpointArgs],
    ) -> None:
        if callback_api_version is not SubscriberCallbackAPI.VERSION1:
            raise ConfigError(
                f"callback_api_version: unsupported {callback_api_version!r} (VERSION1 only)"
            )
        check_amount("budget", budget, 0)
        check_amount("pay_every", pay_every, 1)
        if pay_within is not None and (
            not isinstance(pay_within, int | float)
            or isinstance(pay_within, bool)
            or not 0 < pay_within <= 3600
        ):
            raise ConfigError(f"pay_within: must be in (0, 3600] seconds or None, got {pay_within}")
        check_amount("max_write_off", max_write_off, 0)
        super().__init__(
            account,
            resolve_endpoint(endpoint, connection, "Subscriber"),
            clean_session=clean_session,
            reconnect=ReconnectPolicy(0, _RECONNECT_BASE_DELAY, reconnect_max_delay),
        )
        self.callback_api_version = callback_api_version
        self.domain = VoucherDomain(self.chain_id, channels_contract)
        self._signer = VoucherSigner(self._key, self.domain)
        self.budget = budget
        self.pay_every = pay_every
        self.pay_within = pay_within
        self._pay_timer: threading.Timer | None = None
        self.max_write_off = max_write_off
        self.notice_topic = control_topic(self.address, NOTICE)
        self.voucher_topic = control_topic(self.address, VOUCHER)

        self.on_message: MessageCallback | None = None
        self.on_payment: PaymentCallback | None = None
        self.on_disconnect: DisconnectCallback | None = None
        self.on_error: ErrorCallback | None = None
        self.on_integrity: IntegrityCallback | None = None

        self.verifier = message_verifier(
            self.chain_id,
            registry=registry,
            chain_reader=chain_reader,
            verifier=verifier,
            proof_sampling=proof_sampling,
            proof_attempts=proof_attempts,
            record_path=record_path,
            keyring=keyring,
        )
        self.keyring = keyring
        self.proof_sampling = float(proof_sampling)
        self.proof_attempts = proof_attempts
        self.record_path = None if record_path is None else os.fspath(record_path)
        self.proof_topic = control_topic(self.address, PROOF)
        self._verification = VerificationWorker(
            self, None if self.record_path is None else RecordFile(self.record_path)
        )
        self._integrity_events = 0

        self._lock = threading.Condition()
        self._quotes: dict[str, Quote] = {}
        self._books: dict[tuple[bytes, str], Book] = {}
        self._deposits: dict[bytes, int] = {}
        self._epoch = 0  # connections so far: the payment book's write-off rule needs it
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
        with self._lock:
            self._epoch += 1
        self._subscribe(self.notice_topic, 1, timeout)
        if self.proof_sampling > 0:
            self._subscribe(ANCHORS_TOPIC, 1, timeout)
        self._reconfirm()

    def _on_reconnected(self, session_present: bool) -> None:
        with self._lock:
            self._epoch += 1
        if not session_present:
            with self._lock:
                filters = [(self.notice_topic, 1), *self._filters.items()]
            if self.proof_sampling > 0:
                filters.append((ANCHORS_TOPIC, 1))
            for topic_filter, qos in filters:
                self._subscribe(topic_filter, qos, None)
        self._reconfirm()

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

    def _sum(self, channel_id: bytes, lane: str | None, field: str) -> int:
        """A book field on one lane of the channel, or summed over its lanes (lane None)."""
        with self._lock:
            if lane is not None:
                book = self._books.get((channel_id, lane))
                return 0 if book is None else int(getattr(book, field))
            return sum(int(getattr(b, field)) for b in self._lanes_of(channel_id))

    def received_value(self, channel_id: bytes, lane: str | None = None) -> int:
        """Value received on ``channel_id`` (cumulative, including a resumed baseline), on
        one ``lane`` (broker key) or over all lanes."""
        return self._sum(channel_id, lane, "received")

    def vouchered(self, channel_id: bytes, lane: str | None = None) -> int:
        """Cumulative amount of the latest voucher signed for ``channel_id`` on ``lane``, or
        the sum over its lanes."""
        return self._sum(channel_id, lane, "vouchered")

    def confirmed(self, channel_id: bytes, lane: str | None = None) -> int:
        """What the broker(s) confirmed with Receipts on ``channel_id`` (one lane or all)."""
        return self._sum(channel_id, lane, "confirmed")

    def wait_confirmed(
        self, channel_id: bytes, amount: int, timeout: float, lane: str | None = None
    ) -> bool:
        """Wait until at least ``amount`` is confirmed on ``channel_id`` (one lane or all)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self._sum(channel_id, lane, "confirmed") >= amount, timeout
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
                verified_messages=self._verification.verified_messages,
                integrity_events=self._integrity_events,
            )

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
        checked: Envelope | None = None  # a paid envelope whose signature was checked here
        with self._lock:
            self._messages += 1
            quote = self._quotes.get(topic)
            if quote is None or quote.price == 0:
                received = ReceivedMessage(
                    topic, payload, message.qos, bool(message.retain), False, 0, None
                )
            elif not (authentic := self._authentic(topic, payload))[0]:
                # A paid message whose envelope is not validly signed is never paid for: the
                # broker (which checks every envelope) delivered something it should not have.
                # The worker reports BAD_SIGNATURE; the dispute is capped by the broker's credit.
                self._unpaid_invalid += 1
                received = ReceivedMessage(
                    topic, payload, message.qos, bool(message.retain), False, 0, None
                )
            else:
                checked = authentic[1]
                self._paid_messages += 1
                lane = self._lane(quote.lane)
                book = self._book(quote.channel_id, lane)
                book.received += quote.price
                unpaid = book.received - book.vouchered
                if unpaid >= self._pay_threshold(quote):
                    self._pay(quote.channel_id, lane, book, book.received, events)
                elif unpaid > 0 and self.pay_within is not None and self._pay_timer is None:
                    self._arm_pay_timer(self.pay_within)
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
            self._verification.message_received(received, time.time(), checked)

    def _pay_threshold(self, quote: Quote) -> int:
        """Unpaid value on a lane that triggers a voucher: ``pay_every`` messages' worth, or
        (default) half the quoted credit, at least one message's."""
        if self.pay_every is not None:
            return self.pay_every * quote.price
        return max(quote.price, quote.credit // 2)

    def _arm_pay_timer(self, delay: float) -> None:
        """Pay what is unpaid ``delay`` seconds from now (caller holds the lock)."""
        timer = threading.Timer(delay, self._pay_due)
        timer.daemon = True
        timer.name = f"blendsm-pay-within-{self.client_id}"
        self._pay_timer = timer
        timer.start()

    def _pay_due(self) -> None:
        """``pay_within`` elapsed since an unpaid message arrived: voucher everything received."""
        with self._lock:
            self._pay_timer = None
        try:
            self.pay_outstanding()
        except BlendsmError as exc:
            self._report_error(exc)

    def _authentic(self, topic: str, payload: bytes) -> tuple[bool, Envelope | None]:
        """With verification on: is this a well-formed envelope signed by its device for this
        topic? (~100 us, on paho's thread, before paying; the chain checks follow on the
        worker.) With the envelope when it is, so the worker reuses it instead of decoding it
        and recovering its signer a second time. Always (True, None) without a verifier."""
        verifier = self.verifier
        if verifier is None:
            return True, None
        try:
            envelope = decode_envelope(payload)
            verify_envelope(verifier.domain, topic, envelope)
        except EnvelopeError:
            return False, None
        return True, envelope

    # --- integrity (delegated to the verification worker) ------------------------------

    def disconnect(self) -> None:
        """Send DISCONNECT, stop the network thread, then let the verification worker finish
        what was received (idempotent)."""
        with self._lock:
            timer, self._pay_timer = self._pay_timer, None
        if timer is not None:
            timer.cancel()
        super().disconnect()
        self._verification.stop()

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
