"""Contract reverts and transport failures, turned into BlendSM errors.

Every custom error in every artifact ABI is indexed by its 4-byte selector, so revert
data from any of our contracts decodes to a :class:`~blendsm.errors.ContractRevertError`
that names the Solidity error and its arguments. web3 and transport errors are re-raised
from the original with ``from``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import aiohttp
from eth_abi import decode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    Web3Exception,
)

try:  # the embedded chain's provider raises eth-tester's own revert error
    from eth_tester.exceptions import TransactionFailed as _TesterTransactionFailed

    _TESTER_REVERTS: tuple[type[BaseException], ...] = (_TesterTransactionFailed,)
except ImportError:  # pragma: no cover - eth-tester comes with web3 in the broker extra
    _TESTER_REVERTS = ()

from blendsm.contracts._artifacts import CONTRACT_NAMES, load_artifact
from blendsm.errors import (
    ChainError,
    ChainUnavailableError,
    ContractRevertError,
    TransactionFailedError,
)

__all__ = ["chain_errors", "decode_revert"]

_ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)
_PANIC = bytes.fromhex("4e487b71")  # Panic(uint256)


def _abi_type(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in item["components"])
        return f"({inner}){item['type'][5:]}"
    return str(item["type"])


@cache
def _error_table() -> dict[bytes, tuple[str, list[str], list[str], list[str]]]:
    """Selector -> (error name, argument names, ABI types, Solidity internal types)."""
    table: dict[bytes, tuple[str, list[str], list[str], list[str]]] = {}
    for name in CONTRACT_NAMES:
        for item in load_artifact(name)["abi"]:
            if item["type"] != "error":
                continue
            types = [_abi_type(i) for i in item["inputs"]]
            selector = function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})")
            table[selector] = (
                item["name"],
                [i["name"] for i in item["inputs"]],
                types,
                [str(i.get("internalType", "")) for i in item["inputs"]],
            )
    return table


def _typed(abi_type: str, internal_type: str, value: Any) -> Any:
    """Checksum addresses; Solidity enums become their IntEnum (``Status.REVOKED`` reads
    better than ``4`` and still compares equal to it)."""
    if abi_type == "address":
        return to_checksum_address(value)
    if internal_type.startswith("enum "):
        from blendsm.contracts._records import Policy, Role, Status

        enum = {"Registry.Status": Status, "Registry.Role": Role, "Market.Policy": Policy}.get(
            internal_type[5:]
        )
        if enum is not None:
            try:
                return enum(value)
            except ValueError:
                return value
    return value


def _as_bytes(data: Any) -> bytes | None:
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    return None


def decode_revert(data: bytes) -> ContractRevertError:
    """Decode revert data into a named error (addresses in checksum form, as the bindings
    return them); unknown data keeps its hex."""
    selector, body = data[:4], data[4:]
    try:
        if selector == _ERROR_STRING:
            return ContractRevertError("Error", {"message": decode(["string"], body)[0]})
        if selector == _PANIC:
            return ContractRevertError("Panic", {"code": decode(["uint256"], body)[0]})
        known = _error_table().get(selector)
        if known is not None:
            name, names, types, internal = known
            values = [
                _typed(t, i, v)
                for t, i, v in zip(types, internal, decode(types, body), strict=True)
            ]
            return ContractRevertError(name, dict(zip(names, values, strict=True)))
    except Exception:  # malformed revert data: report it raw below
        pass
    return ContractRevertError("UnknownRevert", {"data": "0x" + data.hex()})


def _tester_revert_data(exc: BaseException) -> bytes | None:
    """Raw revert data of an eth-tester revert: web3's provider re-raises it as text, so look
    down the exception chain for the original, which carries the bytes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TESTER_REVERTS) and current.args:
            first = current.args[0]
            if isinstance(first, Exception) and first.args:
                first = first.args[0]
            if isinstance(first, bytes | bytearray):
                return bytes(first)
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def chain_errors(action: str) -> Iterator[None]:
    """Translate web3 and transport failures inside the block into our error tree."""
    try:
        yield
    except ChainError:
        raise
    except ContractLogicError as exc:
        raw = _as_bytes(exc.data)
        if raw:
            raise decode_revert(raw) from exc
        raise ContractRevertError("Revert", {"message": str(exc)}) from exc
    except _TESTER_REVERTS as exc:
        raw = _tester_revert_data(exc)
        if raw:
            raise decode_revert(raw) from exc
        raise ContractRevertError("Revert", {"message": str(exc)}) from exc
    except TimeExhausted as exc:
        raise TransactionFailedError(f"{action}: not mined in time") from exc
    except (
        ProviderConnectionError,
        aiohttp.ClientError,
        ConnectionError,
        TimeoutError,
        OSError,
    ) as exc:
        raise ChainUnavailableError(f"{action}: chain endpoint unavailable: {exc}") from exc
    except Web3Exception as exc:
        raise ChainError(f"{action}: {exc}") from exc
