"""Opening the broker's MQTT listeners: TCP, TLS, WebSocket and secure WebSocket.

amqtt 0.12.1 opens them itself, but its TLS asks for a client certificate only optionally
(``CERT_OPTIONAL``, whatever the config says), sets no minimum version of its own and gives a
TLS or WebSocket handshake up to 60 s before anything of ours runs. The connection caps and the
CONNECT timeout start only once amqtt hands us the connection, so the handshake before it is
bounded here by ``limits.connect_timeout_seconds`` too. :func:`open_server` replaces amqtt's
server creation with the listener's own TLS context (:mod:`._config_listeners`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import websockets
from amqtt.contexts import ListenerType
from websockets.asyncio.server import Server as WebSocketServer

from blendsm.broker._config_listeners import ListenerConfig, server_ssl_context
from blendsm.broker._log_limit import LogLimiter

__all__ = ["LISTEN_BACKLOG", "WS_MAX_MESSAGE", "bound_port", "certificate_subject", "open_server"]

LISTEN_BACKLOG: Final = 1024
"""Pending connections the kernel queues per listener (asyncio's default is 100, and asyncio
also accepts at most that many per wake-up): after a broker restart thousands of clients
reconnect at once, and a full backlog drops their SYNs, which they retry only after 1, 3, 7 s.
Capped by the kernel's ``net.core.somaxconn``; admission still applies to each one."""

WS_MAX_MESSAGE: Final = 1 << 20
"""Largest WebSocket message a client may send (bytes; websockets' default, stated here so it
is a decision): an MQTT packet may span several messages, each is buffered whole."""


async def open_server(
    listener_name: str,
    listener_type: ListenerType,
    address: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    spec: ListenerConfig | None,
    handshake_timeout: float,
    stream_connected: Callable[..., Awaitable[None]],
    ws_connected: Callable[..., Awaitable[None]],
) -> asyncio.Server | WebSocketServer:
    """Listen as amqtt would, with our TLS context when ``spec`` has ``tls`` (else amqtt's,
    from a plain amqtt config, raised to TLS 1.2 at least) and bounded handshakes."""
    if spec is not None and spec.tls is not None:
        ssl_context = server_ssl_context(spec.tls, f"listeners.{listener_name}.tls")
    elif ssl_context is not None and ssl_context.minimum_version < ssl.TLSVersion.TLSv1_2:
        ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
    if listener_type == ListenerType.WS:
        # open_timeout bounds the HTTP upgrade, and websockets uses it for the TLS handshake.
        return await websockets.serve(
            partial(ws_connected, listener_name=listener_name),
            address,
            port,
            ssl=ssl_context,
            subprotocols=[websockets.Subprotocol("mqtt")],
            open_timeout=handshake_timeout,
            max_size=WS_MAX_MESSAGE,
            logger=_WebSocketLog(),  # one limiter per listener
            backlog=LISTEN_BACKLOG,
        )
    options: dict[str, Any] = {}
    if ssl_context is not None:
        options["ssl_handshake_timeout"] = handshake_timeout
    return await asyncio.start_server(
        partial(stream_connected, listener_name=listener_name),
        address,
        port,
        reuse_address=True,
        ssl=ssl_context,
        backlog=LISTEN_BACKLOG,
        **options,
    )


class _WebSocketLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' server logger, with its warnings and errors rate-limited.

    websockets logs every failed opening handshake at ERROR with a traceback, and a client
    that opens a TCP connection and closes it (a port probe, a health check) is one: about 25
    lines each, as often as anyone likes. Those lines are client-caused, so they go through a
    :class:`LogLimiter` (one a minute, with a count), without the traceback; DEBUG and INFO
    (listening, closing) pass through."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("websockets.server"), {})
        self._limiter = LogLimiter(self.logger, logging.WARNING)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level < logging.WARNING:
            super().log(level, msg, *args, **kwargs)
            return
        exc = sys.exc_info()[1] if kwargs.get("exc_info") else None
        why = "" if exc is None else f"{type(exc).__name__}: {exc}"
        self._limiter.note("websocket: %s %s", str(msg) % args if args else msg, why)


def bound_port(instance: object) -> int | None:
    """The port a listening server is bound to (the OS's pick for port 0); None if unknown."""
    sockets = getattr(instance, "sockets", None)
    if not sockets:
        return None
    return int(sockets[0].getsockname()[1])


def certificate_subject(session: object) -> str | None:
    """The subject of the client certificate the TLS handshake verified (``CN=...,O=...``),
    or None: plaintext, or no certificate asked or given. Unverified certificates never get
    this far (the handshake fails)."""
    ssl_object = getattr(session, "ssl_object", None)
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, AttributeError):  # handshake not done, or the socket is gone
        return None
    if not cert:
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ",".join(parts) or None
