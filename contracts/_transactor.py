"""Sending transactions from a local key: sign here, send raw, wait for the receipt.

One :class:`Transactor` per account serialises its sends so nonces never collide, turns a
revert (at gas estimation or in the receipt) into a decoded
:class:`~blendsm.errors.ContractRevertError`, and waits for ``confirmations`` blocks on top
of the inclusion block when asked, since PoA chains need not be final at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.types import Nonce, TxParams, TxReceipt, Wei

from blendsm.contracts._revert import chain_errors
from blendsm.errors import TransactionFailedError

__all__ = ["Transactor"]


class Transactor:
    """Signs and sends transactions for one account, one at a time.

    ``confirmations`` counts blocks after the one that included the transaction (0: inclusion
    is enough). ``gas_margin`` multiplies the node's gas estimate.
    """

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        account: LocalAccount,
        *,
        confirmations: int = 0,
        timeout: float = 120.0,
        gas_margin: float = 1.25,
        poll_interval: float = 0.05,
    ) -> None:
        if confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        self.w3 = w3
        self.account = account
        self.address = account.address
        self.confirmations = confirmations
        self.timeout = timeout
        self.gas_margin = gas_margin
        self.poll_interval = poll_interval
        self._lock = asyncio.Lock()
        self._nonce: int | None = None

    async def send(self, call: Any, *, value: int = 0, gas: int | None = None) -> TxReceipt:
        """Send a contract function or constructor call and return its receipt.

        Raises ContractRevertError when the call would revert or did, and
        TransactionFailedError when it was not mined in time.
        """
        return await self.wait(await self.submit(call, value=value, gas=gas), call)

    async def submit(
        self,
        call: Any,
        *,
        value: int = 0,
        gas: int | None = None,
        before_send: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> HexBytes:
        """Sign and broadcast ``call``; return its hash without waiting (then :meth:`wait`).

        ``before_send`` gets the hash of the signed transaction before it is broadcast, so a
        caller can make it durable first (write-ahead): after a crash the hash is known even
        if the broadcast went out. If ``before_send`` raises, nothing is broadcast. Raises
        ContractRevertError when gas estimation reverts (nothing was signed then).
        """
        params: TxParams = {"from": self.address, "value": Wei(value)}
        async with self._lock:
            with chain_errors("build transaction"):
                if gas is None:
                    estimate = await call.estimate_gas(params)
                    gas = int(estimate * self.gas_margin) + 10_000
                if self._nonce is None:
                    self._nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
                params["nonce"] = Nonce(self._nonce)
                params["gas"] = gas
                tx = await call.build_transaction(params)
                signed = self.account.sign_transaction(tx)
            if before_send is not None:
                await before_send(bytes(signed.hash))
            try:
                with chain_errors("send transaction"):
                    tx_hash = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception:
                self._nonce = None  # re-read from the node next time
                raise
            self._nonce += 1
        return tx_hash

    async def wait(self, tx_hash: Hash32 | HexBytes, call: Any = None) -> TxReceipt:
        """Wait for inclusion plus ``confirmations``; decode the revert if it failed."""
        with chain_errors("wait for receipt"):
            receipt = await self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.timeout, poll_latency=self.poll_interval
            )
        if receipt["status"] != 1:
            await self._raise_revert(receipt, call)
        if self.confirmations:
            target = receipt["blockNumber"] + self.confirmations
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            with chain_errors("wait for confirmations"):
                while await self.w3.eth.block_number < target:
                    if loop.time() > deadline:
                        raise TransactionFailedError(
                            f"transaction {tx_hash.hex()} has not reached {self.confirmations} confirmations"
                        )
                    await asyncio.sleep(self.poll_interval)
                # A reorg may have dropped or moved it: read the receipt again.
                receipt = await self.w3.eth.get_transaction_receipt(tx_hash)
        return receipt

    async def _raise_revert(self, receipt: TxReceipt, call: Any) -> None:
        # Replay the call at the failing block to learn the reason.
        if call is not None and hasattr(call, "call"):
            params: TxParams = {"from": self.address}
            with chain_errors("replay failed transaction"):
                await call.call(params, block_identifier=receipt["blockNumber"] - 1)
        raise TransactionFailedError(f"transaction {receipt['transactionHash'].hex()} reverted")
