"""The broker's MQTT listeners and TLS settings: ``listeners:``, ``http.tls``, ``metrics.tls``.

Why a section of its own: one broker serves plain MQTT, MQTT over TLS (``mqtts``), WebSocket
and secure WebSocket (browsers) at once, each a named entry of ``listeners:``. The older
``listen:`` (one plain TCP listener) keeps working: without ``listeners:`` it is the only
listener, named ``default``. Giving both is refused, so what is served is never a guess
(a forgotten ``listen:`` must not leave a plaintext port open next to the TLS one).

TLS is fail-closed: TLS 1.2 at least, certificate and key read and matched when the config is
loaded (:class:`~blendsm.errors.ConfigError` naming the field otherwise), and with
``require_client_cert`` a client must present a certificate issued by ``cafile`` or the
handshake fails, before a single MQTT byte is read. A client certificate is an admission
ticket to the transport only: the MQTT identity stays the chain address proven by the CONNECT
token (docs/operations.md, "TLS and WebSocket listeners").
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from blendsm.broker._config_fields import check_keys, integer, mapping, path_field, typed
from blendsm.errors import ConfigError

__all__ = [
    "LISTENER_TYPES",
    "TLS_VERSIONS",
    "ListenerConfig",
    "TlsConfig",
    "parse_listeners",
    "parse_tls",
    "server_ssl_context",
]

LISTENER_TYPES: Final = ("tcp", "ws")
"""``tcp``: MQTT over TCP (``mqtt``/``mqtts`` with ``tls``); ``ws``: MQTT over WebSocket
(``ws``/``wss`` with ``tls``)."""

TLS_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
"""Accepted ``tls.min_version`` values; nothing older than TLS 1.2 is ever offered."""

_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS of one server socket (an MQTT listener, the HTTP API or the metrics endpoint)."""

    certfile: Path
    """PEM file with the server certificate (then any intermediate certificates). Required."""
    keyfile: Path
    """PEM file with the certificate's private key, unencrypted (protect it with file
    permissions; a passphrase would need a prompt at every start). Required."""
    cafile: Path | None = None
    """PEM file of the CA certificates that issue client certificates; only these are
    trusted for clients (never the system store). Without it, no client certificate is asked."""
    require_client_cert: bool = False
    """Refuse the TLS handshake of a client without a certificate issued by ``cafile``."""
    min_version: str = "1.2"
    """Oldest TLS version accepted: ``1.2`` or ``1.3``."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One MQTT listener; ``name`` is its key under ``listeners:`` (``default`` for
    ``listen:``)."""

    name: str = "default"
    """Name in logs and in ``RunningBroker.ports``."""
    type: str = "tcp"
    """``tcp`` or ``ws`` (see :data:`LISTENER_TYPES`)."""
    host: str = "127.0.0.1"
    """Interface address; ``0.0.0.0`` listens on all IPv4 interfaces."""
    port: int = 1883
    """TCP port, 0-65535 (0: let the OS pick one, for tests)."""
    tls: TlsConfig | None = None
    """TLS on this listener (``mqtts`` or ``wss``); None: plaintext."""

    @property
    def scheme(self) -> str:
        """How a client names it: ``mqtt``, ``mqtts``, ``ws`` or ``wss``."""
        secure = self.tls is not None
        if self.type == "ws":
            return "wss" if secure else "ws"
        return "mqtts" if secure else "mqtt"


def parse_tls(value: Any, where: str, base: Path | None) -> TlsConfig | None:
    """The ``tls:`` mapping at ``where`` (None when absent), its files checked by building the
    server context once, so a bad certificate stops the config load, not the first client."""
    if value is None:
        return None
    data = mapping(value, where)
    check_keys(data, TlsConfig, where)
    files = {}
    for name in ("certfile", "keyfile"):
        path = path_field(data, name, where, base)
        if path is None:
            raise ConfigError(f"{where}.{name}: required (a PEM file)")
        files[name] = path
    cafile = path_field(data, "cafile", where, base)
    required = typed(data, "require_client_cert", where, bool, False)
    if required and cafile is None:
        raise ConfigError(
            f"{where}.require_client_cert: needs {where}.cafile, the CA that issues the client "
            "certificates (only it is trusted)"
        )
    min_version = typed(data, "min_version", where, str, "1.2")
    if min_version not in TLS_VERSIONS:
        raise ConfigError(
            f"{where}.min_version: must be one of {', '.join(TLS_VERSIONS)}, got {min_version!r}"
        )
    tls = TlsConfig(
        certfile=files["certfile"],
        keyfile=files["keyfile"],
        cafile=cafile,
        require_client_cert=required,
        min_version=min_version,
    )
    server_ssl_context(tls, where)
    return tls


def server_ssl_context(tls: TlsConfig, where: str) -> ssl.SSLContext:
    """A server-side SSL context for ``tls`` (files read now); ConfigError naming the field.

    Client certificates: required and verified against ``cafile`` with
    ``require_client_cert``; verified when presented if only ``cafile`` is given (a bad one
    fails the handshake); not asked for otherwise."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    _readable(tls.certfile, f"{where}.certfile")
    _readable(tls.keyfile, f"{where}.keyfile")
    asked = False

    def no_passphrase() -> bytes:
        nonlocal asked
        asked = True
        return b""  # never OpenSSL's interactive prompt: a daemon has no terminal

    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            raise ConfigError(
                f"{where}.keyfile: {tls.keyfile} is encrypted with a passphrase, which is not "
                "supported; store it unencrypted and readable only by the broker's user"
            ) from exc
        raise ConfigError(
            f"{where}: {tls.certfile} and {tls.keyfile} are not a PEM certificate and its "
            f"matching private key: {exc}"
        ) from exc
    if tls.cafile is not None:
        _readable(tls.cafile, f"{where}.cafile")
        try:
            context.load_verify_locations(cafile=tls.cafile)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{where}.cafile: {tls.cafile} holds no PEM CA certificate: {exc}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def _readable(path: Path, where: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from exc


def parse_listeners(root: Mapping[str, Any], base: Path | None) -> tuple[ListenerConfig, ...]:
    """The ``listeners:`` map of the config ``root`` (name -> type, host, port, tls), in file
    order; empty when absent (then ``listen:`` is the one listener)."""
    value = root.get("listeners")
    if value is None:
        return ()
    if root.get("listen") is not None:
        raise ConfigError(
            "listen: give either listen (one plain TCP listener) or listeners, not both; "
            "write the plain listener as an entry of listeners (type: tcp)"
        )
    data = mapping(value, "listeners")
    if not data:
        raise ConfigError("listeners: must name at least one listener")
    known = [f.name for f in fields(ListenerConfig) if f.name != "name"]
    parsed: list[ListenerConfig] = []
    seen: dict[tuple[str, int], str] = {}
    for name, entry in data.items():
        where = f"listeners.{name}"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: a listener name is 1-64 letters, digits, _ or -")
        spec = mapping({} if entry is None else entry, where)
        if "name" in spec:
            raise ConfigError(f"{where}.name: unknown key; the name is the key ({name!r})")
        check_keys(spec, ListenerConfig, where)
        kind = typed(spec, "type", where, str, "tcp")
        if kind not in LISTENER_TYPES:
            raise ConfigError(
                f"{where}.type: must be one of {', '.join(LISTENER_TYPES)}, got {kind!r}"
            )
        host = typed(spec, "host", where, str, "127.0.0.1")
        if not host.strip():
            raise ConfigError(f"{where}.host: must not be empty")
        if "port" not in spec:
            raise ConfigError(f"{where}.port: required ({', '.join(known)})")
        port = integer(spec, "port", where, 0, low=0, high=65535)
        clash = seen.setdefault((host, port), name) if port else name
        if clash != name:
            raise ConfigError(f"{where}.port: {port} is already listeners.{clash}'s port")
        tls = parse_tls(spec.get("tls"), f"{where}.tls", base)
        parsed.append(ListenerConfig(name=name, type=kind, host=host, port=port, tls=tls))
    _refuse_wildcard_overlap(parsed)
    return tuple(parsed)


def _refuse_wildcard_overlap(listeners: list[ListenerConfig]) -> None:
    """A port on 0.0.0.0 also covers every address: another listener on it cannot bind."""
    wildcard = {x.port: x.name for x in listeners if x.port and x.host in ("0.0.0.0", "::")}
    for listener in listeners:
        owner = wildcard.get(listener.port)
        if owner is not None and owner != listener.name:
            raise ConfigError(
                f"listeners.{listener.name}.port: {listener.port} is already "
                f"listeners.{owner}'s port (on every interface)"
            )
