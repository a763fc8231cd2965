"""Money on chain: the PaymentChannels binding and the ERC-20 subset that funds a channel.

A channel in a token needs an allowance first, so :class:`PaymentChannels` can approve its
own deposits (``approve=True``) through an :class:`Erc20` signing as the same account.
"""

from __future__ import annotations

from typing import Any, Final

from eth_abi import encode
from eth_utils import keccak
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.types import TxReceipt

from blendsm.contracts._binding_base import (
    Binding,
    addr,
    addr_or_zero,
    bytes32,
    none_if_zero,
    tx_fields,
)
from blendsm.contracts._records import (
    ChannelInfo,
    ChannelOpening,
    ClaimReceipt,
    CloseRequest,
    DomainInfo,
    Settlement,
    TxResult,
)
from blendsm.contracts._revert import chain_errors
from blendsm.errors import ConfigError

__all__ = ["Erc20", "PaymentChannels"]


def _abi_function(
    name: str, mutability: str, inputs: dict[str, str], output: str
) -> dict[str, Any]:
    """One ABI function entry with named inputs and one unnamed output."""
    return {
        "type": "function",
        "name": name,
        "stateMutability": mutability,
        "inputs": [{"name": arg, "type": abi_type} for arg, abi_type in inputs.items()],
        "outputs": [{"name": "", "type": output}],
    }


# The ERC-20 subset a payer needs to fund a channel; any standard token answers it.
_ERC20_ABI: Final[list[dict[str, Any]]] = [
    _abi_function("approve", "nonpayable", {"spender": "address", "value": "uint256"}, "bool"),
    _abi_function("allowance", "view", {"owner": "address", "spender": "address"}, "uint256"),
    _abi_function("balanceOf", "view", {"account": "address"}, "uint256"),
    _abi_function("transfer", "nonpayable", {"to": "address", "value": "uint256"}, "bool"),
]


class Erc20(Binding):
    """The ERC-20 subset a payer needs to fund channels (any standard token)."""

    NAME = "ERC20"

    def _contract(self, w3: AsyncWeb3[Any], address: str) -> AsyncContract:
        return w3.eth.contract(address=address, abi=_ERC20_ABI)  # type: ignore[call-overload,no-any-return]

    async def balance_of(self, account: str) -> int:
        return int(await self._read("balanceOf", addr(account)))

    async def allowance(self, owner: str, spender: str) -> int:
        return int(await self._read("allowance", addr(owner), addr(spender)))

    async def approve(self, spender: str, amount: int) -> TxResult:
        return await self._simple("approve", addr(spender), amount)

    async def transfer(self, to: str, amount: int) -> TxResult:
        return await self._simple("transfer", addr(to), amount)


class PaymentChannels(Binding):
    """Unidirectional payer -> payee channels paid by EIP-712 vouchers."""

    NAME = "PaymentChannels"
    _chain_id: int | None = None

    async def domain(self) -> DomainInfo:
        """Chain id and address of the voucher domain (the chain id is read once)."""
        if self._chain_id is None:
            with chain_errors("PaymentChannels.domain"):
                self._chain_id = int(await self.w3.eth.chain_id)
        return DomainInfo(self._chain_id, self.address)

    async def approve_token(self, token: str, amount: int) -> TxResult:
        """Let this contract pull ``amount`` of ``token`` from the sender (before open/top-up)."""
        return await self._token(token).approve(self.address, amount)

    async def allowance(self, token: str, owner: str) -> int:
        return await self._token(token).allowance(owner, self.address)

    def _token(self, token: str) -> Erc20:
        return Erc20(self.w3, token, self.transactor)

    async def _fund(self, token: str | None, amount: int, approve: bool) -> TxResult | None:
        if token is None or not approve:
            return None
        if self.transactor is None:
            raise ConfigError("PaymentChannels: no account given, this binding is read-only")
        if await self.allowance(token, self.transactor.address) >= amount:
            return None
        return await self.approve_token(token, amount)

    async def open(
        self,
        payee: str,
        operator: str | None,
        token: str | None,
        amount: int,
        fee_bps: int = 0,
        *,
        approve: bool = False,
    ) -> ChannelOpening:
        """Open a channel to ``payee`` with a deposit of ``amount``; ``token`` None is the native
        coin (sent as value). For an ERC-20, ``approve=True`` first approves ``amount`` unless
        the allowance already covers it. The id comes from the ChannelOpened log."""
        approval = await self._fund(token, amount, approve)
        receipt = await self._write(
            "open",
            addr(payee),
            addr_or_zero(operator),
            addr_or_zero(token),
            amount,
            fee_bps,
            value=amount if token is None else 0,
        )
        channel_id = bytes(self._one_event(receipt, "ChannelOpened")["args"]["channelId"])
        return ChannelOpening(
            **tx_fields(receipt), channel_id=channel_id, deposit=amount, approval=approval
        )

    async def top_up(self, channel_id: bytes, amount: int, *, approve: bool = False) -> TxResult:
        """Add ``amount`` to the deposit (payer only); reads the channel to know its token."""
        info = await self.channel(channel_id)
        token = info.token if info is not None else None
        await self._fund(token, amount, approve)
        return await self._simple(
            "topUp", bytes32(channel_id, "channel_id"), amount, value=amount if token is None else 0
        )

    async def claim(
        self, channel_id: bytes, lane: str, cumulative_amount: int, signature: bytes
    ) -> ClaimReceipt:
        """Pay out a voucher of ``lane``; anyone may submit it."""
        receipt = await self._write(
            "claim",
            bytes32(channel_id, "channel_id"),
            addr(lane),
            cumulative_amount,
            bytes(signature),
        )
        args = self._one_event(receipt, "ChannelClaimed")["args"]
        return ClaimReceipt(
            **tx_fields(receipt),
            channel_id=bytes(channel_id),
            cumulative_amount=int(args["cumulativeAmount"]),
            payout=int(args["payout"]),
            fee=int(args["fee"]),
            claimed=int(args["totalClaimed"]),
            lane=addr(args["lane"]),
            lane_claimed=int(args["laneClaimed"]),
        )

    async def request_close(self, channel_id: bytes) -> CloseRequest:
        receipt = await self._write("requestClose", bytes32(channel_id, "channel_id"))
        closes_at = int(self._one_event(receipt, "CloseRequested")["args"]["closesAt"])
        return CloseRequest(**tx_fields(receipt), channel_id=bytes(channel_id), closes_at=closes_at)

    async def withdraw(self, channel_id: bytes) -> Settlement:
        """Refund the unclaimed deposit after the challenge period (payer only)."""
        receipt = await self._write("withdraw", bytes32(channel_id, "channel_id"))
        return self._settlement(receipt, channel_id)

    async def cooperative_close(
        self,
        channel_id: bytes,
        lane: str | None = None,
        cumulative_amount: int = 0,
        signature: bytes = b"",
    ) -> Settlement:
        """Settle at once (payee only), claiming the final voucher of ``lane`` if it pays
        anything new. What other lanes did not claim yet is refunded to the payer."""
        receipt = await self._write(
            "cooperativeClose",
            bytes32(channel_id, "channel_id"),
            addr_or_zero(lane),
            cumulative_amount,
            bytes(signature),
        )
        return self._settlement(receipt, channel_id)

    def _settlement(self, receipt: TxReceipt, channel_id: bytes) -> Settlement:
        refund = int(self._one_event(receipt, "ChannelSettled")["args"]["refund"])
        claims = self._events(receipt, "ChannelClaimed")
        payout = int(claims[0]["args"]["payout"]) if claims else 0
        fee = int(claims[0]["args"]["fee"]) if claims else 0
        return Settlement(
            **tx_fields(receipt),
            channel_id=bytes(channel_id),
            refund=refund,
            payout=payout,
            fee=fee,
        )

    async def channel(self, channel_id: bytes) -> ChannelInfo | None:
        """The channel's state, None if no channel has this id."""
        (
            payer,
            fee_bps,
            closes_at,
            settled,
            payee,
            operator,
            token,
            deposit,
            claimed,
        ) = await self._read("channel", bytes32(channel_id, "channel_id"))
        if int(payer, 16) == 0:
            return None
        return ChannelInfo(
            channel_id=bytes(channel_id),
            payer=addr(payer),
            payee=addr(payee),
            operator=none_if_zero(operator),
            token=none_if_zero(token),
            deposit=int(deposit),
            claimed=int(claimed),
            fee_bps=int(fee_bps),
            closes_at=int(closes_at) or None,
            settled=bool(settled),
        )

    async def voucher_digest(self, channel_id: bytes, lane: str, cumulative_amount: int) -> bytes:
        """The EIP-712 digest the payer signs, as the contract computes it."""
        return bytes(
            await self._read(
                "voucherDigest", bytes32(channel_id, "channel_id"), addr(lane), cumulative_amount
            )
        )

    async def lane_claimed(self, channel_id: bytes, lane: str) -> int:
        """What ``lane`` has claimed on the channel so far."""
        return int(await self._read("laneClaimed", bytes32(channel_id, "channel_id"), addr(lane)))

    async def is_lane(self, channel_id: bytes, lane: str) -> bool:
        """Whether ``lane`` may claim on the channel (the operator or one of its brokers)."""
        return bool(await self._read("isLane", bytes32(channel_id, "channel_id"), addr(lane)))

    async def brokers_address(self) -> str | None:
        """The Brokers contract lanes are checked against; None until the deployer wired it."""
        return none_if_zero(await self._read("brokers"))

    async def set_brokers(self, brokers: str) -> TxResult:
        """Wire the Brokers contract, once (deployer only)."""
        return await self._simple("setBrokers", addr(brokers))

    async def domain_separator(self) -> bytes:
        return bytes(await self._read("domainSeparator"))

    async def challenge_period(self) -> int:
        return int(await self._read("challengePeriod"))

    async def max_fee_bps(self) -> int:
        return int(await self._read("MAX_FEE_BPS"))

    async def nonce_of(self, payer: str) -> int:
        """Channels ``payer`` opened so far (the nonce of its next channel id)."""
        return int(await self._read("nonces", addr(payer)))

    async def next_channel_id(self, payer: str, payee: str, token: str | None = None) -> bytes:
        """The id ``payer``'s next channel to ``payee`` in ``token`` will get."""
        domain = await self.domain()
        nonce = await self.nonce_of(payer)
        encoded = encode(
            ["uint256", "address", "address", "address", "address", "uint256"],
            [
                domain.chain_id,
                self.address,
                addr(payer),
                addr(payee),
                addr_or_zero(token),
                nonce,
            ],
        )
        return bytes(keccak(encoded))
