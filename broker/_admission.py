"""What a new connection passes before amqtt reads a byte of it, on every listener.

One place for the per-connection limits (``limits`` in the config): the connect rate of its
address (:mod:`blendsm.broker._conn_rate`), the connection caps
(:mod:`blendsm.broker._conn_limits`), and the packet size its reader enforces
(:mod:`blendsm.broker._packet_limit`). A refused connection is counted, logged through a
:class:`LogLimiter` (the client controls how often) and aborted at once.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from amqtt.adapters import StreamReaderAdapter

from blendsm.broker._config import LimitsConfig
from blendsm.broker._conn_limits import ConnectionLimits
from blendsm.broker._conn_rate import ConnectRate
from blendsm.broker._conn_reader import PacketStream
from blendsm.broker._handler import abort_connection
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._packet_limit import PacketSizeLimit
from blendsm.broker._stats import ServiceStats

__all__ = ["Admission"]

_log = logging.getLogger("blendsm.broker")
_REFUSED_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Connections refused at a cap or rate: one log line a minute, with a count."""
_PACKET_SIZE_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Connections closed for an oversized packet: one log line a minute, with a count."""
_VIOLATION_LOG: Final = LogLimiter(_log, logging.WARNING)
"""WebSocket clients breaking MQTT's rules (:mod:`._packet_rules`): at most one line a minute."""


class Admission:
    """The broker's connection gate: :meth:`enter` on connect, :meth:`leave` when it ends."""

    __slots__ = ("config", "limits", "rate", "stats")

    def __init__(self, config: LimitsConfig, stats: ServiceStats) -> None:
        self.config = config
        self.stats = stats
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_ip)
        self.rate = ConnectRate(config.connect_rate_per_ip, config.connect_burst_per_ip)

    def enter(self, address: str, writer: Any) -> bool:
        """Admit a connection from ``address`` (counted until :meth:`leave`), or refuse it:
        counted, logged, its socket aborted."""
        if not self.rate.admit(address):
            self.stats.connects_rate_limited += 1
            refused: str | None = "over limits.connect_rate_per_ip"
        else:
            refused = self.limits.enter(address)
            if refused is not None:
                self.stats.connections_refused_at_limit += 1
        if refused is None:
            return True
        _REFUSED_LOG.note("connection from %s refused: %s", address, refused)
        abort_connection(writer)
        return False

    def leave(self, address: str) -> None:
        """A connection admitted by :meth:`enter` has ended."""
        self.limits.leave(address)

    def reader(self, reader: Any, writer: Any, address: str) -> PacketStream | PacketSizeLimit:
        """``reader`` refusing any packet over ``limits.max_packet_bytes`` once its fixed
        header is read: the connection is then aborted, the body never read. A TCP or TLS
        connection (amqtt's ``StreamReaderAdapter``) is read as whole packets
        (:class:`PacketStream`); others (WebSocket) through amqtt's reader."""
        limit = self.config.max_packet_bytes

        def too_large(size: int) -> None:
            self.stats.packets_too_large += 1
            _PACKET_SIZE_LOG.note(
                "%s announced a %d-byte packet (limits.max_packet_bytes %d): closed",
                address,
                size,
                limit,
            )
            abort_connection(writer)

        def violated(why: str) -> None:  # section 4.8, on the WebSocket listeners
            self.stats.protocol_violations += 1
            _VIOLATION_LOG.note("%s: %s: closing", address, why)
            abort_connection(writer)

        if type(reader) is StreamReaderAdapter:
            return PacketStream(reader._reader, limit, too_large)
        return PacketSizeLimit(reader, limit, too_large, violated)
