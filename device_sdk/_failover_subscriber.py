"""A paying subscriber that fails over between the brokers serving its topics, and asks the
next broker for what it missed.

Why: every serving broker receives every envelope (``MultiHomedPublisher``), so when the
buyer's broker dies another one holds the same stream. This wraps one
:class:`~blendsm.device_sdk.Subscriber` per broker endpoint (its books, its channel, its
integrity checks and proofs all stay per broker) and keeps one of them connected:

* **Policy.** Endpoints are tried in the configured order (:meth:`FailoverSubscriber.from_chain`
  documents the order read from the ``Brokers`` contract); on the loss of the broker in use
  the next ones are tried, wrapping around, each with ``connect_timeout``; the first that
  accepts is subscribed to every filter and sent a resume request per topic. No on-chain
  transaction happens at failover: the buyer holds a funded channel with every serving
  operator in advance (each member pays on the channel its broker quotes).
* **Resume.** Per topic seen, the request names each device and the highest sequence ``s``
  such that everything from the first one seen up to ``s`` arrived (:mod:`._resume`); the
  broker replays the newer envelopes it holds as paid deliveries and answers with the ranges
  it could not serve, reported as gaps (``source="broker"``). At most :data:`MAX_RESUMES`
  requests per failover (the broker's per-session control bound), most recent topics first.
* **De-duplication before value.** Every market envelope is checked against a per
  (device, topic) window (:mod:`._sequence_window`) *before* the member counts its value or
  the application sees it: a repeat is dropped, never paid for. With a verifier, the
  signature is checked here first (a forgery must not shadow the real envelope), so a paid
  message is verified twice on paho's thread (~100 us each). A repeat the new broker did
  deliver and charge (an envelope admitted there just before the SUBSCRIBE and broadcast just
  after it, or a re-request of one seen above a hole) stays unpaid on that channel: the
  broker's credit gate lets at most ``payments.credit_messages`` of them be outstanding, and
  a payment request after that is answered up to the member's write-off (``max_write_off``,
  default the broker's credit) per connection. That is the bound of what a buyer may pay
  for a duplicate: one credit window per failover.
* **Gaps.** A sequence that leaves the window unseen, or that the broker says it cannot
  serve, is reported once to ``on_gap`` as ``(device, topic, first_missing, last_missing)``.
* **Lanes.** Members are per endpoint; two brokers of one operator would today share one
  channel with two voucher counters, so give brokers of *different* operators until lanes
  (a ``lane`` per broker endpoint on the voucher) land: :meth:`_member` is the one place a
  lane would be assigned.

Threads: members run on their paho threads; a failover thread waits for a loss and does the
switch (paho's callbacks must not connect or subscribe). The application's callbacks run on
the delivering member's thread (or its verification worker): keep them short.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount

from blendsm.errors import BlendsmError, ConfigError, EnvelopeError, WireError

from ._control import ANCHORS_TOPIC, RESUME, control_topic
from ._endpoint import BrokerEndpoint
from ._envelope import decode_envelope
from ._integrity import IntegrityEvent
from ._mqtt import Disconnection
from ._resume import (
    MAX_RESUME_DEVICES,
    Resumed,
    ResumeRequest,
    decode_resumed,
    encode_resume_request,
    is_resumed_payload,
)
from ._sequence_window import DEFAULT_WIDTH, SequenceWindows
from ._subscriber import Subscriber
from ._subscriber_events import PaymentEvent, ReceivedMessage

if TYPE_CHECKING:
    from blendsm.contracts import Deployment

__all__ = [
    "FailoverCallbackAPI",
    "FailoverEvent",
    "FailoverStats",
    "FailoverSubscriber",
    "Gap",
]

_log = logging.getLogger("blendsm.device_sdk")

MAX_ENDPOINTS: Final = 64
"""Most endpoints one FailoverSubscriber takes."""
MAX_RESUMES: Final = 16
"""Most resume requests sent per failover: the broker processes at most 16 control messages of
one session at a time and drops the excess (a flood), so the topics most recently seen go
first and the others are left to gap reports."""
_WAKE_SECONDS: Final = 0.5
"""The failover thread's idle wait (it wakes at once on a loss)."""


class FailoverCallbackAPI(enum.IntEnum):
    """Signatures of the FailoverSubscriber's callbacks (versioned as the Subscriber's).

    VERSION1::

        on_message(fsub, message: ReceivedMessage, broker: BrokerEndpoint)  # first copies only
        on_gap(fsub, gap: Gap)
        on_failover(fsub, event: FailoverEvent)
        on_resumed(fsub, notice: Resumed, broker: BrokerEndpoint)
        on_payment(fsub, event: PaymentEvent, broker: BrokerEndpoint)
        on_integrity(fsub, event: IntegrityEvent, broker: BrokerEndpoint)
        on_error(fsub, error: BlendsmError)
    """

    VERSION1 = 1


@dataclass(frozen=True, slots=True)
class Gap:
    """Sequences ``first_missing``..``last_missing`` of ``device`` on ``topic`` will not be
    delivered: they left the de-duplication window unseen (``source="window"``) or the broker
    that resumed the stream could not serve them (``source="broker"``)."""

    device: str
    topic: str
    first_missing: int
    last_missing: int
    source: str = "window"


@dataclass(frozen=True, slots=True)
class FailoverEvent:
    """The connection to ``lost`` ended; ``to`` took over after ``seconds`` (None: no
    endpoint accepted yet, the next round follows)."""

    lost: BrokerEndpoint | None
    to: BrokerEndpoint | None
    seconds: float
    reason: str


@dataclass(frozen=True, slots=True)
class FailoverStats:
    """Counters since the FailoverSubscriber was made."""

    delivered: int
    duplicates_dropped: int
    gaps: int
    failovers: int
    resumes_sent: int
    replayed: int
    """Envelopes the brokers said they served from their replay rings."""


class _Member(Subscriber):
    """One broker's Subscriber, de-duplicating through its owner before counting value."""

    def __init__(self, owner: FailoverSubscriber, account: Any, **options: Any) -> None:
        super().__init__(account, **options)
        self._owner = owner

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if (
            topic != self.notice_topic
            and topic != ANCHORS_TOPIC
            and not self._owner._first_copy(self, topic, bytes(message.payload))
        ):
            return  # a repeat: not counted, not paid for, not shown
        super()._on_message(message)

    def _on_notice(self, payload: bytes) -> None:
        if is_resumed_payload(payload):
            try:
                notice = decode_resumed(payload)
            except WireError:
                pass  # the Subscriber's decoder counts and reports it
            else:
                self._owner._on_resumed(self, notice)
                return
        super()._on_notice(payload)

    def halt(self) -> None:
        """Stop this member's network thread and its reconnect attempts (it keeps its books
        and verification worker for a later connect)."""
        self._halt.set()
        self._stop()


class FailoverSubscriber:
    """A :class:`Subscriber` over several brokers with failover, replay and de-duplication
    (see the module doc). ``endpoints``: the brokers in failover order; ``options`` go to
    every member :class:`Subscriber` (``channels_contract``, ``budget`` per member,
    ``pay_every``, ``registry``/``chain_reader`` for integrity, ``proof_sampling``...).
    ``window`` sequences are remembered per (device, topic) for at most ``max_pairs`` pairs.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        endpoints: Sequence[BrokerEndpoint],
        *,
        channels_contract: str | bytes,
        connect_timeout: float = 2.0,
        window: int = DEFAULT_WIDTH,
        max_pairs: int = 10_000,
        callback_api_version: FailoverCallbackAPI = FailoverCallbackAPI.VERSION1,
        **options: Any,
    ) -> None:
        if callback_api_version is not FailoverCallbackAPI.VERSION1:
            raise ConfigError(f"callback_api_version: unsupported {callback_api_version!r}")
        if not endpoints or len(endpoints) > MAX_ENDPOINTS:
            raise ConfigError(f"endpoints: give 1 to {MAX_ENDPOINTS} broker endpoints")
        if not 64 <= window <= 65536:
            raise ConfigError(f"window: must be 64 to 65536 sequences, got {window!r}")
        if not 0.1 <= connect_timeout <= 60:
            raise ConfigError(f"connect_timeout: must be 0.1 to 60 s, got {connect_timeout!r}")
        if "endpoint" in options or "clean_session" in options:
            raise ConfigError("endpoint/clean_session: set per FailoverSubscriber, not per member")
        self.callback_api_version = callback_api_version
        self.endpoints: tuple[BrokerEndpoint, ...] = tuple(endpoints)
        self.connect_timeout = float(connect_timeout)
        self._account = account
        self._options = {"channels_contract": channels_contract, **options}
        self._members: dict[int, _Member] = {}
        self._active: _Member | None = None
        self._active_index = -1
        self._lock = threading.Lock()
        self._windows = SequenceWindows(window, max_pairs)
        self._filters: dict[str, int] = {}
        self._lost = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._delivered = self._duplicates = self._gaps = self._failovers = 0
        self._resumes = self._replayed = 0

        self.on_message: Callable[[FailoverSubscriber, ReceivedMessage, BrokerEndpoint], None]
        self.on_message = _ignore
        self.on_gap: Callable[[FailoverSubscriber, Gap], None] = _ignore
        self.on_failover: Callable[[FailoverSubscriber, FailoverEvent], None] = _ignore
        self.on_resumed: Callable[[FailoverSubscriber, Resumed, BrokerEndpoint], None]
        self.on_resumed = _ignore
        self.on_payment: Callable[[FailoverSubscriber, PaymentEvent, BrokerEndpoint], None]
        self.on_payment = _ignore
        self.on_integrity: Callable[[FailoverSubscriber, IntegrityEvent, BrokerEndpoint], None]
        self.on_integrity = _ignore
        self.on_error: Callable[[FailoverSubscriber, BlendsmError], None] = _ignore

    @classmethod
    def from_chain(
        cls,
        account: LocalAccount | bytes,
        *,
        endpoint_url: str,
        deployment: Deployment | str | os.PathLike[str],
        topic_id: bytes,
        channels_contract: str | bytes,
        **options: Any,
    ) -> FailoverSubscriber:
        """Endpoints of the brokers serving ``topic_id``, read from the ``Brokers`` contract
        in the order documented in :mod:`._broker_discovery` (the seller's operator order,
        then each operator's brokers in registration order). ConfigError when none serves."""
        from ._broker_discovery import serving_endpoints

        endpoints = serving_endpoints(endpoint_url, deployment, topic_id)
        if not endpoints:
            raise ConfigError(f"no active broker serves topic 0x{topic_id.hex()}")
        return cls(account, endpoints, channels_contract=channels_contract, **options)

    # --- public -----------------------------------------------------------------------

    @property
    def active(self) -> BrokerEndpoint | None:
        """The endpoint in use, None while none is connected."""
        member = self._active
        return None if member is None else member.endpoint

    def member(self, endpoint: BrokerEndpoint) -> Subscriber | None:
        """The Subscriber of ``endpoint`` if it was ever used (for its books and stats)."""
        for index, member in self._members.items():
            if self.endpoints[index] == endpoint:
                return member
        return None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the first endpoint that accepts (in order) and start watching it.
        Raises the last endpoint's error if none accepts within ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        error: BlendsmError | None = None
        for index in range(len(self.endpoints)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._use(index, min(self.connect_timeout, left))
            except BlendsmError as exc:
                error = exc
                continue
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="blendsm-failover", daemon=True
                )
                self._thread.start()
            return
        raise error or BlendsmError("no broker endpoint accepted within the timeout")

    def subscribe(self, topic_filter: str, qos: int = 0, timeout: float = 10.0) -> int:
        """Subscribe on the broker in use, and on every broker failed over to later."""
        with self._lock:
            self._filters[topic_filter] = qos
            member = self._active
        if member is None:
            raise BlendsmError("not connected")
        return member.subscribe(topic_filter, qos, timeout)

    def disconnect(self) -> None:
        """Stop failing over and disconnect every member (idempotent)."""
        self._closed.set()
        self._lost.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.connect_timeout * len(self.endpoints) + 5)
        for member in list(self._members.values()):
            member.disconnect()
        self._active = None

    def settle_up(self, timeout: float = 10.0) -> int:
        """Send the brokers this subscriber left the vouchers they never confirmed, and wait
        (up to ``timeout`` s each) for their Receipts. Why: a broker killed just after a
        voucher was sent may not have stored it; when it is back (from its data directory)
        it can still claim what it delivered, but only once it holds the voucher. Each such
        member connects (it re-sends its latest voucher on connect), waits, and is halted
        again; it never subscribes. Returns how many brokers still hold an unconfirmed
        voucher (down, or not answering): call again later, before the channel closes."""
        with self._lock:
            active = self._active
            members = [m for m in self._members.values() if m is not active]
        owing = 0
        for member in members:
            due = member.unconfirmed()
            if not due:
                continue
            try:
                member.connect(min(timeout, self.connect_timeout * 5))
                for (channel_id, lane), amount in due.items():
                    member.wait_confirmed(channel_id, amount, timeout, lane)
            except BlendsmError as exc:
                _log.info("settle-up with %s:%d failed: %s", member.host, member.port, exc)
            finally:
                member.halt()
            owing += bool(member.unconfirmed())
        return owing

    def missing(self, device: str, topic: str) -> list[int]:
        """Sequences of ``device`` on ``topic`` inside the window not received yet."""
        with self._lock:
            window = self._windows.window(device.lower(), topic)
            return [] if window is None else window.missing()

    @property
    def stats(self) -> FailoverStats:
        with self._lock:
            return FailoverStats(
                self._delivered,
                self._duplicates,
                self._gaps,
                self._failovers,
                self._resumes,
                self._replayed,
            )

    # --- members ------------------------------------------------------------------------

    def _member(self, index: int) -> _Member:
        member = self._members.get(index)
        if member is None:
            endpoint = self.endpoints[index]
            member = _Member(self, self._account, endpoint=endpoint, **self._options)
            member.on_message = lambda _s, m: self._deliver(m, endpoint)
            member.on_payment = lambda _s, e: self._guard(self.on_payment, self, e, endpoint)
            member.on_integrity = lambda _s, e: self._guard(self.on_integrity, self, e, endpoint)
            member.on_error = lambda _s, e: self._guard(self.on_error, self, e)
            member.on_disconnect = lambda s, d: self._member_lost(s, d)
            self._members[index] = member
        return member

    def _use(self, index: int, timeout: float) -> _Member:
        """Connect the member of ``index``, subscribe it to every filter, send the resume
        requests; it becomes the active one."""
        member = self._member(index)
        member.connect(timeout)
        try:
            with self._lock:
                filters = list(self._filters.items())
            for topic_filter, qos in filters:
                member.subscribe(topic_filter, qos, timeout)
        except BaseException:
            member.halt()
            raise
        with self._lock:
            self._active, self._active_index = member, index
        self._send_resumes(member)
        return member

    def _member_lost(self, member: Subscriber, disconnection: Disconnection) -> None:
        if member is self._active and not disconnection.requested and not self._closed.is_set():
            self._lost.set()

    def _watch(self) -> None:
        """The failover thread: on a loss, switch to the next endpoint that accepts."""
        while not self._closed.is_set():
            if not self._lost.wait(_WAKE_SECONDS):
                continue
            self._lost.clear()
            if self._closed.is_set():
                return
            self._fail_over()

    def _fail_over(self) -> None:
        started = time.monotonic()
        old, old_index = self._active, self._active_index
        if old is not None:
            old.halt()
        with self._lock:
            self._active = None
        count = len(self.endpoints)
        order = [(old_index + step) % count for step in range(1, count + 1)]
        reason = "connection lost"
        for index in order:
            if self._closed.is_set():
                return
            try:
                member = self._use(index, self.connect_timeout)
            except BlendsmError as exc:
                reason = f"{self.endpoints[index].host}:{self.endpoints[index].port}: {exc}"
                continue
            with self._lock:
                self._failovers += 1
            event = FailoverEvent(
                old.endpoint if old else None,
                member.endpoint,
                time.monotonic() - started,
                "connection lost",
            )
            _log.info("failed over to %s:%d in %.2f s", member.host, member.port, event.seconds)
            self._guard(self.on_failover, self, event)
            return
        event = FailoverEvent(
            old.endpoint if old else None, None, time.monotonic() - started, reason
        )
        self._guard(self.on_failover, self, event)
        self._lost.set()  # nobody accepted: the next round right away (each try is bounded)
        self._closed.wait(_WAKE_SECONDS)

    def _send_resumes(self, member: _Member) -> None:
        """Per topic with devices seen: resume after the contiguous high-water marks."""
        with self._lock:
            topics = list(dict.fromkeys(t for (_, t) in reversed(self._windows._pairs)))
            points = {topic: self._windows.resume_points(topic) for topic in topics}
        leaf = control_topic(member.address, RESUME)
        requests: list[ResumeRequest] = []
        for topic, after in points.items():  # most recently seen first
            devices = sorted(after.items())
            for start in range(0, len(devices), MAX_RESUME_DEVICES):
                chunk = dict(devices[start : start + MAX_RESUME_DEVICES])
                requests.append(ResumeRequest(f"r{next(self._ids)}", topic, chunk))
        if len(requests) > MAX_RESUMES:
            _log.warning(
                "%d resume requests due, %d sent (the rest: reported as gaps)",
                len(requests),
                MAX_RESUMES,
            )
        for request in requests[:MAX_RESUMES]:
            member._publish(leaf, encode_resume_request(request), 0, False)
            with self._lock:
                self._resumes += 1

    # --- messages (members' threads) ------------------------------------------------------

    def _first_copy(self, member: _Member, topic: str, payload: bytes) -> bool:
        """Whether this market envelope is the first copy (then it is remembered). Anything
        that is not a validly signed envelope passes (the member does not pay for it)."""
        try:
            envelope = decode_envelope(payload)
        except EnvelopeError:
            return True
        if member.verifier is not None and not member._authentic(topic, payload)[0]:
            return True  # a forgery must not shadow the real envelope: not remembered
        device = envelope.device_address.lower()
        with self._lock:
            first, runs = self._windows.accept(device, topic, envelope.sequence)
            if not first:
                self._duplicates += 1
            self._gaps += len(runs)
        for low, high in runs:
            self._guard(self.on_gap, self, Gap(device, topic, low, high))
        return first

    def _deliver(self, message: ReceivedMessage, endpoint: BrokerEndpoint) -> None:
        with self._lock:
            self._delivered += 1
        self._guard(self.on_message, self, message, endpoint)

    def _on_resumed(self, member: _Member, notice: Resumed) -> None:
        with self._lock:
            self._replayed += notice.served
            self._gaps += len(notice.unserved)
        for item in notice.unserved:
            gap = Gap(item.device.lower(), notice.topic, item.first, item.last, "broker")
            self._guard(self.on_gap, self, gap)
        self._guard(self.on_resumed, self, notice, member.endpoint)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            _log.exception("FailoverSubscriber callback %s raised", getattr(fn, "__name__", fn))


def _ignore(*_args: Any) -> None:
    """The default of every callback."""
