"""JSON-RPC over HTTP with pooled keep-alive connections and no thread hop per request.

Why not web3 8's ``AsyncHTTPProvider`` as it comes: its session manager builds each session
with ``TCPConnector(force_close=True)``, so every JSON-RPC request opens and closes a TCP
connection (51 connections for 51 ``eth_blockNumber`` against anvil), and it takes a
``threading.Lock`` through ``loop.run_in_executor`` before every request, a round trip to a
worker thread just to find the cached session. In the broker both run on the event loop that
delivers messages: the anchorer, the settler and the chain view make a dozen calls per anchor
or claim, and each one cost a connect, a close (a socket left in TIME_WAIT) and a thread hop.
Measured on the project's machine, 300 sequential ``eth_blockNumber`` against anvil: 0.62-0.64
ms of client CPU per request as shipped, 0.43-0.49 ms with one kept-alive connection.

What changes, and only that: the session of a (loop, endpoint) is made with a pooled
connector that keeps idle connections for :data:`IDLE_SECONDS` (below the idle timeouts of
geth, 120 s, and of common proxies, 60-75 s, so the client closes first), at most
:data:`MAX_CONNECTIONS` at once; a healthy cached session is returned without the lock. A
stale one (closed, or its loop closed) is replaced under web3's own locked path. Requests,
retries (web3 retries reads on ``aiohttp.ClientError``, which is what a connection the node
closed meanwhile raises) and ``disconnect`` are web3's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from aiohttp import ClientSession, ClientTimeout, TCPConnector
from web3._utils.caching.caching_utils import generate_cache_key
from web3._utils.http_session_manager import HTTPSessionManager
from web3.providers import AsyncHTTPProvider

__all__ = ["IDLE_SECONDS", "MAX_CONNECTIONS", "KeepAliveHTTPProvider"]

IDLE_SECONDS: Final = 15.0
"""An idle connection to the node is closed by us after this long."""
MAX_CONNECTIONS: Final = 8
"""Connections one provider opens to its node at most (requests beyond wait for one)."""


class _KeepAliveSessions(HTTPSessionManager):
    """web3's session manager, with a keep-alive connector and a lock-free cache hit."""

    async def async_cache_and_return_session(
        self,
        endpoint_uri: Any,
        session: ClientSession | None = None,
        request_timeout: ClientTimeout | None = None,
    ) -> ClientSession:
        key = generate_cache_key(f"{id(asyncio.get_event_loop())}:{endpoint_uri}")
        cached: ClientSession | None = self.session_cache.get_cache_entry(key)
        ours: ClientSession | None = None
        if session is None:
            if cached is not None and not cached.closed and not cached._loop.is_closed():
                return cached
            if cached is not None:  # stale: ours takes its place (web3 would make a closing one)
                self.session_cache.pop(key)
                if not cached.closed:
                    with contextlib.suppress(Exception):
                        await cached.close()
            session = ours = ClientSession(
                raise_for_status=True,
                connector=TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=IDLE_SECONDS),
            )
        kept = await super().async_cache_and_return_session(endpoint_uri, session, request_timeout)
        if ours is not None and kept is not ours:
            # Concurrent first requests each made one; web3 keeps the first cached, so the
            # others are closed here rather than left to the garbage collector.
            await ours.close()
        return kept


class KeepAliveHTTPProvider(AsyncHTTPProvider):
    """``AsyncHTTPProvider`` whose requests share kept-alive connections (see the module)."""

    def __init__(self, endpoint_uri: str, request_kwargs: Any | None = None) -> None:
        super().__init__(endpoint_uri, request_kwargs=request_kwargs)
        self._request_session_manager = _KeepAliveSessions()
