"""How fast one address may open connections: a token bucket per source address.

Why: the connection caps (:mod:`blendsm.broker._conn_limits`) bound how many connections are
open, not how many are opened. A client that connects and disconnects in a loop stays under
every cap while making the broker parse a CONNECT, verify its token and set up and tear
down a session thousands of times a second. :class:`ConnectRate` lets each address open
``burst`` connections at once and ``rate`` per second on average; a connection beyond that
is closed before its CONNECT is read.

The defaults (50 per second, bursts of 1,000) never bother a fleet behind one NAT: 1,000
devices (``limits.max_connections_per_ip``) reconnecting together after a broker restart fit
in the burst, and the bucket refills in 20 s. IPv6 addresses count per /64 (what one host or
site usually gets), IPv4-mapped ones as their IPv4 address. Memory is bounded: an address
whose bucket has refilled is forgotten (it is the same as a new one), and past
:data:`MAX_TRACKED` addresses the least recently seen is forgotten first.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_TRACKED", "ConnectRate", "rate_key"]

MAX_TRACKED: Final = 65_536
"""Addresses tracked at most (about 100 bytes each); a forgotten one starts with a full bucket."""


def rate_key(address: str) -> str:
    """The unit one bucket covers: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a test transport): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


class ConnectRate:
    """Token buckets per address; :meth:`admit` takes one token or says no."""

    __slots__ = ("_buckets", "_clock", "_next_sweep", "burst", "max_tracked", "rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """key -> (tokens, when counted), least recently seen first."""
        self._next_sweep = clock() + burst / rate

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, address: str) -> bool:
        """True (a token taken) if ``address`` may open a connection now."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key = rate_key(address)
        tokens, since = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) * self.rate)
        admitted = tokens >= 1.0
        if admitted:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        return admitted

    def _sweep(self, now: float) -> None:
        """Forget every address whose bucket has refilled since it was last seen."""
        full = self.burst / self.rate
        self._buckets = OrderedDict(
            (key, (tokens, since))
            for key, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * self.rate < self.burst
        )
        self._next_sweep = now + full
