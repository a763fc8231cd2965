"""A device publishing one signed stream to several brokers at once (multi-homing).

Many brokers serve one marketplace (issue 14): a device whose topic is served by several
brokers sends every message to each of them, so a subscriber can fail over from one broker
to another and find the same stream there. The envelope is signed once: every broker gets
the same bytes with the same ``(device, topic, sequence)``, which is what lets a subscriber
that saw a message on two brokers keep it once and notice a gap.

Each broker has its own *leg*: a :class:`Publisher` with its own connection, CONNECT tokens
bound to that broker's operator, and its own durable outbox in ``state_dir/brokers/<name>``.
So a broker that is down or slow holds back only its own leg: the others keep sending, and
its backlog waits on disk (across a device restart too) until it is back.

What one broker down may cost, bounded: its leg's outbox is bounded like any Publisher's
(``max_pending`` messages, ``max_pending_bytes`` bytes). Once it is full, that broker misses
the newer messages (its subscribers see a gap in the sequence and can fail over); the miss
is counted per broker (:attr:`BrokerLeg.missed`), logged, and never blocks the other legs.
:meth:`MultiHomedPublisher.publish` refuses a message (:class:`OutboxFullError`, no sequence
number used) only when every leg's outbox is full.

Cost per extra broker: one more outbox insert (an fsync) per QoS 1/2 message and one more
connection; ``benchmarks/bench_multihome.py`` measures it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from eth_account.signers.local import LocalAccount

from blendsm.errors import BrokerConnectionError, ConfigError, OutboxFullError, StoreError

from ._endpoint import BrokerEndpoint
from ._envelope import ENVELOPE_HEADER_SIZE, FLAG_ENCRYPTED, EnvelopeSigner, MessageDomain
from ._outbox import SqliteOutbox
from ._publisher import SEQUENCE_FILE, Encryptor, Publisher, _check_topic, _lock_state_dir
from ._sequence import SEQUENCE_BLOCK, SequenceAllocator

__all__ = ["BrokerLeg", "MultiHomedPublisher"]

_log = logging.getLogger("blendsm.device_sdk")

LEGS_DIR: Final = "brokers"
_MISS_LOG_EVERY: Final = 60.0
"""At most one log line per leg per minute about messages it missed."""


def leg_name(endpoint: BrokerEndpoint) -> str:
    """The leg's directory name: stable across restarts for one broker address and port,
    and safe as a file name."""
    raw = f"{endpoint.host}_{endpoint.port}_{endpoint.broker[2:10].lower()}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


@dataclass(slots=True)
class BrokerLeg:
    """One broker of a :class:`MultiHomedPublisher`: its connection and outbox."""

    name: str
    endpoint: BrokerEndpoint
    publisher: Publisher
    missed: int = 0
    """Messages this broker never got because its outbox was full (it was down too long)."""
    _logged_at: float = 0.0

    @property
    def connected(self) -> bool:
        return self.publisher.connected

    @property
    def pending(self) -> int:
        """Messages waiting for this broker's acknowledgement."""
        return self.publisher.pending


class MultiHomedPublisher:
    """A registered device publishing every message, signed once, to each broker of
    ``endpoints`` (see the module docstring).

    ``state_dir`` holds the device's sequence state and lock, and one sub-directory per
    broker with that broker's outbox. ``max_pending``/``max_pending_bytes`` bound each
    broker's outbox; the other keyword arguments are those of :class:`Publisher`.
    """

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        registry: str | bytes,
        state_dir: str | os.PathLike[str],
        endpoints: Sequence[BrokerEndpoint],
        encryptor: Encryptor | None = None,
        sequence_block: int = SEQUENCE_BLOCK,
        **leg_options: Any,
    ) -> None:
        endpoints = list(endpoints)
        if not endpoints or not all(isinstance(e, BrokerEndpoint) for e in endpoints):
            raise ConfigError("endpoints: must be a non-empty list of BrokerEndpoint")
        names = [leg_name(e) for e in endpoints]
        if len(set(names)) != len(names):
            raise ConfigError("endpoints: the same broker is listed twice")
        if len({e.chain_id for e in endpoints}) != 1:
            raise ConfigError("endpoints: every broker must be on the same chain_id")
        if encryptor is not None and not callable(encryptor):
            raise ConfigError("encryptor: must be a callable (topic, plaintext) -> ciphertext")
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.state_dir}: {exc}") from exc
        self._lockfile = _lock_state_dir(self.state_dir)
        self.legs: list[BrokerLeg] = []
        """One per broker, in the order of ``endpoints``."""
        self._closed = False
        try:
            first = Publisher(
                account,
                registry=registry,
                state_dir=self.state_dir / LEGS_DIR / names[0],
                endpoint=endpoints[0],
                **leg_options,
            )
            self.legs.append(BrokerLeg(names[0], endpoints[0], first))
            for name, endpoint in zip(names[1:], endpoints[1:], strict=True):
                leg = Publisher(
                    account,
                    registry=registry,
                    state_dir=self.state_dir / LEGS_DIR / name,
                    endpoint=endpoint,
                    **leg_options,
                )
                self.legs.append(BrokerLeg(name, endpoint, leg))
            self.address: str = first.address
            self.domain: MessageDomain = first.domain
            self.encryptor = encryptor
            self._signer = EnvelopeSigner(first._key, self.domain)
            self._sequences = SequenceAllocator(
                self.state_dir / SEQUENCE_FILE, self.address, block=sequence_block
            )
        except BaseException:
            self._close_legs()
            self._release_lock()
            raise
        self._lock = threading.Lock()  # one sequence order for every leg

    # --- publishing ----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Sign ``payload`` once and hand it to every broker; its sequence number.

        QoS 1/2: queued durably in each broker's outbox before returning. A broker whose
        outbox is full misses it (counted in its leg's ``missed``); :class:`OutboxFullError`
        only when every outbox is full, and then no sequence number is used. QoS 0: sent to
        every connected broker at once, or :class:`BrokerConnectionError` if none is.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ConfigError(f"payload: must be bytes, got {type(payload).__name__}")
        _check_topic(topic)
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            raise ConfigError(f"qos: must be 0, 1 or 2, got {qos!r}")
        if self._closed:
            raise StoreError("publisher is closed")
        data = bytes(payload)
        flags = 0
        if self.encryptor is not None:
            data = bytes(self.encryptor(topic, data))
            flags = FLAG_ENCRYPTED
        with self._lock:
            if qos == 0:
                live = [leg for leg in self.legs if leg.connected]
                if not live:
                    raise BrokerConnectionError(
                        f"no broker connected: QoS 0 message to {topic!r} dropped"
                    )
                sequence, wire = self._seal(topic, data, flags)
                for leg in live:
                    leg.publisher._publish(topic, wire, 0, retain)
                return sequence
            size = len(topic.encode()) + ENVELOPE_HEADER_SIZE + len(data)  # what put() counts
            if not any(_has_room(leg.publisher._outbox, size) for leg in self.legs):
                full = self.legs[0].publisher._outbox
                raise OutboxFullError(full.count, full.size, full.max_messages, full.max_bytes)
            sequence, wire = self._seal(topic, data, flags)
            for leg in self.legs:
                try:
                    leg.publisher._put_sealed(topic, wire, qos, retain, sequence)
                except OutboxFullError:
                    self._missed(leg, topic, sequence)
            return sequence

    def _seal(self, topic: str, data: bytes, flags: int) -> tuple[int, bytes]:
        sequence = self._sequences.next(topic)
        envelope = self._signer.sign(topic, data, sequence, time.time_ns() // 1_000_000, flags)
        return sequence, envelope.encode()

    def _missed(self, leg: BrokerLeg, topic: str, sequence: int) -> None:
        leg.missed += 1
        now = time.monotonic()
        if now - leg._logged_at >= _MISS_LOG_EVERY:
            leg._logged_at = now
            _log.warning(
                "%s: outbox of broker %s is full (%d queued): it misses %r #%d"
                " (%d missed so far); the other brokers still get the stream",
                self.address,
                leg.name,
                leg.pending,
                topic,
                sequence,
                leg.missed,
            )

    # --- connection ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect every leg in the background (each retries on its own)."""
        for leg in self.legs:
            leg.publisher.start()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect every leg, waiting up to ``timeout`` for each; a leg that cannot connect
        keeps retrying in the background. :class:`BrokerConnectionError` if none connected."""
        errors: list[str] = []
        for leg in self.legs:
            try:
                leg.publisher.connect(timeout)
            except BrokerConnectionError as exc:
                errors.append(f"{leg.name}: {exc}")
                leg.publisher.start()
        if len(errors) == len(self.legs):
            raise BrokerConnectionError("no broker reachable: " + "; ".join(errors))

    @property
    def connected(self) -> bool:
        """Whether at least one broker is connected."""
        return any(leg.connected for leg in self.legs)

    @property
    def pending(self) -> dict[str, int]:
        """Messages waiting for each broker's acknowledgement, by leg name."""
        return {leg.name: leg.pending for leg in self.legs}

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every broker acknowledged every queued message;
        :class:`BrokerConnectionError` naming the brokers still behind after ``timeout``."""
        deadline = time.monotonic() + max(timeout, 0)
        behind: list[str] = []
        for leg in self.legs:
            try:
                leg.publisher.flush(max(deadline - time.monotonic(), 0))
            except BrokerConnectionError as exc:
                behind.append(f"{leg.name}: {exc}")
        if behind:
            raise BrokerConnectionError("; ".join(behind))

    def close(self) -> None:
        """Close every leg (their outboxes keep what is unacknowledged), persist the exact
        sequence counters and release ``state_dir``; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._close_legs()
            self._sequences.close()
        self._release_lock()

    def _close_legs(self) -> None:
        for leg in self.legs:
            leg.publisher.close()

    def _release_lock(self) -> None:
        fh = getattr(self, "_lockfile", None)
        if fh is not None:
            fh.close()
            self._lockfile = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _has_room(outbox: SqliteOutbox, size: int) -> bool:
    return outbox.count + 1 <= outbox.max_messages and outbox.size + size <= outbox.max_bytes
