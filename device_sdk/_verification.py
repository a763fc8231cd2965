"""The Subscriber's verification worker: envelope and chain checks, decryption, and proofs.

Why a worker thread: checking a message asks the chain (is the device an active device of
the topic's seller?), which can take milliseconds or stall; paho's loop thread must not
wait for it, or delivery and payment would stall with it. So every received market message
is handed to one worker thread, in arrival order; payment stays on the loop thread (the
broker delivered the message, whatever it holds).

Proofs: with ``proof_sampling`` > 0 a sampled fraction of verified messages is kept
*pending*; after each anchor notice the worker asks the broker for their inclusion proofs
and checks them against the root read from the chain; a message still unproven after
``proof_attempts`` notices is reported ``PROOF_UNAVAILABLE``.
:meth:`VerificationWorker.request_proof` asks for one on demand.

The worker is composed into the :class:`~blendsm.device_sdk.Subscriber` (its *host*): it
owns the thread and the proof bookkeeping, and reads the settings the application may
change (``proof_sampling``, ``keyring``) and reports through the host's callbacks.
"""

from __future__ import annotations

import concurrent.futures
import queue
import random
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from blendsm.errors import BlendsmError, ConfigError

from ._control import AnchorNotice, Proof, ProofRequest, Refusal
from ._envelope import Envelope, MessageDomain
from ._integrity import IntegrityEvent, IntegrityKind, MessageVerifier, Verification
from ._keccak import checksum_address
from ._record_file import RecordFile
from ._subscriber_events import Decryptor, ReceivedMessage

__all__ = ["VerificationHost", "VerificationWorker", "message_verifier"]

_MAX_PENDING_PROOFS: Final = 10_000
_MAX_KNOWN_MESSAGES: Final = 65_536

_MessageKey = tuple[str, str, int]
"""(topic, device checksum address, sequence): how a message is named in proof requests."""


def message_verifier(
    chain_id: int,
    *,
    registry: str | bytes | None,
    chain_reader: Any,
    verifier: MessageVerifier | None,
    proof_sampling: float,
    proof_attempts: int,
    record_path: object,
    keyring: Decryptor | None,
) -> MessageVerifier | None:
    """The verifier a Subscriber of ``chain_id`` uses (None: verification off), from a
    ready ``verifier`` or from ``registry`` and ``chain_reader``; ConfigError when the
    verification settings do not fit together (checked before anything connects)."""
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
    if verifier is None and (proof_sampling > 0 or record_path is not None or keyring is not None):
        raise ConfigError(
            "proof_sampling, record_path and keyring need verification (registry and chain_reader)"
        )
    return verifier


class VerificationHost(Protocol):
    """What the worker needs from the Subscriber it serves (settings are read live: an
    application may change ``proof_sampling`` or set ``keyring`` after construction)."""

    verifier: MessageVerifier | None
    keyring: Decryptor | None
    proof_sampling: float
    proof_attempts: int
    broker: str
    client_id: str

    def _deliver(self, message: ReceivedMessage) -> None: ...

    def _report_integrity(self, events: Sequence[IntegrityEvent]) -> None: ...

    def _report_error(self, error: BlendsmError) -> None: ...

    def _send_proof_request(self, request: ProofRequest) -> bool: ...

    def _guard(self, fn: Any, *args: Any) -> None: ...


@dataclass(slots=True)
class _Pending:
    """A received message whose proof is wanted (sampled, or asked for on demand)."""

    topic: str
    envelope: Envelope
    notices_seen: int = 0
    request_id: str | None = None


@dataclass(slots=True)
class _ProofWait:
    key: _MessageKey
    topic: str
    envelope: Envelope
    future: concurrent.futures.Future[IntegrityEvent] | None  # None: an automatic sample


class VerificationWorker:
    """Checks received messages and their proofs on one thread, started on first use.

    The ``*_received``/``*_noticed``/``*_answered`` methods are called on paho's thread and
    only queue work; everything else they imply runs on the worker, in order.
    """

    def __init__(self, host: VerificationHost, record: RecordFile | None) -> None:
        self._host = host
        self._record = record
        self._random = random.Random()
        self._lock = threading.Lock()  # the state below, shared with request_proof
        self._pending: OrderedDict[_MessageKey, _Pending] = OrderedDict()
        self._known: OrderedDict[_MessageKey, tuple[str, Envelope]] = OrderedDict()
        self._requests: dict[str, _ProofWait] = {}
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._verified_messages = 0

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread while it runs (callbacks with verification on run there)."""
        with self._lock:
            return self._thread

    @property
    def verified_messages(self) -> int:
        """Messages whose signature and device checked out."""
        with self._lock:
            return self._verified_messages

    # --- from paho's thread --------------------------------------------------------------

    def message_received(
        self, message: ReceivedMessage, received_at: float, signed: Envelope | None = None
    ) -> None:
        """Verify (and decrypt) ``message`` on the worker, then deliver it to the host.
        ``signed``: its envelope, already decoded from ``message.payload`` and its signature
        checked for ``message.topic`` (the host does so before paying for it); the worker
        then does the chain checks only."""
        self.submit(lambda: self._verify_message(message, received_at, signed))

    def anchor_noticed(self, notice: AnchorNotice) -> None:
        """A batch was anchored: ask for the proofs of the pending sampled messages."""
        self.submit(lambda: self._request_samples(notice))

    def proof_answered(self, request_id: str, answer: Proof | Refusal) -> None:
        """The broker answered proof request ``request_id``: check the proof on the worker."""
        self.submit(lambda: self._on_proof(request_id, answer))

    # --- the thread ----------------------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker thread after what is queued (starting the thread)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name=f"blendsm-verify-{self._host.client_id}", daemon=True
                )
                self._thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._host._guard(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish what is queued, then end it and close the record file."""
        with self._lock:
            worker, self._thread = self._thread, None
        if worker is not None and worker is not threading.current_thread():
            self._jobs.put(None)
            worker.join(timeout)
        if self._record is not None:
            self._record.close()

    # --- messages ------------------------------------------------------------------------

    def _verify_message(
        self, message: ReceivedMessage, received_at: float, signed: Envelope | None
    ) -> None:
        host = self._host
        assert host.verifier is not None
        checked: Verification = host.verifier.check(message.topic, message.payload, signed)
        if checked.market is not False and self._record is not None:
            self._record.message(
                message.topic,
                message.payload,
                received_at,
                message.qos,
                message.retain,
                checked.verified,
            )
        envelope = checked.envelope
        if envelope is not None and checked.leaf is not None and checked.device is not None:
            key = (message.topic, checked.device, envelope.sequence)
            with self._lock:
                self._known[key] = (message.topic, envelope)
                self._known.move_to_end(key)
                while len(self._known) > _MAX_KNOWN_MESSAGES:
                    self._known.popitem(last=False)
                if host.proof_sampling > 0 and self._random.random() < host.proof_sampling:
                    self._pending[key] = _Pending(message.topic, envelope)
                    while len(self._pending) > _MAX_PENDING_PROOFS:
                        self._pending.popitem(last=False)
        if checked.verified:
            with self._lock:
                self._verified_messages += 1
        payload = checked.payload
        decrypted: bool | None = None
        keyring = host.keyring
        if envelope is not None and envelope.encrypted and keyring is not None:
            try:
                payload = keyring.decrypt(message.topic, envelope.payload)
                decrypted = True
            except BlendsmError as exc:  # no key for that epoch (right ended), or bad bytes
                decrypted = False
                host._report_error(exc)
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
        host._deliver(received)
        host._report_integrity(checked.events)
        if checked.error is not None:
            host._report_error(checked.error)

    # --- proofs --------------------------------------------------------------------------

    def _request_samples(self, notice: AnchorNotice) -> None:
        """After an anchor notice: ask for the proof of every pending sampled message; the
        ones asked ``proof_attempts`` times in vain are reported unavailable."""
        expired: list[IntegrityEvent] = []
        requests: list[ProofRequest] = []
        with self._lock:
            for key, pending in list(self._pending.items()):
                if pending.notices_seen >= self._host.proof_attempts:
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
            self._host._send_proof_request(request)
        self._host._report_integrity(expired)

    def _on_proof(self, request_id: str, answer: Proof | Refusal) -> None:
        """A proof or a ``proof_unavailable`` refusal arrived."""
        host = self._host
        with self._lock:
            wait = self._requests.pop(request_id, None)
        if wait is None:  # an answer to an expired or foreign request
            return
        assert host.verifier is not None
        if isinstance(answer, Proof):
            event = host.verifier.check_proof(host.broker, wait.topic, wait.envelope, answer)
            if event.kind is not IntegrityKind.PROOF_UNAVAILABLE and self._record is not None:
                self._record.proof(
                    wait.topic, wait.key[1], wait.key[2], host.broker, answer, str(event.kind)
                )
        else:
            event = IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE,
                wait.topic,
                wait.key[1],
                wait.key[2],
                f"{answer.code}: {answer.detail}",
            )
        with self._lock:
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
        host._report_integrity([event])

    def request_proof(
        self, topic: str, device: str, sequence: int, timeout: float
    ) -> IntegrityEvent:
        """Ask for the proof of a received message and wait for the verdict (the caller's
        thread; see :meth:`Subscriber.request_proof`)."""
        try:
            raw = bytes.fromhex(device.removeprefix("0x"))
        except ValueError:
            raw = b""
        if len(raw) != 20:
            raise ConfigError(f"device: not an address: {device!r}")
        with self._lock:
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
        with self._lock:
            self._requests[request_id] = _ProofWait(full_key, topic, envelope, future)
        request = ProofRequest(request_id, topic, sequence, envelope.device_address)
        if not self._host._send_proof_request(request):
            with self._lock:
                self._requests.pop(request_id, None)
            return IntegrityEvent(
                IntegrityKind.PROOF_UNAVAILABLE, topic, device, sequence, "request not sent"
            )
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
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
        with self._lock:
            return len(self._pending)
