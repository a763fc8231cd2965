"""Shared paho-mqtt plumbing of the Publisher and the Subscriber.

What paho does not do for us, and a BlendSM client needs:

- a fresh CONNECT token per connection attempt: tokens are single-use (the broker refuses
  a replayed nonce), so the password is set in ``on_pre_connect``, which paho calls before
  every CONNECT, including its own automatic reconnects;
- TCP_NODELAY on the socket (paho leaves Nagle on: the first messages took 5-36 ms);
- capped, jittered reconnects: paho's own backoff doubles from 1 s to 120 s without jitter,
  so a fleet reconnects in lockstep and stays away long after a broker restart. paho is told
  to wait ``reconnect_floor`` seconds (fixed), and before each automatic retry we wait a
  random time in ``[0, min(reconnect_max_delay, reconnect_base_delay * 2**(attempt-1))]``
  (:func:`blendsm.backoff_delay`, full jitter); a successful CONNECT starts over;
- a blocking ``connect`` and ``subscribe`` that raise errors from the BlendSM tree
  (:class:`BrokerRefusedError`, :class:`SubscriptionRefusedError`) instead of return codes;
- no dead network thread: exceptions from our callbacks are logged, never raised into paho
  (paho re-raises them and its loop thread dies);
- no socket left open by a failed connection set-up (:mod:`._paho_sockets`), and a
  ``connect`` that works again after one failed (paho kept the connection marked as opening
  and refused the next attempt with a RuntimeError).

paho runs with the threaded interface (``loop_start``): callbacks run on its loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from blendsm import Jitter, backoff_delay
from blendsm.errors import (
    BrokerConnectionError,
    BrokerRefusedError,
    ConfigError,
    SubscriptionRefusedError,
)

from ._connect_token import ConnectTokenSigner
from ._ecdsa import private_key_bytes
from ._endpoint import BrokerEndpoint
from ._paho_sockets import SocketClosingClient

__all__ = ["Disconnection", "ReconnectPolicy", "default_client_id", "private_key_bytes"]

_log = logging.getLogger("blendsm.device_sdk")

# paho's VERSION2 callbacks turn MQTT 3.1.1 CONNACK codes into MQTT 5 reason codes; map back.
_CONNACK_V3: Final = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
_CONNACK_NAMES: Final = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
_SERVER_UNAVAILABLE: Final = 3
_SUBACK_FAILURE: Final = 0x80


def default_client_id(address: str) -> str:
    """``bsm-<8 hex of the address>-<8 random hex>``: 21 characters, within the 23 that
    MQTT 3.1.1 brokers must accept, and distinct per process so two clients of one
    account do not take over each other's session."""
    return f"bsm-{address[2:10].lower()}-{secrets.token_hex(4)}"


def _set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # a websocket or proxy wrapper without the option
        _log.debug("could not set TCP_NODELAY on %r", sock)


def _reason_value(reason: Any) -> int:
    return int(getattr(reason, "value", reason))


@dataclass(frozen=True, slots=True)
class Disconnection:
    """Why the connection ended: ``requested`` by our own ``disconnect()`` or not; ``reason``
    in words; ``reconnecting`` when paho will retry on its own (with a fresh token)."""

    requested: bool
    reason: str
    reconnecting: bool


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a client retries after its connection drops (see the module docstring): paho waits
    ``floor`` seconds (a whole number: paho's own fixed delay), then we wait a random time in
    ``[0, min(max_delay, base_delay * 2**(attempt-1))]``."""

    floor: int
    base_delay: float
    max_delay: float

    def __post_init__(self) -> None:
        delay = self.max_delay
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay < 1e9:
            raise ConfigError(
                f"reconnect_max_delay: must be a number of seconds >= 0, got {delay!r}"
            )


DEVICE_RECONNECT: Final = ReconnectPolicy(1, 0.5, 30.0)
"""The Publisher's default, and that of the other long-lived clients (topic key services)."""


class _MqttClient:
    """A paho client connected as one BlendSM participant; base of Publisher and Subscriber."""

    def __init__(
        self,
        account: LocalAccount | bytes,
        endpoint: BrokerEndpoint,
        *,
        clean_session: bool = True,
        reconnect: ReconnectPolicy = DEVICE_RECONNECT,
    ) -> None:
        key = private_key_bytes(account)
        self._token_signer = ConnectTokenSigner(key, endpoint.chain_id, endpoint.broker)
        self._key = key
        self.endpoint = endpoint
        """Where and to which broker operator this client connects."""
        self.address: str = self._token_signer.address
        """Checksum address of this participant (the MQTT user name)."""
        self.broker: str = self._token_signer.broker
        """Checksum address of the broker operator the CONNECT tokens are bound to."""
        self.chain_id: int = self._token_signer.chain_id
        self.client_id: str = endpoint.client_id or default_client_id(self.address)
        self.host = endpoint.host
        self.port = endpoint.port
        self.keepalive = endpoint.keepalive
        self.clean_session = clean_session

        self._cond = threading.Condition()
        self._connack: int | None = None  # v3 CONNACK code of the attempt being waited for
        self._closing: str | None = None  # why we are ending the connection, if we are
        self._dropped = False  # the connection ended while connect() waited for the CONNACK
        self._subacks: dict[int, list[int]] = {}  # SUBACK codes by mid, until taken
        self._untracked: dict[int, str] = {}  # filters by mid that nobody waits for
        self.tokens_issued = 0
        """CONNECT tokens made so far (one per connection attempt)."""
        self.reconnect_max_delay = float(reconnect.max_delay)
        self._reconnect = reconnect
        self._halt = threading.Event()  # disconnect requested: cut reconnect waits short
        self._attempt = 0  # connection attempts since connect()/start() (0: the first)

        c = SocketClosingClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            transport=endpoint.transport,  # type: ignore[arg-type]
        )
        if endpoint.transport == "websockets":
            c.ws_set_options(path=endpoint.ws_path)
        if endpoint.tls is not None:
            c.tls_set_context(endpoint.tls.context())
        c.on_pre_connect = self._on_pre_connect
        c.on_socket_open = _set_nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_paho_message
        c.reconnect_delay_set(
            reconnect.floor, reconnect.floor
        )  # the growing, jittered part is ours
        self._mqtt: mqtt.Client = c

    # --- public ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._mqtt.is_connected()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for the CONNACK (and whatever the subclass needs at connect).

        Raises :class:`BrokerRefusedError` if the broker refuses, :class:`BrokerConnectionError`
        if it cannot be reached or does not answer within ``timeout`` seconds. After a
        success paho reconnects by itself when the connection drops, each time with a new token.
        """
        if self._mqtt.is_connected():
            return
        self._halt.clear()
        self._attempt = 0
        deadline = time.monotonic() + timeout
        self._mqtt.loop_stop()  # a network thread still retrying would race this attempt
        # paho marks the connection as opening before it opens the socket, and keeps the mark
        # when that fails (refused, a TLS or WebSocket handshake; this call's or start()'s
        # retries): it then refused the timeout below with its own RuntimeError, and the
        # client could never connect again. With no socket, disconnect() only clears the
        # mark. An attempt still waiting for its CONNACK is closed here, as requested, and
        # before this attempt's state is set: its closing is not this attempt's.
        with self._cond:
            self._closing = "requested"
        self._mqtt.disconnect()
        with self._cond:
            self._connack = None
            self._closing = None
            self._dropped = False
        with contextlib.suppress(RuntimeError):  # a socket paho still holds: it closes it
            self._mqtt.connect_timeout = max(timeout, 0.1)
        try:
            self._mqtt.connect(self.host, self.port, self.keepalive)
        except OSError as exc:
            raise BrokerConnectionError(
                f"cannot reach the broker at {self.host}:{self.port}: {exc}"
            ) from exc
        self._mqtt.loop_start()
        with self._cond:
            got = self._cond.wait_for(
                lambda: self._connack is not None or self._dropped,
                max(deadline - time.monotonic(), 0),
            )
            code = self._connack
        if code is None:
            self._stop()
            why = "closed the connection" if got else f"did not answer within {timeout:g} s"
            raise BrokerConnectionError(
                f"broker at {self.host}:{self.port} {why} before any CONNACK"
            )
        if code != 0:
            self._stop()
            raise BrokerRefusedError(code, _CONNACK_NAMES.get(code, "unknown code"))
        try:
            self._after_connect(max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self._stop()
            raise

    def disconnect(self) -> None:
        """Send DISCONNECT and stop the network thread (idempotent)."""
        self._halt.set()
        self._stop()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()

    # --- for subclasses ----------------------------------------------------------------

    def _after_connect(self, timeout: float) -> None:
        """Called once connected by ``connect()`` (caller's thread), e.g. to subscribe."""

    def _on_reconnected(self, session_present: bool) -> None:
        """Called on paho's thread after an automatic reconnect was accepted."""

    def _on_lost(self, disconnection: Disconnection) -> None:
        """Called on paho's thread when the connection ends."""

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        """Called on paho's thread for every PUBLISH received."""

    def _on_suback_untracked(self, topic_filter: str, codes: list[int]) -> None:
        """SUBACK of a subscription nobody waits for (made with ``wait=False``)."""

    def _subscribe(self, topic_filter: str, qos: int, timeout: float | None) -> int:
        """SUBSCRIBE; with a ``timeout``, wait for the SUBACK and return the granted QoS
        (SubscriptionRefusedError on 0x80); without, return at once (the result goes to
        ``_on_suback_untracked``)."""
        if qos not in (0, 1, 2):
            raise ConfigError(f"qos: must be 0, 1 or 2, got {qos!r}")
        try:
            rc, mid = self._mqtt.subscribe(topic_filter, qos)
        except ValueError as exc:  # paho refuses empty or malformed filters itself
            raise ConfigError(f"topic_filter: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerConnectionError(
                f"cannot subscribe to {topic_filter!r}: {mqtt.error_string(rc)}"
            )
        if timeout is None:
            with self._cond:
                codes = self._subacks.pop(mid, None)
                if codes is None:
                    self._untracked[mid] = topic_filter
            if codes is not None:
                self._on_suback_untracked(topic_filter, codes)
            return qos
        with self._cond:
            got = self._cond.wait_for(lambda: mid in self._subacks, timeout)
            codes = self._subacks.pop(mid, None)
            if not got:
                self._untracked[mid] = topic_filter  # a late SUBACK is dropped, not leaked
        if codes is None:
            raise BrokerConnectionError(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
        if not codes or codes[0] >= _SUBACK_FAILURE:
            raise SubscriptionRefusedError(topic_filter)
        return codes[0]

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> mqtt.MQTTMessageInfo:
        """paho publish, with errors from our tree: a QoS 0 message while disconnected is
        lost, so that raises; QoS 1/2 messages are queued by paho and sent on reconnect."""
        info = self._mqtt.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise BrokerConnectionError(f"not connected: QoS 0 message to {topic!r} dropped")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerConnectionError(
                f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}"
            )
        return info

    # --- paho callbacks (loop thread) --------------------------------------------------

    def _stop(self) -> None:
        with self._cond:
            self._closing = self._closing or "requested"
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def _on_pre_connect(self, client: mqtt.Client, _userdata: Any) -> None:
        attempt = self._attempt
        self._attempt = attempt + 1
        if attempt:  # an automatic retry: exponential backoff with full jitter
            self._halt.wait(
                backoff_delay(
                    attempt,
                    base=self._reconnect.base_delay,
                    cap=self.reconnect_max_delay,
                    jitter=Jitter.FULL,
                )
            )
        # Before every CONNECT, first or automatic: a token is good for one attempt only.
        client.username_pw_set(self.address, self._token_signer.token(self.client_id))
        self.tokens_issued += 1

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        code = _CONNACK_V3.get(_reason_value(reason), _reason_value(reason))
        with self._cond:
            waited = self._connack is None and self._closing is None
            self._connack = code
            self._cond.notify_all()
        if code != 0:
            _log.warning(
                "%s: broker refused CONNECT: %s", self.client_id, _CONNACK_NAMES.get(code, code)
            )
            if code != _SERVER_UNAVAILABLE:
                # Permanent (bad token, not a member): stop paho retrying every few seconds.
                with self._cond:
                    self._closing = f"refused: {_CONNACK_NAMES.get(code, code)}"
                client.disconnect()
            return
        self._attempt = 1  # any further CONNECT is an automatic retry
        if not waited:
            self._guard(self._on_reconnected, bool(getattr(flags, "session_present", False)))

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._cond:
            closing = self._closing
            if self._connack is None:
                self._dropped = True
            self._cond.notify_all()
        self._guard(
            self._on_lost,
            Disconnection(closing == "requested", closing or str(reason), closing is None),
        )

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, codes: list[Any], _props: Any
    ) -> None:
        values = [_reason_value(c) for c in codes]
        with self._cond:
            untracked = self._untracked.pop(mid, None)
            if untracked is None:
                self._subacks[mid] = values
                self._cond.notify_all()
        if untracked is not None:
            self._guard(self._on_suback_untracked, untracked, values)

    def _on_paho_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._guard(self._on_message, msg)

    def _guard(self, fn: Any, *args: Any) -> None:
        """Run ``fn``; log what it raises instead of letting paho's loop thread die."""
        try:
            fn(*args)
        except Exception:
            _log.exception("%s: error in %s", self.client_id, getattr(fn, "__name__", fn))
