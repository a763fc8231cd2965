"""Counting a broker's failed chain requests by source, for the ``blendsm_chain_errors`` metric.

Why at the request level: every chain interaction of the chain view, the settler and the
anchorer goes through the service's ``AsyncWeb3``, and each of them catches and logs its own
failures in its own way. A web3 middleware sees them all, and a context variable set on each
background task says whose request it was, so requests made by anything else (the CLI, tests
sharing the connection, another broker in the same process) are not counted.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any, Final

from web3 import AsyncWeb3
from web3.middleware import Web3Middleware
from web3.types import RPCEndpoint, RPCResponse

if TYPE_CHECKING:
    from web3.types import AsyncMakeRequestFn

__all__ = ["CHAIN_ERROR_SOURCES", "ChainErrors", "chain_source", "count_chain_errors"]

CHAIN_ERROR_SOURCES: Final = ("chain_view", "settlement", "gas_balance", "anchors")
"""Where a broker's failed chain requests come from (the ``source`` label of the metric):
event polling of the chain view, claims and the reads around them, the operator's balance
check, anchor transactions and their receipts."""


class ChainErrors:
    """Failed JSON-RPC requests of one broker's background work, by source (see the module
    docstring for why they are counted per request)."""

    __slots__ = ("by_source",)

    def __init__(self) -> None:
        self.by_source: dict[str, int] = dict.fromkeys(CHAIN_ERROR_SOURCES, 0)

    def count(self, source: str, method: str) -> None:
        if source == "settlement" and method == "eth_getBalance":
            source = "gas_balance"
        self.by_source[source] = self.by_source.get(source, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_source.values())


_CHAIN_SOURCE: contextvars.ContextVar[tuple[ChainErrors, str] | None] = contextvars.ContextVar(
    "blendsm_chain_source", default=None
)
_COUNTER_NAME: Final = "blendsm_chain_errors"


class _ChainErrorCounter(Web3Middleware):
    """Counts a request that raised (node unreachable, timeout) or came back with a JSON-RPC
    error (e.g. a revert) into the :class:`ChainErrors` of the task that made it."""

    async def async_wrap_make_request(self, make_request: AsyncMakeRequestFn) -> AsyncMakeRequestFn:
        async def middleware(method: RPCEndpoint, params: Any) -> RPCResponse:
            tag = _CHAIN_SOURCE.get()
            if tag is None:
                return await make_request(method, params)
            try:
                response = await make_request(method, params)
            except Exception:
                tag[0].count(tag[1], str(method))
                raise
            if isinstance(response, dict) and response.get("error") is not None:
                tag[0].count(tag[1], str(method))
            return response

        return middleware


def count_chain_errors(w3: AsyncWeb3[Any]) -> None:
    """Install the chain error counter on the connection (once per ``AsyncWeb3``)."""
    onion: Any = w3.middleware_onion
    if _COUNTER_NAME not in onion:
        onion.add(_ChainErrorCounter, name=_COUNTER_NAME)


def chain_source(errors: ChainErrors, source: str) -> contextvars.Context:
    """A context (for a background task) whose failed chain requests count into ``errors``
    as ``source``."""
    context = contextvars.copy_context()
    context.run(_CHAIN_SOURCE.set, (errors, source))
    return context
