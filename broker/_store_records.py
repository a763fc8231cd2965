"""The voucher store's records and its uint256 / address encodings (split from ``_store``).

Amounts are uint256, beyond SQLite's 64-bit INTEGER, so they are stored as 32-byte
big-endian BLOBs whose byte order is their numeric order; lanes are 20-byte addresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blendsm.device_sdk import Voucher

__all__ = ["ChannelBalance", "ClaimIntent", "ClaimState"]

ClaimState = Literal["intent", "sent", "confirmed", "failed"]


def _u256(value: int) -> bytes:
    """32-byte big-endian form of a uint256, whose byte order is its numeric order."""
    if not 0 <= value < 2**256:
        raise ValueError(f"amount {value} is not a uint256")
    return value.to_bytes(32, "big")


def _int(blob: bytes) -> int:
    return int.from_bytes(blob, "big")


def _lane_bytes(lane: str) -> bytes:
    """20 bytes of a 0x address (the broker key)."""
    raw = bytes.fromhex(lane[2:]) if lane.startswith(("0x", "0X")) else b""
    if len(raw) != 20:
        raise ValueError(f"lane {lane!r} is not an address")
    return raw


@dataclass(frozen=True, slots=True)
class ClaimIntent:
    """One attempt to claim ``amount`` on ``channel_id`` with the voucher that signs it."""

    intent_id: int
    channel_id: bytes
    amount: int
    signature: bytes
    state: ClaimState
    tx_hash: bytes | None
    created_at: float
    lane: str = ""
    """The lane the voucher names (the broker key, checksum form)."""

    @property
    def voucher(self) -> Voucher:
        """The voucher to submit to ``claim``."""
        return Voucher(self.channel_id, self.lane, self.amount, self.signature)


@dataclass(frozen=True, slots=True)
class ChannelBalance:
    """A channel's latest accepted voucher amount and what we know was claimed on chain."""

    channel_id: bytes
    amount: int
    claimed_onchain: int

    @property
    def unclaimed(self) -> int:
        """What a claim of the latest voucher could still pay (before the deposit cap)."""
        return max(0, self.amount - self.claimed_onchain)
