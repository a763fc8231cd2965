"""Where an SDK client connects, as one value: :class:`BrokerEndpoint`.

Why: the Publisher, the Subscriber, the TopicKeyring and the TopicKeyService all connect to a
BlendSM broker the same way (host and port, CONNECT tokens bound to the broker operator's
address and the chain id, a client id and a keepalive). One frozen value, checked once, is
passed instead of the same six keyword arguments through every class; the old keyword
arguments still work (:func:`resolve_endpoint` turns them into an endpoint).

The transport is part of where a client connects: plain TCP or WebSocket (``transport``),
with TLS (:class:`ClientTls`: the CA that issued the broker's certificate and, when the broker
asks for one, the client's own certificate). TLS is fail-closed: the broker's certificate must
chain to ``ca_certs`` (the system store when None) and name the host, TLS 1.2 at least.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from blendsm.errors import ConfigError

from ._eip712 import address_bytes, check_chain_id
from ._keccak import checksum_address
from ._paho_sockets import closing_failed_handshakes

__all__ = ["TRANSPORTS", "BrokerEndpoint", "ClientTls", "EndpointArgs", "resolve_endpoint"]

TRANSPORTS = ("tcp", "websockets")
"""``BrokerEndpoint.transport`` values (paho's names): MQTT over TCP or over WebSocket."""


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS to the broker (``mqtts://`` or ``wss://``); files are PEM paths, checked readable
    when the endpoint is made (ConfigError)."""

    ca_certs: str | None = None
    """CA certificates that may sign the broker's certificate; None: the system store."""
    certfile: str | None = None
    """This client's certificate, for a broker that requires one (``require_client_cert``)."""
    keyfile: str | None = None
    """The private key of ``certfile`` (None: it is in ``certfile``)."""

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate verified against ``ca_certs`` and its
        host name checked, TLS 1.2 at least; ConfigError for an unusable file. Its sockets
        close themselves when their handshake fails (:mod:`._paho_sockets`)."""
        try:
            context = ssl.create_default_context(cafile=self.ca_certs)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.certfile is not None:
                context.load_cert_chain(self.certfile, self.keyfile, password=_no_passphrase)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot use {self}: {exc}") from exc
        return closing_failed_handshakes(context)


def _no_passphrase() -> bytes:
    return b""  # an encrypted key fails instead of prompting on a terminal


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """A BlendSM broker as an SDK client sees it; the fields are checked on construction
    (ConfigError).

    ``broker`` is the broker operator's address (hex or 20 bytes, kept in checksum form):
    CONNECT tokens are bound to it and to ``chain_id``, so a token for one broker is
    worthless at another. ``client_id`` None makes each client draw its own
    (``bsm-<address>-<random>``), so one endpoint can be shared by several clients of one
    account without their sessions taking over each other.
    """

    host: str
    port: int
    broker: str
    chain_id: int
    client_id: str | None = None
    keepalive: int = 60
    transport: str = "tcp"
    """``tcp`` or ``websockets`` (MQTT over WebSocket, ``ws://`` or ``wss://`` with tls)."""
    tls: ClientTls | None = None
    """TLS to the broker; None: plaintext."""
    ws_path: str = "/mqtt"
    """HTTP path of the WebSocket upgrade (``transport="websockets"`` only)."""

    def __init__(
        self,
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        client_id: str | None = None,
        keepalive: int = 60,
        transport: str = "tcp",
        tls: ClientTls | None = None,
        ws_path: str = "/mqtt",
    ) -> None:
        set_ = object.__setattr__
        set_(self, "chain_id", check_chain_id(chain_id))
        set_(self, "broker", checksum_address(address_bytes(broker, "broker", ConfigError)))
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise ConfigError(f"client_id: must be a non-empty str, got {client_id!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"port: must be an int in [1, 65535], got {port!r}")
        if not isinstance(keepalive, int) or isinstance(keepalive, bool) or keepalive < 0:
            raise ConfigError(f"keepalive: must be a non-negative int, got {keepalive!r}")
        set_(self, "host", host)
        set_(self, "port", port)
        set_(self, "client_id", client_id)
        set_(self, "keepalive", keepalive)
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"transport: must be one of {', '.join(TRANSPORTS)}, got {transport!r}"
            )
        if not isinstance(ws_path, str) or not ws_path.startswith("/"):
            raise ConfigError(f"ws_path: must be a str starting with '/', got {ws_path!r}")
        if tls is not None:
            if not isinstance(tls, ClientTls):
                raise ConfigError(f"tls: must be a ClientTls, got {tls!r}")
            for name in ("ca_certs", "certfile", "keyfile"):
                path = getattr(tls, name)
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"tls.{name}: no such file: {path}")
            if tls.keyfile is not None and tls.certfile is None:
                raise ConfigError("tls.keyfile: given without tls.certfile")
        set_(self, "transport", transport)
        set_(self, "tls", tls)
        set_(self, "ws_path", ws_path)


class EndpointArgs(TypedDict, total=False):
    """The fields of a :class:`BrokerEndpoint` as keyword arguments of a client (the way
    clients were configured before ``endpoint=``; still accepted)."""

    host: str
    port: int
    broker: str | bytes
    chain_id: int
    client_id: str | None
    keepalive: int
    transport: str
    tls: ClientTls | None
    ws_path: str


_REQUIRED = ("host", "port", "broker", "chain_id")
_FIELDS = frozenset(EndpointArgs.__annotations__)


def resolve_endpoint(
    endpoint: BrokerEndpoint | None, fields: Mapping[str, Any], owner: str
) -> BrokerEndpoint:
    """``endpoint``, or one built from the keyword arguments ``fields`` given to ``owner``.

    Raises TypeError, as Python does for a bad call, for an unknown or missing keyword
    argument; ConfigError when both an ``endpoint`` and endpoint fields are given (which
    would win is not obvious) or a field is invalid.
    """
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if endpoint is not None:
        if fields:
            raise ConfigError(
                f"{owner}: give either endpoint= or {', '.join(sorted(fields))}, not both"
            )
        if not isinstance(endpoint, BrokerEndpoint):
            raise ConfigError(f"endpoint: must be a BrokerEndpoint, got {endpoint!r}")
        return endpoint
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise TypeError(
            f"{owner}() missing required keyword argument {missing[0]!r} (or give endpoint=)"
        )
    return BrokerEndpoint(**fields)
