"""The Subscriber's on-chain channel helpers: open, top up, close and withdraw.

Why apart: they are the only part of the Subscriber that talks to the chain through web3
(``blendsm[broker]``'s :class:`~blendsm.contracts.Marketplace`), they are async where the
rest of the Subscriber is threaded, and a gateway that only receives and pays never calls
them. ``blendsm.contracts`` is imported for type checking only, so the SDK still imports
without web3.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from blendsm.errors import ConfigError

from ._voucher import VoucherDomain

if TYPE_CHECKING:
    from blendsm.contracts import CloseRequest, Marketplace, Settlement, TxResult

__all__ = ["ChannelHelpers"]


class ChannelHelpers:
    """Channel methods of the :class:`~blendsm.device_sdk.Subscriber` (a stateless mixin:
    it uses the Subscriber's address, broker, voucher domain and payment book)."""

    address: str
    broker: str
    domain: VoucherDomain

    if TYPE_CHECKING:

        @property
        def connected(self) -> bool: ...

        def pay_outstanding(self, channel_id: bytes | None = None) -> int: ...

        def vouchered(self, channel_id: bytes, lane: str | None = None) -> int: ...

        def wait_confirmed(
            self, channel_id: bytes, amount: int, timeout: float, lane: str | None = None
        ) -> bool: ...

        def set_deposit(self, channel_id: bytes, deposit: int) -> None: ...

    def _check_marketplace(self, marketplace: Marketplace) -> None:
        if marketplace.address is None or marketplace.address.lower() != self.address.lower():
            raise ConfigError(
                f"marketplace: signs as {marketplace.address}, not as this subscriber {self.address}"
            )
        if marketplace.channels.address.lower() != self.domain.verifying_contract.lower():
            raise ConfigError(
                f"marketplace: PaymentChannels at {marketplace.channels.address}, but vouchers"
                f" are signed for {self.domain.verifying_contract}"
            )

    async def open_channel(
        self,
        marketplace: Marketplace,
        seller: str,
        deposit: int,
        *,
        token: str | None = None,
        fee_bps: int = 0,
    ) -> bytes:
        """Open a channel to ``seller`` metered by this subscriber's broker operator (the
        broker meters only channels naming it); ``token`` None is the native coin, an ERC-20
        is approved first. ``marketplace`` must sign as this subscriber. The channel id."""
        self._check_marketplace(marketplace)
        opened = await marketplace.channels.open(
            seller, self.broker, token, deposit, fee_bps, approve=token is not None
        )
        self.set_deposit(opened.channel_id, deposit)  # lanes together never sign over it
        return opened.channel_id

    async def top_up(self, marketplace: Marketplace, channel_id: bytes, amount: int) -> TxResult:
        """Add ``amount`` to the channel's deposit (an ERC-20 is approved first)."""
        self._check_marketplace(marketplace)
        result = await marketplace.channels.top_up(channel_id, amount, approve=True)
        info = await marketplace.channels.channel(channel_id)
        if info is not None:
            self.set_deposit(channel_id, info.deposit)
        return result

    async def close_channel(
        self, marketplace: Marketplace, channel_id: bytes, *, settle_timeout: float = 5.0
    ) -> CloseRequest:
        """Pay what is outstanding on the channel (waiting up to ``settle_timeout`` for the
        broker's receipt while connected), then request close: the challenge period starts
        (the broker can still claim); then :meth:`withdraw` refunds the rest."""
        self._check_marketplace(marketplace)
        if self.connected and self.pay_outstanding(channel_id):
            target = self.vouchered(channel_id)
            await asyncio.to_thread(self.wait_confirmed, channel_id, target, settle_timeout)
        return await marketplace.channels.request_close(channel_id)

    async def withdraw(self, marketplace: Marketplace, channel_id: bytes) -> Settlement:
        """Take back the unclaimed deposit once the challenge period is over."""
        self._check_marketplace(marketplace)
        return await marketplace.channels.withdraw(channel_id)
