"""Where a broker transaction stands on chain: mined, still known to the node, or gone; and
whether its block is deep enough to count.

Why shared: the settler (claims) and the anchorer (anchors) both follow their own write-ahead
transactions and must never send a second one while the first may still be mined, nor count
one before ``confirmations`` blocks are on top of it. Both ask the node the same questions.
"""

from __future__ import annotations

from typing import Any

from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from blendsm.contracts import chain_errors

__all__ = ["confirmations_missing", "find_transaction"]


async def find_transaction(
    w3: AsyncWeb3[Any], tx_hash: bytes, what: str
) -> tuple[TxReceipt | None, bool]:
    """``(receipt, pending)``: the receipt if ``tx_hash`` was mined; else whether the node
    still knows it unmined (then wait for it: sending again could double it). ChainError,
    labelled ``what``, when the node cannot be asked."""
    with chain_errors(what):
        try:
            receipt: TxReceipt | None = await w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            receipt = None
        if receipt is not None:
            return receipt, False
        try:
            await w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return None, False
        return None, True


async def confirmations_missing(
    w3: AsyncWeb3[Any], block: int, confirmations: int, what: str
) -> str | None:
    """None once ``block`` has ``confirmations`` blocks on top of it (at once when 0), else
    why it does not count yet. ChainError, labelled ``what``, when the head cannot be read."""
    if not confirmations:
        return None
    with chain_errors(what):
        head = int(await w3.eth.block_number)
    if head < block + confirmations:
        return f"block {block} has {head - block} of {confirmations} confirmations"
    return None
