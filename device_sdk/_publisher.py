"""The device-side publisher: signs every reading at the edge and delivers it at least once.

Every message is wrapped in a signed :class:`~blendsm.device_sdk.Envelope` (EIP-712
``Message`` over topic, device, sequence, timestamp, payload hash and flags, in the
deployment's :class:`MessageDomain`), so subscribers can verify it whatever the broker did.

Delivery (QoS 1 and 2) is store-and-forward through an on-disk outbox in ``state_dir``:

- :meth:`Publisher.publish` assigns the next sequence number of the topic, signs once, and
  inserts the final envelope into the outbox (SQLite WAL, fsync) before it returns; the
  broker need not be reachable;
- a sender thread hands queued envelopes to paho, oldest first, at most ``max_inflight``
  at a time, while connected; a message leaves the outbox only after its PUBACK (QoS 1) or
  PUBCOMP (QoS 2). paho resends what was in flight after a reconnect; after a restart of
  the device the sender resends whatever is still queued, byte for byte;
- so nothing is lost across a broker or device crash, and a message may arrive twice:
  subscribers dedupe by (device, topic, sequence), which the signature covers;
- the outbox is bounded (``max_pending`` messages, ``max_pending_bytes`` bytes); a full
  outbox refuses new messages with :class:`OutboxFullError` and never drops queued ones.

QoS 0 is fire-and-forget and bypasses the outbox: sent at once if connected, otherwise
:class:`BrokerConnectionError` (never a silent drop). It uses the same per-topic sequence,
so it can overtake QoS 1 messages still queued.

Reconnects: after a drop paho retries every second, and each retry first waits a random
time in ``[0, min(reconnect_max_delay, 0.5 s * 2**(attempt-1))]`` (exponential backoff with
full jitter, shared with the Subscriber in :mod:`._mqtt`), so a fleet of devices does not
reconnect in lockstep after a broker restart.

Acknowledgements: ``on_acknowledged(publisher, ack)`` (see :class:`PublisherCallbackAPI`) is
called on the sender thread once the broker acknowledged a QoS 1/2 message (PUBACK / PUBCOMP)
and it left the outbox, with its topic and sequence number. A message re-sent after a device
restart is acknowledged (and reported) by the Publisher that re-sent it.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, Unpack

import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount
from paho.mqtt.enums import MQTTErrorCode

from blendsm.errors import BrokerConnectionError, ConfigError, StoreError

from ._control import is_control_topic
from ._endpoint import BrokerEndpoint, EndpointArgs, resolve_endpoint
from ._envelope import FLAG_ENCRYPTED, Envelope, EnvelopeSigner, MessageDomain
from ._keys import account_from_env, account_from_keystore
from ._mqtt import ReconnectPolicy, _MqttClient, _reason_value
from ._outbox import OutboxMessage, SqliteOutbox
from ._publisher_events import AckCallback, Acknowledgement, PublisherCallbackAPI
from ._sequence import SEQUENCE_BLOCK, SequenceAllocator

if sys.platform != "win32":
    import fcntl

__all__ = ["Encryptor", "Publisher"]

_log = logging.getLogger("blendsm.device_sdk")

Encryptor = Callable[[str, bytes], bytes]
"""``(topic, plaintext) -> ciphertext``: applied before signing; sets ``FLAG_ENCRYPTED``."""

SEQUENCE_FILE: Final = "sequences.json"
OUTBOX_FILE: Final = "outbox.sqlite3"
LOCK_FILE: Final = "lock"
_MAX_TOPIC_BYTES: Final = 65535
_RECONNECT_BASE_DELAY: Final = 0.5
"""Upper bound of the first automatic retry's wait, doubled per failed attempt."""


def _check_topic(topic: Any) -> str:
    """Refuse at enqueue time what paho or the broker would refuse later (a bad topic in
    the outbox would block it)."""
    if not isinstance(topic, str) or not topic:
        raise ConfigError(f"topic: must be a non-empty str, got {topic!r}")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ConfigError(f"topic: {topic!r} has a wildcard or NUL (not allowed in PUBLISH)")
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        raise ConfigError("topic: longer than 65535 bytes")
    if is_control_topic(topic):
        raise ConfigError(f"topic: {topic!r} is in the reserved control tree")
    return topic


def _lock_state_dir(state_dir: Path) -> IO[str] | None:
    """An exclusive lock on ``state_dir`` for this Publisher's life: two publishers sharing
    one sequence file would hand out the same numbers. Released by the OS on a crash."""
    if sys.platform == "win32":  # pragma: no cover - gateways run Linux
        return None
    fh = (state_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(
            f"state_dir: {state_dir} is in use by another Publisher (one per device and dir)"
        ) from None
    return fh


class Publisher(_MqttClient):
    """A registered device: signs each message for the deployment ``(chain_id, registry)``
    and publishes it through the durable outbox in ``state_dir``; authenticates with CONNECT
    tokens bound to ``broker`` (the broker operator's address).

    Where to connect is ``endpoint`` (a :class:`BrokerEndpoint`), or, as before it existed,
    its fields as keyword arguments (``host=``, ``port=``, ``broker=``, ``chain_id=``,
    ``client_id=``, ``keepalive=``).

    ``state_dir`` holds the sequence state, the outbox and a lock file; it belongs to one
    device and one Publisher at a time (ConfigError otherwise). Use as a context manager
    (connect ... close) or call :meth:`connect`/:meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        registry: str | bytes,
        state_dir: str | os.PathLike[str],
        endpoint: BrokerEndpoint | None = None,
        clean_session: bool = True,
        encryptor: Encryptor | None = None,
        max_pending: int = 10_000,
        max_pending_bytes: int = 16 * 1024 * 1024,
        max_inflight: int = 20,
        sequence_block: int = SEQUENCE_BLOCK,
        reconnect_max_delay: float = 30.0,
        callback_api_version: PublisherCallbackAPI = PublisherCallbackAPI.VERSION1,
        **connection: Unpack[EndpointArgs],
    ) -> None:
        if callback_api_version is not PublisherCallbackAPI.VERSION1:
            raise ConfigError(
                f"callback_api_version: unsupported {callback_api_version!r} (VERSION1 only)"
            )
        super().__init__(
            account,
            resolve_endpoint(endpoint, connection, "Publisher"),
            clean_session=clean_session,
            reconnect=ReconnectPolicy(1, _RECONNECT_BASE_DELAY, reconnect_max_delay),
        )
        if encryptor is not None and not callable(encryptor):
            raise ConfigError("encryptor: must be a callable (topic, plaintext) -> ciphertext")
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ConfigError(f"max_inflight: must be a positive int, got {max_inflight!r}")
        self.domain: MessageDomain = MessageDomain(self.chain_id, registry)
        """The EIP-712 domain every message is signed in."""
        self._signer = EnvelopeSigner(self._key, self.domain)
        self.encryptor = encryptor
        self.max_inflight = max_inflight
        self.callback_api_version = callback_api_version
        self.on_acknowledged: AckCallback | None = None
        """``on_acknowledged(publisher, ack: Acknowledgement)``: see the module docstring."""
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.state_dir}: {exc}") from exc
        self._lockfile = _lock_state_dir(self.state_dir)
        try:
            self._sequences = SequenceAllocator(
                self.state_dir / SEQUENCE_FILE, self.address, block=sequence_block
            )
            self._outbox = SqliteOutbox(
                self.state_dir / OUTBOX_FILE,
                self.address,
                max_messages=max_pending,
                max_bytes=max_pending_bytes,
            )
        except BaseException:
            self._release_lock()
            raise

        self._publish_lock = threading.Lock()  # sequence order == outbox order
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()  # PUBACKed mids (paho thread)
        self._wake = threading.Event()  # something for the sender to do
        self._drained = threading.Condition()  # notified when messages leave the outbox
        self._handed: dict[int, OutboxMessage] = {}  # paho mid -> outbox row (sender only)
        self._cursor = 0  # highest row id handed to paho in this process (sender only)
        self._closed = False

        self._mqtt.max_inflight_messages_set(max_inflight)
        self._mqtt.on_publish = self._on_paho_publish
        self._sender = threading.Thread(
            target=self._sender_main, name=f"blendsm-outbox-{self.client_id}", daemon=True
        )
        self._sender.start()

    # --- construction from a key source ------------------------------------------------

    @classmethod
    def from_env(cls, variable: str, **kwargs: Any) -> Self:
        """A Publisher whose device key is the hex private key in ``$variable``."""
        return cls(account_from_env(variable), **kwargs)

    @classmethod
    def from_keystore(
        cls, path: str | os.PathLike[str], password_variable: str, **kwargs: Any
    ) -> Self:
        """A Publisher whose device key is in the encrypted keystore ``path`` (Web3 Secret
        Storage v3), decrypted with the password in ``$password_variable``."""
        return cls(account_from_keystore(path, password_variable), **kwargs)

    # --- signing -------------------------------------------------------------------------

    def seal(self, topic: str, payload: bytes) -> Envelope:
        """The signed envelope of the next message on ``topic`` (consumes a sequence number;
        encrypts first when an ``encryptor`` is set). :meth:`publish` calls this."""
        flags = 0
        if self.encryptor is not None:
            payload = bytes(self.encryptor(topic, payload))
            flags = FLAG_ENCRYPTED
        sequence = self._sequences.next(topic)
        return self._signer.sign(topic, payload, sequence, time.time_ns() // 1_000_000, flags)

    def encode_payload(self, topic: str, payload: bytes) -> bytes:
        """What goes on the wire for ``payload``: its signed envelope (see :meth:`seal`)."""
        return self.seal(topic, payload).encode()

    # --- publishing ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages in the outbox: queued or in flight, not yet acknowledged by the broker."""
        return self._outbox.count

    @property
    def pending_bytes(self) -> int:
        return self._outbox.size

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Sign ``payload`` for ``topic`` and publish it; its sequence number.

        QoS 1/2: queued durably in the outbox before returning (broker reachable or not),
        sent in order, removed after the broker's acknowledgement; :class:`OutboxFullError`
        when the outbox is at its bound. QoS 0: sent at once, or
        :class:`BrokerConnectionError` when not connected (fire-and-forget, no outbox).
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ConfigError(f"payload: must be bytes, got {type(payload).__name__}")
        _check_topic(topic)
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            raise ConfigError(f"qos: must be 0, 1 or 2, got {qos!r}")
        if self._closed:
            raise StoreError("publisher is closed")
        data = bytes(payload)
        with self._publish_lock:
            if qos == 0:
                if not self._mqtt.is_connected():
                    raise BrokerConnectionError(
                        f"not connected: QoS 0 message to {topic!r} dropped"
                    )
                envelope = self.seal(topic, data)
                self._publish(topic, envelope.encode(), 0, retain)
                return envelope.sequence
            envelope = self.seal(topic, data)
            self._outbox.put(topic, envelope.encode(), qos, retain, envelope.sequence)
        self._wake.set()
        return envelope.sequence

    def _put_sealed(self, topic: str, data: bytes, qos: int, retain: bool, sequence: int) -> None:
        """Queue an envelope sealed elsewhere (a :class:`MultiHomedPublisher`'s, signed once
        for every broker) exactly as :meth:`publish` queues its own."""
        if self._closed:
            raise StoreError("publisher is closed")
        self._outbox.put(topic, data, qos, retain, sequence)
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the outbox is empty (every queued message acknowledged);
        :class:`BrokerConnectionError` if messages remain after ``timeout`` seconds."""
        with self._drained:
            done = self._drained.wait_for(
                lambda: self._outbox.count == 0 or self._closed, max(timeout, 0)
            )
        if not done or self._outbox.count:
            raise BrokerConnectionError(
                f"{self.pending} messages still in the outbox after {timeout:g} s"
                f" ({'connected' if self.connected else 'not connected'})"
            )

    # --- connection ----------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for the CONNACK (see the base class); :class:`StoreError` once
        closed: its sender, outbox and sequence file are gone, so a connection would only
        keep a network thread reconnecting for nothing."""
        if self._closed:
            raise StoreError("publisher is closed")
        super().connect(timeout)

    def start(self) -> None:
        """Connect in the background and return at once: retries (with jittered backoff)
        until the broker answers, then reconnects after every drop. For a device that must
        queue readings while the broker is down at boot. A refusal (bad token, not a
        member) stops the retries; see the log. :class:`StoreError` once closed."""
        if self._closed:
            raise StoreError("publisher is closed")
        if self._mqtt.is_connected():
            return
        self._halt.clear()
        self._attempt = 0
        with self._cond:
            self._connack = None
            self._closing = None
            self._dropped = False
        self._mqtt.loop_stop()
        self._mqtt.connect_async(self.host, self.port, self.keepalive)
        self._mqtt.loop_start()

    def close(self) -> None:
        """Disconnect, stop the sender, persist exact sequence counters, close the outbox
        and release ``state_dir`` (idempotent). Unacknowledged messages stay queued on disk
        and are sent by the next Publisher on this ``state_dir``."""
        if self._closed:
            return
        self.disconnect()
        self._closed = True
        self._wake.set()
        self._sender.join(10)
        self._sequences.close()
        self._outbox.close()
        self._release_lock()
        with self._drained:
            self._drained.notify_all()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _release_lock(self) -> None:
        fh = getattr(self, "_lockfile", None)
        if fh is not None:
            fh.close()  # closing the descriptor drops the flock
            self._lockfile = None

    # --- sender thread -------------------------------------------------------------------

    def _sender_main(self) -> None:
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            closing = self._closed
            try:
                self._send_round(hand=not closing)
            except Exception:
                _log.exception("%s: outbox sender error", self.client_id)
                self._halt.wait(0.5)
            if closing:
                return

    def _send_round(self, *, hand: bool) -> None:
        acked: list[OutboxMessage] = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            row = self._handed.pop(mid, None)
            if row is not None:  # else a QoS 0 message's mid
                acked.append(row)
        if acked:
            self._outbox.delete([m.id for m in acked])
            with self._drained:
                self._drained.notify_all()
            self._report_acks(acked)
        if not hand or not self._mqtt.is_connected():
            return
        room = self.max_inflight - len(self._handed)
        if room <= 0:
            return
        for message in self._outbox.after(self._cursor, room):
            info = self._mqtt.publish(
                message.topic, message.data, qos=message.qos, retain=message.retain
            )
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                _log.warning(
                    "%s: cannot hand message %d to paho: %s",
                    self.client_id,
                    message.sequence,
                    mqtt.error_string(info.rc),
                )
                self._halt.wait(0.5)
                self._wake.set()
                return
            # With NO_CONN paho keeps a QoS>0 message and sends it on reconnect.
            self._handed[info.mid] = message
            self._cursor = message.id

    def _report_acks(self, acked: list[OutboxMessage]) -> None:
        callback = self.on_acknowledged
        if callback is None:
            return
        for message in acked:
            try:
                callback(self, Acknowledgement(message.topic, message.sequence, message.qos))
            except Exception:
                _log.exception("%s: error in on_acknowledged", self.client_id)

    # --- paho callbacks (loop thread) ----------------------------------------------------

    def _on_paho_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        # Never touch the disk or our locks here: paho holds its message lock.
        self._acks.put(mid)
        self._wake.set()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        super()._on_connect(client, userdata, flags, reason, props)
        if _reason_value(reason) == 0:
            self._wake.set()
