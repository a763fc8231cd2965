"""What every contract binding shares: a web3 contract object, an optional Transactor for
writes, argument checks, and revert decoding around each call.

The per-contract modules (:mod:`._bindings`, :mod:`._channels`) only say which function to
call and how to turn its answer into one of our records, so error handling and the read-only
rule live in one place.
"""

from __future__ import annotations

from typing import Any, ClassVar

from eth_utils import to_checksum_address
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.logs import DISCARD
from web3.types import EventData, TxReceipt

from blendsm.contracts._deploy import contract_at
from blendsm.contracts._records import ZERO_ADDRESS, TxResult
from blendsm.contracts._revert import chain_errors
from blendsm.contracts._transactor import Transactor
from blendsm.contracts._views import USE_WEB3, view_call
from blendsm.errors import ChainError, ConfigError

__all__ = ["Binding", "addr", "addr_or_zero", "bytes32", "none_if_zero", "tx_fields"]


def addr(value: str) -> str:
    """``value`` in checksum form; a ValueError that names the bad value (web3 says less)."""
    try:
        return str(to_checksum_address(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an address: {value!r}") from exc


def addr_or_zero(value: str | None) -> str:
    """None ("nobody": native coin, no operator) is the zero address to the contracts."""
    return ZERO_ADDRESS if value is None else addr(value)


def none_if_zero(value: str) -> str | None:
    """The contracts' zero address comes back as None, any other address checksummed."""
    return None if int(value, 16) == 0 else str(to_checksum_address(value))


def bytes32(value: bytes, what: str) -> bytes:
    """Check a bytes32 argument here, naming it, rather than fail in the ABI encoder."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(value)


def tx_fields(receipt: TxReceipt) -> dict[str, Any]:
    """The :class:`TxResult` fields of a receipt, for results that extend TxResult."""
    return {
        "tx_hash": bytes(receipt["transactionHash"]),
        "block_number": int(receipt["blockNumber"]),
        "gas_used": int(receipt["gasUsed"]),
    }


# --- the base class --------------------------------------------------------------------


class Binding:
    """A contract object and, when writes are wanted, the Transactor that signs them."""

    NAME: ClassVar[str]

    def __init__(
        self, w3: AsyncWeb3[Any], address: str, transactor: Transactor | None = None
    ) -> None:
        self.w3 = w3
        self.contract: AsyncContract = self._contract(w3, addr(address))
        self.transactor = transactor

    def _contract(self, w3: AsyncWeb3[Any], address: str) -> AsyncContract:
        return contract_at(w3, self.NAME, address)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    async def _read(self, function: str, *args: Any) -> Any:
        with chain_errors(f"{self.NAME}.{function}"):
            view = view_call(self.contract, function)
            if view is not None:
                result = await view.call(self.contract, args)
                if result is not USE_WEB3:
                    return result
            # Not covered (see _views): web3 makes the call and says what is wrong.
            return await self.contract.functions[function](*args).call()

    async def _write(self, function: str, *args: Any, value: int = 0) -> TxReceipt:
        if self.transactor is None:
            raise ConfigError(
                f"{self.NAME}.{function}: no account given, this binding is read-only"
            )
        with chain_errors(f"{self.NAME}.{function}"):
            return await self.transactor.send(self.contract.functions[function](*args), value=value)

    async def _simple(self, function: str, *args: Any, value: int = 0) -> TxResult:
        return TxResult(**tx_fields(await self._write(function, *args, value=value)))

    def _events(self, receipt: TxReceipt, event: str) -> list[EventData]:
        """``event`` logs of this contract in ``receipt`` (logs of other contracts ignored)."""
        ours = [log for log in receipt["logs"] if log["address"] == self.contract.address]
        with chain_errors(f"{self.NAME}: decode {event}"):
            return list(
                self.contract.events[event]().process_receipt({"logs": ours}, errors=DISCARD)
            )

    def _one_event(self, receipt: TxReceipt, event: str) -> EventData:
        found = self._events(receipt, event)
        if not found:
            raise ChainError(
                f"{self.NAME}: receipt of {receipt['transactionHash'].hex()} lacks {event}"
            )
        return found[0]
