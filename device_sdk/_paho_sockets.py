"""Sockets paho leaves open when setting up a connection fails, closed at once.

paho opens the TCP socket, wraps it for TLS and shakes hands, then (for ``websockets``)
sends the HTTP upgrade, all in one call, and when a step fails it raises and drops whatever
it had opened without closing it: after a TLS handshake that failed (a broker certificate we
do not trust) or a WebSocket upgrade that was refused (a wrong path, or TLS 1.3's refusal of
our client certificate, which arrives only when we read), the socket stayed open for as long
as the error lived. A device that kept its last error held a descriptor per failed attempt,
and the garbage collector closed the others with a ResourceWarning.

Two pieces, because the TLS socket is made inside paho's wrapping step and never reaches us
when its handshake fails:

* :func:`closing_failed_handshakes`: a context whose sockets close themselves when their
  handshake fails (``ssl.SSLContext.sslsocket_class``, the ssl module's documented hook);
  :meth:`ClientTls.context <blendsm.device_sdk.ClientTls.context>` returns one;
* :class:`SocketClosingClient`: paho's client, closing the socket it opened (plain or TLS)
  when a later step fails. It overrides three of paho's private steps (as paho 2.2 has them,
  which this was written against); should another paho rename them, the overrides go unused
  and paho's behaviour returns, which ``tests/integration/test_listeners.py`` reports as
  open sockets.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["SocketClosingClient", "closing_failed_handshakes"]


class _HandshakeClosingSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def closing_failed_handshakes(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context``, whose sockets now close themselves when their handshake fails."""
    context.sslsocket_class = _HandshakeClosingSocket
    return context


class SocketClosingClient(mqtt.Client):
    """paho's client, closing the socket it opened when a later step of the connection's
    set-up fails (the WebSocket upgrade, or a TLS step after the handshake)."""

    _opening: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        self._opening = opened = super()._create_socket_connection()
        return opened

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        self._opening = wrapped = super()._ssl_wrap_socket(tcp_sock)
        return wrapped

    def _create_socket(self) -> Any:
        self._opening = None
        try:
            return super()._create_socket()
        except BaseException:
            if self._opening is not None:
                self._opening.close()
            raise
        finally:
            self._opening = None
