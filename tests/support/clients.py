"""The raw MQTT test client: a paho client (VERSION2 callbacks, TCP_NODELAY) for a broker on
127.0.0.1, authenticated with an optional CONNECT token, that records what it receives.

``Client(host, port, account=..., signer=ConnectTokenSigner(...))`` connects as that account
with a fresh CONNECT token (username = the address); without them it is anonymous (or uses a
plain ``username``/``password``).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from blendsm.device_sdk import ConnectTokenSigner, EnvelopeSigner, decode_envelope
from blendsm.errors import EnvelopeError

__all__ = ["Client", "Received"]

# paho VERSION2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
_CONNACK_V3 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass
class Received:
    """What one raw paho client got: messages, notices, SUBACKs, disconnects."""

    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    connack: queue.Queue[int] = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnected_at: float | None = None

    def _drain(self, within: float, until: int | None) -> list[mqtt.MQTTMessage]:
        got: list[mqtt.MQTTMessage] = []
        while until is None or len(got) < until:
            try:
                got.append(_unwrap(self.messages.get(timeout=within)))
            except queue.Empty:
                break
        return got

    async def drain(
        self, within: float = 0.5, *, until: int | None = None
    ) -> list[mqtt.MQTTMessage]:
        """Messages received until ``within`` seconds pass with none new (or ``until`` reached);
        waits on a thread so the broker, on this event loop, keeps running."""
        return await asyncio.to_thread(self._drain, within, until)


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):  # a websocket wrapper has no option
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _unwrap(message: mqtt.MQTTMessage) -> mqtt.MQTTMessage:
    """Replace a signed envelope's bytes by its payload, so tests compare readings."""
    if message.topic.startswith("blendsm/"):
        return message
    with contextlib.suppress(EnvelopeError):
        message.payload = decode_envelope(message.payload).payload
    return message


class Client:
    """A raw paho client (VERSION2 callbacks, TCP_NODELAY) for tests of the wire protocol.
    With ``envelope_signer`` (a device), payloads on market topics are signed envelopes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        account: Any = None,
        signer: ConnectTokenSigner | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
        password: str | None = None,
        username: str | None = None,
        envelope_signer: EnvelopeSigner | None = None,
        transport: str = "tcp",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.envelope_signer = envelope_signer
        self.sequence = 0
        self.account = account
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:10]}"
        self.got = Received()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            transport=transport,  # type: ignore[arg-type]
        )
        if tls is not None:
            c.tls_set_context(tls)
        if account is not None and signer is not None:
            c.username_pw_set(account.address, password or signer.token(self.client_id))
        elif username is not None or password is not None:
            c.username_pw_set(username, password)
        c.on_message = lambda _c, _u, m: self.got.messages.put(m)
        c.on_subscribe = lambda _c, _u, _m, codes, _p: self.got.subacks.put(
            [int(getattr(x, "value", x)) for x in codes]
        )
        c.on_connect = lambda _c, _u, _f, rc, _p: self.got.connack.put(
            _CONNACK_V3.get(int(getattr(rc, "value", rc)), -2)
        )

        def on_disconnect(*_a: Any) -> None:
            self.got.disconnected_at = time.monotonic()
            self.got.disconnected.set()

        c.on_disconnect = on_disconnect
        c.on_socket_open = _nodelay
        self.mqtt = c

    async def connect(self, within: float = 5.0) -> int:
        """CONNECT and return the CONNACK code (0 accepted, 5 not authorised, -1 none)."""
        await asyncio.to_thread(self.mqtt.connect, self.host, self.port, 30)
        self.mqtt.loop_start()
        try:
            return await asyncio.to_thread(self.got.connack.get, True, within)
        except queue.Empty:
            return -1

    async def subscribe(self, topic: str, qos: int = 0, within: float = 5.0) -> list[int]:
        self.mqtt.subscribe(topic, qos)
        return await asyncio.to_thread(self.got.subacks.get, True, within)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        sign: bool | None = None,
    ) -> None:
        """Publish; a device signs it unless the topic is public (``public/...``) or control."""
        signer = self.envelope_signer
        if sign is None:
            sign = signer is not None and not topic.startswith(("public/", "blendsm/"))
        if sign:
            assert signer is not None
            self.sequence += 1
            payload = signer.sign(topic, payload, self.sequence, int(time.time() * 1000)).encode()
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            await asyncio.to_thread(info.wait_for_publish, 5)

    async def wait_disconnected(self, within: float = 10.0) -> bool:
        return await asyncio.to_thread(self.got.disconnected.wait, within)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
