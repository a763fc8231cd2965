"""Contract views called without web3's contract layer: calldata and result through web3's ABI
codec (``w3.codec``: eth_abi with web3's strict checks, exact-length bytes, valid addresses).

Why: ``contract.functions[name](*args).call()`` spends about 0.7 ms of CPU per call on
matching the arguments against the ABI again, building a transaction dict through formatters
and normalizing the result, for a ``uint256`` (``bench_chain_client.py``: 0.98 ms of client
CPU for a view against 0.23 ms for a bare ``eth_blockNumber``). The broker's anchorer makes
four views per root and the chain view polls, all on the loop that delivers. Here a view's
selector and types are worked out once per (contract, function), and a call is an
encode through that codec, ``w3.eth.call`` (web3's own request path: same revert errors,
same off-chain lookups) and a decode, with web3's return normalizers (checksummed addresses)
and its shape (one output: the value; several: a list).

Anything this does not cover goes through web3 as before, with web3's own errors: an
overloaded or unknown function name, arguments the encoder refuses, a result it cannot decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from eth_abi.exceptions import DecodingError, EncodingError
from eth_utils import function_abi_to_4byte_selector, get_abi_input_types, get_abi_output_types
from web3._utils.abi import map_abi_data
from web3._utils.normalizers import BASE_RETURN_NORMALIZERS
from web3.contract import AsyncContract

__all__ = ["USE_WEB3", "ViewCall", "view_call"]

USE_WEB3: Final = object()
"""What :meth:`ViewCall.call` returns for a call web3's contract layer should make instead."""


class ViewCall:
    """One view function of one contract: its selector and ABI types."""

    __slots__ = ("inputs", "normalize", "outputs", "selector")

    def __init__(self, fn_abi: Any) -> None:
        self.selector: bytes = function_abi_to_4byte_selector(fn_abi)
        self.inputs: list[str] = list(get_abi_input_types(fn_abi))
        self.outputs: list[str] = list(get_abi_output_types(fn_abi))
        self.normalize = any("address" in t for t in self.outputs)
        """Whether an output holds an address (web3 returns those checksummed)."""

    async def call(self, contract: AsyncContract, args: Sequence[Any]) -> Any:
        """The view's result as ``contract.functions[name](*args).call()`` returns it, or
        :data:`USE_WEB3` where that call should be made instead."""
        w3 = contract.w3
        try:
            data = self.selector + w3.codec.encode(self.inputs, list(args))
        except (EncodingError, TypeError, ValueError, OverflowError):
            return USE_WEB3
        raw = await w3.eth.call({"to": contract.address, "data": data})
        try:
            out: Any = w3.codec.decode(self.outputs, raw)
        except DecodingError:  # web3 tells an empty account from bad data: ask it
            return USE_WEB3
        if self.normalize:
            out = map_abi_data(BASE_RETURN_NORMALIZERS, self.outputs, out)
        else:
            out = list(out)
        return out[0] if len(out) == 1 else out


_CACHE: Final[dict[tuple[str, int, str], ViewCall | None]] = {}
"""(contract address, id of its ABI, function name) -> its ViewCall; None: not covered."""


def view_call(contract: AsyncContract, function: str) -> ViewCall | None:
    """The :class:`ViewCall` of ``function`` on ``contract``, None if it is overloaded or
    not a function of its ABI."""
    key = (str(contract.address), id(contract.abi), function)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    found = [
        item
        for item in contract.abi
        if item.get("type") == "function" and item.get("name") == function
    ]
    view = ViewCall(found[0]) if len(found) == 1 else None
    if len(_CACHE) < 4096:  # contracts of a few deployments; never unbounded
        _CACHE[key] = view
    return view
