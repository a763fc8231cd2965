"""The records of anchoring: a leaf to store, a sealed batch, an anchored root, a proof.

Why apart from the store and the anchorer: these are the values that cross between them, the
broker's control channel and the HTTP API; they hold no connection and no chain client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Literal

from blendsm.device_sdk import AnchorNotice, Envelope, Proof
from blendsm.errors import StoreError

__all__ = [
    "UINT64_MAX",
    "AnchorRecord",
    "Batch",
    "BatchState",
    "LeafRow",
    "ProofRecord",
]

BatchState = Literal["intent", "sent", "confirmed", "failed"]

UINT64_MAX: Final = 2**64 - 1
"""Largest message sequence number (the envelope's is a uint64)."""


@dataclass(frozen=True, slots=True)
class LeafRow:
    """One message to anchor: where it came from, its leaf and the envelope (for audits)."""

    topic: str
    device: bytes
    """20 address bytes of the signing device."""
    sequence: int
    leaf: bytes
    envelope: bytes
    """The envelope's wire bytes, kept so a proof can be audited against the message."""
    received_at: float

    @classmethod
    def of(
        cls, topic: str, envelope: Envelope, leaf: bytes, received_at: float | None = None
    ) -> LeafRow:
        return cls(
            topic,
            envelope.device,
            envelope.sequence,
            leaf,
            envelope.encode(),
            time.time() if received_at is None else received_at,
        )

    def check(self) -> None:
        """Raise StoreError if a field cannot be stored (so it fails its caller alone)."""
        if not isinstance(self.topic, str) or not self.topic:
            raise StoreError("leaf: topic must be a non-empty string")
        if not isinstance(self.device, bytes) or len(self.device) != 20:
            raise StoreError("leaf: device must be 20 bytes")
        if not isinstance(self.leaf, bytes) or len(self.leaf) != 32:
            raise StoreError("leaf: leaf must be 32 bytes")
        if not 0 <= self.sequence <= UINT64_MAX:
            raise StoreError("leaf: sequence must fit uint64")
        if not isinstance(self.envelope, bytes):
            raise StoreError("leaf: envelope must be bytes")


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed batch: its id, root and leaf count never change once written."""

    batch_id: int
    root: bytes
    leaf_count: int
    state: BatchState
    tx_hash: bytes | None
    created_at: float


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """A batch root anchored on chain (``tx_hash`` None if found by reconciling without it)."""

    batch_id: int
    root: bytes
    leaf_count: int
    tx_hash: bytes | None
    block: int | None

    def notice(self) -> AnchorNotice:
        """The notice to broadcast on :data:`~blendsm.device_sdk.ANCHORS_TOPIC`."""
        return AnchorNotice(self.batch_id, self.root, self.leaf_count, self.tx_hash)


@dataclass(frozen=True, slots=True)
class ProofRecord:
    """A message's leaf, its proof and the anchored batch it is in."""

    topic: str
    sequence: int
    device: str
    """Checksum address of the signing device."""
    leaf: bytes
    proof: tuple[bytes, ...]
    batch_id: int
    root: bytes
    tx_hash: bytes | None
    index: int
    """The leaf's position in the batch."""
    leaf_count: int
    block: int | None
    envelope: bytes
    """The envelope's wire bytes, as received."""

    def notice(self, request_id: str) -> Proof:
        """The :class:`~blendsm.device_sdk.Proof` notice answering ``request_id``."""
        return Proof(
            request_id=request_id,
            topic=self.topic,
            sequence=self.sequence,
            device=self.device,
            leaf=self.leaf,
            proof=self.proof,
            batch_id=self.batch_id,
            root=self.root,
            tx_hash=self.tx_hash,
            index=self.index,
        )
