"""How many connections the broker holds, in all and per remote address: both bounded.

Every open connection holds a file descriptor and a handler. Without a cap, a few hosts can
open sockets until the process runs out of descriptors, and then the chain client itself
cannot connect: the chain view turns unhealthy and every member is refused (fail closed, but
down). So the broker refuses a connection beyond ``limits.max_connections`` or beyond
``limits.max_connections_per_ip`` from one address, and always keeps :data:`FD_RESERVE`
descriptors free for itself (chain client, stores, metrics, HTTP API).
"""

from __future__ import annotations

import resource
from typing import Final

__all__ = ["FD_RESERVE", "ConnectionLimits", "descriptor_budget"]

FD_RESERVE: Final = 128
"""File descriptors never handed to clients: the chain client, SQLite, HTTP and metrics."""


def descriptor_budget() -> int:
    """Connections the process's descriptor limit (RLIMIT_NOFILE, soft) leaves for clients."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(0, soft - FD_RESERVE)


class ConnectionLimits:
    """Counts open client connections; :meth:`enter` admits one or says why not."""

    __slots__ = ("max_per_ip", "max_total", "per_ip", "total")

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = min(max_total, descriptor_budget())
        """The global cap: the configured one, lowered to what the descriptor limit allows."""
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def enter(self, address: str) -> str | None:
        """Admit a connection from ``address`` (counted until :meth:`leave`): None; or the
        reason it is refused (nothing counted)."""
        if self.total >= self.max_total:
            return f"{self.total} connections open (limits.max_connections {self.max_total})"
        held = self.per_ip.get(address, 0)
        if held >= self.max_per_ip:
            return f"{held} connections from it (limits.max_connections_per_ip {self.max_per_ip})"
        self.total += 1
        self.per_ip[address] = held + 1
        return None

    def leave(self, address: str) -> None:
        """A connection admitted by :meth:`enter` has ended."""
        self.total -= 1
        held = self.per_ip.get(address, 0) - 1
        if held > 0:
            self.per_ip[address] = held
        else:
            self.per_ip.pop(address, None)  # the map holds only addresses with connections
