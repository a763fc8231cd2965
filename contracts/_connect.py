"""Opening an AsyncWeb3 to the embedded chain or a JSON-RPC endpoint."""

from __future__ import annotations

from typing import Any

from web3 import AsyncWeb3
from web3.providers import AsyncHTTPProvider, WebSocketProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from blendsm.contracts._http_provider import KeepAliveHTTPProvider
from blendsm.errors import ConfigError

__all__ = ["EMBEDDED", "connect", "disconnect"]

#: The endpoint name of the in-process EVM (eth-tester with py-evm).
EMBEDDED = "embedded"


def connect(
    endpoint: str, *, ethereum_tester: Any = None, request_timeout: float = 10.0
) -> AsyncWeb3[Any]:
    """An AsyncWeb3 for ``endpoint``: ``embedded``, ``http(s)://...`` or ``ws(s)://...``.

    For ``embedded``, pass ``ethereum_tester`` to share one in-process chain between
    several clients (the broker, the demo's devices and buyers); otherwise a fresh chain starts.
    A WebSocket provider must still be connected by the caller (``await w3.provider.connect()``).
    An HTTP one keeps its connections to the node alive between requests
    (:mod:`~blendsm.contracts._http_provider`).
    """
    if endpoint == EMBEDDED:
        provider = AsyncEthereumTesterProvider()
        if ethereum_tester is not None:
            provider.ethereum_tester = ethereum_tester
        return AsyncWeb3(provider)
    if endpoint.startswith(("http://", "https://")):
        http = KeepAliveHTTPProvider(endpoint, request_kwargs={"timeout": request_timeout})
        return AsyncWeb3(http)
    if endpoint.startswith(("ws://", "wss://")):
        return AsyncWeb3(WebSocketProvider(endpoint))
    raise ConfigError(
        f"chain endpoint must be 'embedded', http(s):// or ws(s)://, not {endpoint!r}"
    )


async def disconnect(w3: AsyncWeb3[Any]) -> None:
    """Close the HTTP sessions or WebSocket of ``w3``; nothing to do for the embedded chain
    (whose provider raises NotImplementedError on ``disconnect``)."""
    provider = w3.provider
    if isinstance(provider, WebSocketProvider) and not await provider.is_connected():
        return
    if isinstance(provider, AsyncHTTPProvider | WebSocketProvider):
        await provider.disconnect()
