"""Opening an AsyncWeb3 to the embedded chain or a JSON-RPC endpoint."""

from __future__ import annotations

from typing import Any, Final

from web3 import AsyncWeb3
from web3.middleware import ExtraDataToPOAMiddleware
from web3.providers import AsyncHTTPProvider, WebSocketProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import RPCEndpoint

from blendsm.contracts._http_provider import KeepAliveHTTPProvider
from blendsm.errors import ConfigError

__all__ = ["EMBEDDED", "connect", "disconnect"]

#: The endpoint name of the in-process EVM (eth-tester with py-evm).
EMBEDDED = "embedded"

UNUSED_MIDDLEWARE: Final = ("validation", "ens_name_to_address")
"""web3's default middleware our connections go without. ``validation`` asks the node for its
chain id before every ``eth_call`` and ``eth_estimateGas`` (a second round trip per contract
view), checks a ``chainId`` that web3 itself filled in from that node, and refuses blocks whose
``extraData`` exceeds 32 bytes. ``ens_name_to_address`` looks for ENS names in every request's
parameters; we only ever pass addresses."""


def connect(
    endpoint: str, *, ethereum_tester: Any = None, request_timeout: float = 10.0
) -> AsyncWeb3[Any]:
    """An AsyncWeb3 for ``endpoint``: ``embedded``, ``http(s)://...`` or ``ws(s)://...``.

    For ``embedded``, pass ``ethereum_tester`` to share one in-process chain between
    several clients (the broker, the demo's devices and buyers); otherwise a fresh chain starts.
    A WebSocket provider must still be connected by the caller (``await w3.provider.connect()``).
    An HTTP one keeps its connections to the node alive between requests
    (:mod:`~blendsm.contracts._http_provider`). Every one asks the node for its chain id once,
    goes without web3's :data:`UNUSED_MIDDLEWARE` and reads PoA blocks.
    """
    provider: Any
    if endpoint == EMBEDDED:
        provider = AsyncEthereumTesterProvider()
        if ethereum_tester is not None:
            provider.ethereum_tester = ethereum_tester
    elif endpoint.startswith(("http://", "https://")):
        provider = KeepAliveHTTPProvider(endpoint, request_kwargs={"timeout": request_timeout})
    elif endpoint.startswith(("ws://", "wss://")):
        provider = WebSocketProvider(endpoint)
    else:
        raise ConfigError(
            f"chain endpoint must be 'embedded', http(s):// or ws(s)://, not {endpoint!r}"
        )
    # The chain id of an endpoint does not change: asked once, not before every call.
    provider.cache_allowed_requests = True
    provider.cacheable_requests = {RPCEndpoint("eth_chainId")}
    w3: AsyncWeb3[Any] = AsyncWeb3(provider)
    for name in UNUSED_MIDDLEWARE:
        w3.middleware_onion.remove(name)
    # PoA networks (Besu QBFT, the production profile, and Clique) put validators and seals
    # in a block's extraData (over 32 bytes), which web3's block formatter refuses: every
    # transaction's fee lookup (get_block("latest")) failed there. This moves it aside.
    w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
    return w3


async def disconnect(w3: AsyncWeb3[Any]) -> None:
    """Close the HTTP sessions or WebSocket of ``w3``; nothing to do for the embedded chain
    (whose provider raises NotImplementedError on ``disconnect``)."""
    provider = w3.provider
    if isinstance(provider, WebSocketProvider) and not await provider.is_connected():
        return
    if isinstance(provider, AsyncHTTPProvider | WebSocketProvider):
        await provider.disconnect()
